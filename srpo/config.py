"""Validated training configuration: one YAML file, every key documented, errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from srpo.io import InputError
from srpo.scorers import METRICS, MIX, REWARD_KINDS, reward_kind, setting
from srpo.settings import SRPOSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


REWARD_PATHS = frozenset(
    setting.key for kind in REWARD_KINDS for setting in reward_kind(kind).settings if setting.file
)
"""Keys of `reward` that name a file, folder or hub id, of every kind (srpo.scorers)."""
RESUME_KEYS = (
    "reward", "srpo", "optim", "batch_size", "height", "width", "rollout_steps",
    "rollout_guidance", "train_guidance", "seed", "mode", "lora",
)  # fmt: skip
"""Training-config keys a resumed run must share with its checkpoint: what is trained, and how.
The rest (steps, checkpoint cadence, evaluation, precision and memory settings, paths, the
reward's files) may change between a stop and its resume."""
HPSV3_SCALE = 0.025
"""Default `reward.hpsv3_scale`. μ of a FLUX.1-dev image is about 10 (the HPSv3 paper's
benchmark), so the unscaled SRP reward ≈ w·μ + Δμ would sit above the loss's 0.7 threshold and
switch the loss off; 1/40 maps μ ≈ 10 to 0.25, the size of an HPSv2.1 cosine, so the threshold
acts as in the paper's HPSv2.1 recipe."""


def _meaning(key: str) -> str:
    """A `reward` key's description, as its kind declares it."""
    kind, declared = setting(key)
    return f"{kind}: {declared.meaning}"


class RewardConfig(_Section):
    """Which reward model scores the decoded images, and where its weights are."""

    kind: Literal[(*REWARD_KINDS, MIX)] = Field(  # type: ignore[valid-type]
        "hpsv2", description="reward model family; mix: a weighted sum of several (`mix`)"
    )
    checkpoint: str | None = Field(None, description=_meaning("checkpoint"))
    model_name: str = Field("ViT-H-14", description=_meaning("model_name"))
    model_config_path: str | None = Field(None, description=_meaning("model_config_path"))
    model_path: str | None = Field(None, description=_meaning("model_path"))
    processor_path: str | None = Field(None, description=_meaning("processor_path"))
    hpsv3_checkpoint: str | None = Field(None, description=_meaning("hpsv3_checkpoint"))
    hpsv3_config: str | None = Field(None, description=_meaning("hpsv3_config"))
    hpsv3_scale: float = Field(HPSV3_SCALE, gt=0, description=_meaning("hpsv3_scale"))
    mix: dict[str, float] | None = Field(
        None,
        description="mix: reward kind → weight, e.g. {hpsv2: 1.0, hpsv3: 0.5}; each kind's "
        "files are given by its own keys of this section",
    )

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(REWARD_KINDS))
        if unknown or not value:
            raise ValueError(f"unknown kind(s) {unknown}; expected some of {list(REWARD_KINDS)}")
        if not all(0 < weight < float("inf") for weight in value.values()):
            raise ValueError(f"weights must be positive and finite, got {value}")
        return value

    @model_validator(mode="after")
    def _check_mix_kind(self) -> RewardConfig:
        if self.kind == MIX and self.mix is None:
            raise ValueError("reward.mix: required for kind 'mix'")
        if self.kind != MIX and self.mix is not None:
            raise ValueError(f"reward.mix: only for kind 'mix', not {self.kind!r}")
        return self

    def kinds(self) -> list[str]:
        """The reward models this section loads: its kind, or the kinds of its mix."""
        return list(self.mix or {}) if self.kind == MIX else [self.kind]

    def paths_of(self, kind: str) -> list[str]:
        """The files or folders (or hub ids) of reward model `kind` that this section names."""
        return list(self._files(kind).values())

    def weight_paths(self) -> dict[str, str]:
        """Every file or folder (or hub id) the reward loads, by its key in this section."""
        return {key: value for kind in self.kinds() for key, value in self._files(kind).items()}

    def _files(self, kind: str) -> dict[str, str]:
        keys = (setting.key for setting in reward_kind(kind).settings if setting.file)
        return {key: getattr(self, key) for key in keys if getattr(self, key)}

    def load_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `srpo.rewards.load_reward` for this kind."""
        if self.kind == MIX:
            arguments = {kind: self._arguments(kind) for kind in self.kinds()}
            return {"weights": dict(self.mix or {}), "arguments": arguments}
        return self._arguments(self.kind)

    def _arguments(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of reward `kind`'s `load`; one line naming a missing key. An unset
        optional file is None, the loader's default."""
        arguments: dict[str, Any] = {}
        for declared in reward_kind(kind).settings:
            value = getattr(self, declared.key)
            if declared.file and not value:
                if declared.required:
                    raise InputError(f"reward.{declared.key}: required for kind '{kind}'")
                value = None
            elif declared.file and not declared.hub:
                value = Path(value)
            arguments[declared.argument] = value
        return arguments


class OptimConfig(_Section):
    """AdamW with a constant learning rate and grad-norm clipping (SPEC §3 step 6)."""

    learning_rate: float = Field(5e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(0.1, gt=0)
    fused: bool = Field(True, description="torch's fused AdamW kernel: one pass over memory")


class CollapseGuardConfig(_Section):
    """When held-out metrics say the training reward is being gamed (reward hacking)."""

    margins: dict[str, float] = Field(
        default_factory=dict,
        description="watched metric -> drop, in that metric's units, below its best held-out "
        "value so far that counts as collapse while the held-out training reward is above its "
        "value at that best evaluation",
    )
    stop: bool = Field(False, description="stop after a checkpoint (exit 4) instead of warning")

    @field_validator("margins")
    @classmethod
    def _check_margins(cls, value: dict[str, float]) -> dict[str, float]:
        for name, margin in value.items():
            if not margin > 0:
                raise ValueError(f"{name}: expected a margin > 0, got {margin}")
        return value


class EvaluationConfig(_Section):
    """Held-out evaluation during training: sample fixed prompts, score them with metrics the
    run does not train on, and watch for reward hacking (srpo/train/evaluate.py)."""

    every: int = Field(0, ge=0, description="steps between held-out evaluations; 0: none")
    embeddings: str | None = Field(
        None, description="index.json of an `srpo encode` cache of the held-out prompts"
    )
    max_prompts: int | None = Field(None, ge=1, description="the first N held-out prompts only")
    steps: int = Field(8, ge=1, description="Euler steps of the held-out sampling")
    guidance: float = Field(3.5, description="FLUX guidance of the held-out sampling")
    seed: int = Field(0, ge=0, description="noise seed; image i always gets the same noise")
    metrics: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="metric name -> its weight files, the keyword arguments of `srpo score` "
        "(e.g. aesthetic: {clip_checkpoint: …, mlp_checkpoint: …})",
    )
    batch_size: int = Field(
        8, ge=1, description="held-out prompts per rollout, decode and metric forward"
    )
    collapse: CollapseGuardConfig = CollapseGuardConfig()

    @model_validator(mode="after")
    def _check_enabled(self) -> EvaluationConfig:
        for name in self.metrics:
            if name not in METRICS:
                raise ValueError(
                    f"metrics.{name}: unknown metric; expected one of {', '.join(METRICS)}"
                )
        for name in self.collapse.margins:
            if name not in self.metrics:
                raise ValueError(
                    f"collapse.margins.{name}: not a watched metric; expected one of "
                    f"{sorted(self.metrics)}"
                )
        if self.every and not self.embeddings:
            raise ValueError("embeddings: required when `every` is set")
        if self.every and not self.metrics:
            raise ValueError("metrics: name at least one metric when `every` is set")
        return self


LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
"""The attention projections diffusers' FLUX LoRA scripts adapt: image and text streams."""


class LoraConfig(_Section):
    """Low-rank adapters (peft, through diffusers) trained instead of the whole transformer."""

    rank: int = Field(16, ge=1, description="rank r of each adapter's A (r×in) and B (out×r)")
    alpha: float | None = Field(
        None, gt=0, description="the update is scaled by alpha/rank; default: rank (scale 1)"
    )
    target_modules: tuple[str, ...] = Field(
        LORA_TARGETS,
        min_length=1,
        description="transformer modules to adapt, matched by name suffix as peft does",
    )
    export_merged: bool = Field(
        True,
        description="also export the adapters merged into the base: model/transformer/ and "
        "model/diffusion_pytorch_model.safetensors, which the workflow's sample rule and the "
        "quick start load",
    )


class TrainConfig(_Section):
    """Everything one `srpo train` run needs; paths are relative to the working directory."""

    base_model: str = Field(description="diffusers FLUX folder or hub id (FLUX.1-dev)")
    embeddings: str = Field(description="index.json of the `srpo encode` text-embedding cache")
    output_dir: str = Field(description="checkpoints, TensorBoard logs and the exported model")
    reward: RewardConfig = RewardConfig()
    srpo: dict[str, Any] = Field(
        default_factory=dict, description="SRPOSettings fields; missing ones take paper values"
    )
    optim: OptimConfig = OptimConfig()
    batch_size: int = Field(32, ge=1, description="global batch: prompts per optimizer step")
    max_steps: int = Field(19, ge=1, description="optimizer updates")
    height: int = Field(720, ge=16, multiple_of=16, description="training image height, px")
    width: int = Field(720, ge=16, multiple_of=16, description="training image width, px")
    rollout_steps: int = Field(25, ge=1, description="Euler steps of the no-grad rollout")
    rollout_guidance: float = Field(1.0, description="FLUX guidance during the rollout")
    train_guidance: float = Field(3.5, description="FLUX guidance of the two branch steps")
    seed: int = Field(42, ge=0)
    mode: Literal["online", "offline"] = Field(
        "online", description="online: x0 from rollouts; offline: x0 from real images"
    )
    offline_images: str | None = Field(
        None, description="offline mode: folder of <prompt index>.png images"
    )
    precision: Literal["fsdp-bf16", "autocast-bf16", "fp32"] = Field(
        "fsdp-bf16",
        description="fsdp-bf16: FSDP2 casts the transformer's parameters to bf16, VAE bf16, "
        "reward fp32; autocast-bf16: the authors' recipe, fp32 parameters with the transformer "
        "and VAE under bf16 autocast and the reward under fp16 autocast; fp32 (srpo/train/"
        "precision.py; cost and deviation: benchmarks/README.md)",
    )
    activation_checkpointing: bool = True
    gather_params: Literal["first_call", "rollout", "step", "forward"] = Field(
        "first_call",
        description="how long an FSDP2 block keeps its all-gathered parameters. first_call: "
        "through the no-grad rollout and the first branch call's forward and backward, each "
        "block freed after its own backward (one gather per block for the step when a rank "
        "holds one sample; full parameters in memory through that call's VAE decode and "
        "reward); rollout: through the rollout and the first call's forward, freed before its "
        "VAE decode (one gather more; the lowest peak of the fast scopes); step: through the "
        "whole step (every call's forward and backward); forward: one forward (FSDP2's "
        "default)",
    )
    fuse_branches: bool = Field(
        True,
        description="the two Direct-Align branches of a sample take their model step in one "
        "transformer call of batch 2 (half the branches' all-gathers and reduce-scatters, twice "
        "the rows per matmul; the transformer's activations of both at once); false: one call "
        "per branch. Decode and reward run one branch at a time either way",
    )
    vae_tiling: bool = False
    vae_slicing: bool = False
    checkpoint_every: int = Field(10, ge=1, description="steps between DCP checkpoints")
    stop_grace_s: float = Field(
        25.0,
        gt=0,
        description="seconds between a stop signal and the launcher's SIGKILL (torchrun "
        "--shutdown-timeout, 30 by default, less a margin): the step in flight finishes, then "
        "a checkpoint is written only if the run's last save took no longer than what is left",
    )
    max_bad_steps: int = Field(
        3,
        ge=1,
        description="updates skipped in a row for a NaN/Inf loss or gradient before the run "
        "stops (the last checkpoint, written before them, stays the newest)",
    )
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters instead of the whole transformer; null: full"
    )
    evaluation: EvaluationConfig = EvaluationConfig()
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept on disk")
    export_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    log_every: int = Field(1, ge=1)

    @field_validator("srpo")
    @classmethod
    def _check_srpo(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(SRPOSettings)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; expected some of {sorted(known)}")
        SRPOSettings(**value)
        return value

    @model_validator(mode="after")
    def _check_reward_weights(self) -> TrainConfig:
        """The weights the reward kind needs, checked with the rest of the config."""
        if "reward" in self.model_fields_set:
            self.reward.load_arguments()
        return self

    @model_validator(mode="after")
    def _check_watched_metrics(self) -> TrainConfig:
        """A held-out metric made of the reward's own files cannot reveal hacking."""
        trained = {
            Path(value).resolve()
            for value in self.reward.model_dump().values()
            if isinstance(value, str) and Path(value).exists()
        }
        for name, paths in self.evaluation.metrics.items():
            files = {Path(value).resolve() for value in paths.values() if Path(value).exists()}
            if files and files <= trained:
                raise ValueError(
                    f"evaluation.metrics.{name}: its files are the training reward's; watch "
                    "metrics the run does not train on"
                )
        return self

    def settings(self) -> SRPOSettings:
        return SRPOSettings(**self.srpo)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    if key == "<root>" or message.startswith(f"{key}."):  # the check names its key
        return f"{source}: {message}"
    return f"{source}: {key}: {message}"


def load_train_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a YAML config; any problem is one InputError line naming the key.

    `overrides` (None values ignored) replace keys; a dotted key such as
    `evaluation.embeddings` replaces one key of a section."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of keys at the top level")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, key = dotted.split(".")
        target = raw
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise InputError(f"{path}: {section}: expected a mapping of keys")
        target[key] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise InputError(_format_error(str(path), error)) from None


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first of RESUME_KEYS (`section.key` inside the reward and optim sections) whose value
    in a checkpoint's config `saved` differs from `current` (both `TrainConfig.to_dict`), as
    (key, saved, current); None if they agree. A key `saved` lacks, added to the config after
    it was written, is not compared."""
    for key in RESUME_KEYS:
        if key not in saved:
            continue
        old, new = saved[key], current.get(key)
        if key in ("reward", "optim") and isinstance(old, dict) and isinstance(new, dict):
            for field in sorted(set(old) - REWARD_PATHS):
                if old[field] != new.get(field):
                    return f"{key}.{field}", old[field], new.get(field)
        elif old != new:
            return key, old, new
    return None
