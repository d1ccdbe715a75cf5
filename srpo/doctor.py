"""`srpo doctor`: a workflow config checked in one go before hours of cluster time are queued —
weights present and verified, prompts readable, environments or images there, GPUs visible,
disk enough for the outputs, GPU memory enough for the training config (its row gives the
estimated peak per rank, srpo/memory.py). Each check is a row; any failed row makes the exit
status 2.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from srpo.io import InputError, sha256_file
from srpo.scorers import HUB_KEYS
from srpo.verify import hub_unreachable, require_pretrained

CONTAINERS_CONFIG = Path("config/containers.yaml")
SCHEMA = Path("workflow/schemas/config.schema.yaml")
FLUX_DEV_TRANSFORMER = {"guidance_embeds": True}
"""FLUX.1-dev's transformer config when the base model is not local (for the disk estimate):
diffusers' FluxTransformer2DModel defaults with the guidance input."""
HPD_BENCHMARK_PROMPTS = 3200
HPD_TRAIN_PROMPTS_ESTIMATE = 104_000
"""Prompt counts assumed for the disk estimate when the hub's HPDv2 copy is not local."""
TRAIN_STATE_BYTES_PER_PARAMETER = 12
"""fp32 parameters + AdamW's two fp32 moments, as a DCP checkpoint stores them."""


@dataclass(frozen=True)
class Check:
    area: str
    subject: str
    status: str  # ok, warn or fail
    detail: str


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping of keys at the top level")
    return loaded


def load_workflow_config(files: list[Path]) -> dict[str, Any]:
    """config/containers.yaml + the given files (default: the tiny one), as the Snakefile reads
    them, validated against the workflow's schema; an invalid key is one line."""
    from jsonschema import Draft202012Validator
    from snakemake.utils import update_config

    config = _read_yaml(CONTAINERS_CONFIG)
    for path in files or [Path("config/config.yaml")]:
        update_config(config, _read_yaml(Path(path)))  # Snakemake's own merge of configfiles
    schema = yaml.safe_load(SCHEMA.read_text())
    for error in sorted(Draft202012Validator(schema).iter_errors(config), key=str):
        key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
        raise InputError(f"config: {key}: {error.message}")
    return config


class Doctor:
    """Runs every check of one workflow config; `rows` is the table."""

    def __init__(self, config: dict[str, Any], gpu_memory: int | None = None) -> None:
        self.config = config
        self.gpu_memory = gpu_memory
        """Bytes one GPU has for the memory check; None: the visible GPU's, else 80 GB."""
        self.out = Path("results") / config["run"]
        self.tiny = bool(config["tiny_models"])
        self.rows: list[Check] = []

    def add(self, area: str, subject: str, status: str, detail: str) -> None:
        self.rows.append(Check(area, subject, status, detail))

    @property
    def failed(self) -> bool:
        return any(row.status == "fail" for row in self.rows)

    def built_here(self, path: str) -> bool:
        return self.tiny and path.startswith(f"{self.out}/models/")

    # ------------------------------------------------------------------ weights
    def weights(self) -> None:
        for name, entry in sorted((self.config.get("weights") or {}).items()):
            path, expected = Path(entry["path"]), entry.get("sha256")
            if not path.is_file():
                if self.built_here(entry["path"]):
                    self.add("weights", name, "ok", f"{path}: made by the tiny build")
                else:
                    self.add("weights", name, "fail", f"{path}: not found")
            elif expected is None:
                self.add("weights", name, "warn", f"{path}: present, no sha256 to check")
            elif (actual := sha256_file(path)) != expected:
                self.add(
                    "weights", name, "fail", f"{path}: sha256 is {actual}, expected {expected}"
                )
            else:
                self.add("weights", name, "ok", f"{path}: sha256 verified")
        self.pretrained("base_model", None if self.tiny else self.config.get("base_model"))
        for metric in self.scored():
            for key, value in sorted(self.config["metrics"][metric]["weights"].items()):
                self.pretrained(f"metrics.{metric}.weights.{key}", value, key in HUB_KEYS)
        self.train_config()

    def pretrained(self, key: str, reference: str | None, hub: bool = True) -> None:
        """A weight the config names: made by the tiny build, present, or (if `hub`) a hub id
        that can be fetched; files listed under `weights:` already have their row."""
        listed = {entry["path"] for entry in (self.config.get("weights") or {}).values()}
        if reference is None:
            self.add("weights", key, "ok", "the tiny FLUX of build_tiny_models")
        elif self.built_here(reference):
            self.add("weights", key, "ok", f"{reference}: made by the tiny build")
        elif reference in listed:
            return
        elif not hub:
            found = Path(reference).exists()
            detail = "present" if found else "not found (README, 'Where the weights go')"
            self.add("weights", key, "ok" if found else "fail", f"{reference}: {detail}")
        else:
            try:
                require_pretrained(reference, key)
            except InputError as error:
                self.add("weights", key, "fail", str(error))
                return
            self.add("weights", key, "ok", f"{reference}: present")

    def train_config(self) -> None:
        from srpo.config import load_train_config

        path = Path(self.config["train"]["config"])
        try:
            settings = load_train_config(path)
        except InputError as error:
            self.add("train", str(path), "fail", str(error))
            return
        status, memory = self.memory(settings)
        self.add("train", str(path), status, f"valid, batch {settings.batch_size}; {memory}")
        self.settings = settings
        for key, value in sorted(settings.reward.weight_paths().items()):
            self.pretrained(f"{path}: reward.{key}", value, key in HUB_KEYS)
        for metric, files in sorted(settings.evaluation.metrics.items()):
            for key, value in sorted(files.items()):
                where = f"{path}: evaluation.metrics.{metric}.{key}"
                self.pretrained(where, value, key in HUB_KEYS)

    def scored(self) -> list[str]:
        return self.config.get("scored_metrics") or list(self.config["metrics"])

    # ------------------------------------------------------------------ prompts
    def prompts(self) -> None:
        from srpo.hpd import locate, read_benchmark, read_lines, read_train_json

        prompts = self.config["prompts"]
        source, train_file = prompts["source"], prompts.get("train_file")
        self.prompt_counts = (HPD_TRAIN_PROMPTS_ESTIMATE, HPD_BENCHMARK_PROMPTS)
        if source == "hub":
            self.pretrained_dataset()
            return
        try:
            folder = locate(source, prompts.get("path"), train=not train_file)
            train = read_lines(Path(train_file)) if train_file else read_train_json(folder)
            evaluation = read_benchmark(folder)
        except InputError as error:
            self.add("prompts", source, "fail", str(error))
            return
        per_style = prompts.get("eval_per_style")
        chosen = min(len(evaluation), 4 * per_style) if per_style else len(evaluation)
        self.prompt_counts = (len(train), chosen)
        self.add(
            "prompts",
            train_file or source,
            "ok",
            f"{len(train)} training and {len(evaluation)} benchmark prompts readable",
        )

    def pretrained_dataset(self) -> None:
        reason = hub_unreachable()
        if reason is None:
            self.add("prompts", "hub", "ok", "ymhao/HPDv2 reachable")
        else:
            self.add(
                "prompts",
                "hub",
                "fail",
                f"ymhao/HPDv2 cannot be fetched ({reason}): download the dataset and use "
                "prompts.source: local with prompts.path",
            )

    # ------------------------------------------------------------- environments
    def environments(self) -> None:
        """Each environment a rule runs in: the scored metrics' and the training reward's
        (the workflow trains where its reward model's score rule runs)."""
        containers = self.config["containers"]
        rules = containers["rules"]
        settings = getattr(self, "settings", None)
        rewards = settings.reward.kinds() if settings else []
        train_envs = {rules.get(f"score_{kind}", "main") for kind in rewards}
        scored = {rules.get(f"score_{metric}", "main") for metric in self.scored()}
        for env in sorted({"main", *scored, *train_envs}):
            image = containers["images"].get(env)
            if image is not None:
                self.add("environment", env, "ok", f"image {image} (pulled by digest)")
                continue
            commands = ["srpo"] if env == "main" else [f"srpo-{env}"]
            if env != "main" and env in train_envs:
                commands.append(f"torchrun-{env}")  # training with its reward
            missing = [command for command in commands if not shutil.which(command)]
            if not missing:
                found = " and ".join(commands)
                self.add("environment", env, "ok", f"{found} on PATH (no image published)")
            else:
                fix = "bash scripts/setup.sh" if env == "main" else f"bash envs/metric-env.sh {env}"
                absent = " and ".join(missing)
                self.add("environment", env, "fail", f"{absent} not on PATH: run `{fix}`")

    # -------------------------------------------------------------------- GPUs
    def gpus(self) -> None:
        import torch

        table = self.config["resources"]
        wanted = max(
            int({**table["default"], **settings}.get("gpu", 0)) for settings in table.values()
        )
        visible = torch.cuda.device_count()
        if wanted == 0:
            self.add("gpus", "visible", "ok", f"{visible} visible; no rule asks for one")
        elif visible >= wanted:
            self.add("gpus", "visible", "ok", f"{visible} visible; rules ask for up to {wanted}")
        else:
            self.add(
                "gpus",
                "visible",
                "warn",
                f"{visible} visible, rules ask for up to {wanted}: fine on a Slurm login node "
                "(each job gets its own), else those rules would run on the CPU",
            )

    # -------------------------------------------------------------------- disk
    def transformer_parameters(self) -> int:
        from diffusers import FluxTransformer2DModel

        if self.tiny:
            from srpo.tiny import tiny_transformer

            return sum(p.numel() for p in tiny_transformer(0).parameters())
        import torch

        try:
            config = FluxTransformer2DModel.load_config(
                self.config["base_model"], subfolder="transformer", local_files_only=True
            )
        except OSError:
            config = FLUX_DEV_TRANSFORMER
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        return sum(p.numel() for p in model.parameters())

    def disk(self) -> None:
        """Estimate of what results/<run>/ grows to, against the free space there."""
        parameters = self.transformer_parameters()
        train_prompts, eval_prompts = getattr(self, "prompt_counts", (0, 0))
        sample = self.config["sample"]
        images = 2 * eval_prompts * sample["height"] * sample["width"] * 3
        encode = self.config["encode"]
        dtype_bytes = 2 if encode.get("dtype") == "bfloat16" else 4
        embeddings = train_prompts * (encode["max_sequence_length"] * 4096 + 768) * dtype_bytes
        keep = getattr(getattr(self, "settings", None), "keep_last", 3)
        checkpoints = (keep + 1) * parameters * TRAIN_STATE_BYTES_PER_PARAMETER
        export = 2 * parameters * 2
        need = images + embeddings + checkpoints + export
        where = next(p for p in (self.out, *self.out.parents) if p.exists())
        free = shutil.disk_usage(where).free
        detail = (
            f"{_size(need)} needed (checkpoints {_size(checkpoints)}, export {_size(export)}, "
            f"images {_size(images)}, embeddings {_size(embeddings)}), {_size(free)} free "
            f"under {where.resolve()}"
        )
        self.add("disk", str(self.out), "ok" if need < free else "fail", detail)

    # ------------------------------------------------------------------ memory
    def memory(self, settings: Any) -> tuple[str, str]:
        """(status, detail) of the training config's peak GPU memory per rank at W = nodes ×
        nproc_per_node against one GPU's memory (srpo/memory.py)."""
        from srpo.memory import HEADROOM, estimate, gpu_bytes, model_configs, size, verdict

        train = self.config["train"]
        world = int(train.get("nodes", 1)) * int(train.get("nproc_per_node", 1))
        if self.gpu_memory is None:
            limit, source = gpu_bytes()
        else:
            limit, source = self.gpu_memory, "given"
        try:
            models = model_configs(settings, **self.tiny_models(settings))
            text_tokens = int(self.config["encode"]["max_sequence_length"])
            result = estimate(settings, world, models, text_tokens)
        except Exception as error:  # an estimate must not stop the other checks
            return "warn", f"memory not estimated at W={world}: {type(error).__name__}: {error}"
        status = verdict(result, limit)
        limit_text = f"{size(limit)} GPU ({source})"
        if status == "fail":
            lead = f"does not fit: peak {size(result.peak)} per rank > {limit_text}"
        elif status == "warn":
            lead = (
                f"tight: peak above {HEADROOM:.0%} of the {limit_text}, before the CUDA "
                "context, NCCL buffers and fragmentation"
            )
        else:
            lead = f"fits the {limit_text}"
        notes = "".join(f"; {note}" for note in result.notes)
        return status, f"{lead}; {result.summary()}{notes}"

    def tiny_models(self, settings: Any) -> dict[str, Any]:
        """Configs of the tiny build's models, when the config uses them before they exist."""
        if not self.tiny or Path(settings.base_model, "transformer").is_dir():
            return {}
        from srpo.rewards.hpsv2 import TINY_CONFIG
        from srpo.tiny import tiny_transformer, tiny_vae

        def plain(model: Any) -> dict[str, Any]:
            return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}

        models: dict[str, Any] = {
            "transformer": plain(tiny_transformer(0)),
            "vae": plain(tiny_vae(0)),
            "published_metrics": False,
        }
        path = settings.reward.model_config_path
        if settings.reward.kind == "hpsv2" and path and not Path(path).is_file():
            models["reward"] = TINY_CONFIG
        return models

    def run(self) -> list[Check]:
        for check in (self.weights, self.prompts, self.environments, self.gpus, self.disk):
            check()
        return self.rows


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def diagnose(files: list[Path], gpu_memory: int | None = None) -> Doctor:
    """Every check of the workflow config `files`; `gpu_memory`: bytes of one GPU for the
    memory check (default: the visible GPU's, else 80 GB)."""
    doctor = Doctor(load_workflow_config(files), gpu_memory)
    doctor.run()
    return doctor
