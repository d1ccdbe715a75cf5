"""Config validation and every piece of Python the rules use; rules hold no logic."""

import json
import math
import os
import shlex
import sys

import yaml
from jsonschema import Draft202012Validator
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate


def check_config(config, schema_file):
    """One line naming the first offending key (`sample.steps: 'many' is not of type …`)."""
    with open(schema_file) as handle:
        schema = yaml.safe_load(handle)
    for error in sorted(Draft202012Validator(schema).iter_errors(config), key=str):
        key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
        raise WorkflowError(f"config: {key}: {error.message}")


check_config(
    config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")
)
validate(config, schema="../schemas/config.schema.yaml")

RUN = config["run"]
OUT = f"results/{RUN}"
MODELS = ("base", "srpo")
SHARDS = config["sample"]["shards"]
EXPORT = f"{OUT}/train/model/diffusion_pytorch_model.safetensors"
WORKFLOW_CONFIGS = list(workflow.overwrite_configfiles) or ["config/config.yaml"]
"""The workflow config file(s) this run reads (the command line's, else the tiny default)."""


def scored_metrics():
    """`scored_metrics`, each checked against `metrics:`; every configured metric by default."""
    scored = config.get("scored_metrics") or list(config["metrics"])
    for metric in scored:
        if metric not in config["metrics"]:
            raise WorkflowError(
                f"config: scored_metrics: {metric!r} has no settings under metrics:"
            )
    return scored


SCORED = scored_metrics()


def config_overrides():
    """`--config KEY=VALUE` of the command line, as `srpo report --config-override` options
    (not the `--configfile` keys, which Snakemake's overwrite_config holds too)."""
    overrides = workflow.config_settings.config or {}
    return " ".join(
        shlex.quote(f"--config-override={key}={json.dumps(value)}")
        for key, value in sorted(overrides.items())
    )


wildcard_constraints:
    model="|".join(MODELS),
    shard=r"\d+",


def base_model():
    """The FLUX base: the tiny one this workflow builds, or the configured folder / hub id."""
    if config["tiny_models"]:
        return f"{OUT}/models/flux"
    if not config.get("base_model"):
        raise ValueError("config: base_model is required when tiny_models is false")
    return config["base_model"]


def model_files():
    """Inputs that make the base model exist (the tiny build) — nothing for real weights."""
    return [f"{OUT}/models/manifest.json"] if config["tiny_models"] else []


CONTAINER_IMAGES = config["containers"]["images"]
CONTAINER_RULES = config["containers"]["rules"]


def image_of(rule_name):
    """The image (by digest) of the rule's environment in config/containers.yaml; None, so no
    container, while the images are not built (containers.smk refuses --sdm apptainer then).
    """
    return CONTAINER_IMAGES.get(rule_env(rule_name))


def command_steps():
    """The rules that run a command (`rule all` runs nothing)."""
    return [
        s for s in workflow.rules if s.shellcmd is not None or s.run_func is not None
    ]


def unpublished(envs):
    """`containers.images.{a,b}` for the environments without an image, "" if all have one."""
    missing = sorted({env for env in envs if CONTAINER_IMAGES.get(env) is None})
    return f"containers.images.{{{','.join(missing)}}}" if missing else ""


def check_containers():
    """Stop before any job, with one line, if a job would run outside its image."""
    for step in command_steps():
        env = CONTAINER_RULES.get(step.name)
        if env is None:
            raise WorkflowError(
                f"config/containers.yaml: containers.rules has no environment for {step.name}"
            )
        env = rule_env(step.name)
        if (
            CONTAINER_IMAGES.get(env) is not None
            and step.container_img != CONTAINER_IMAGES[env]
        ):
            raise WorkflowError(
                f"{step.name}: container: {step.container_img!r} is not the image of its"
                f" environment {env} ({CONTAINER_IMAGES[env]}); use image_of({step.name!r})"
            )
    missing = unpublished(rule_env(step.name) for step in command_steps())
    if missing:
        raise WorkflowError(
            f"config/containers.yaml: {missing} is null: build and push the images first"
            " (bash containers/build.sh --push REGISTRY), or run without --sdm apptainer"
        )


def linting():
    """`snakemake --lint`: Snakemake gives the Snakefile no other sign of it."""
    return "--lint" in sys.argv


def lint_unpublished_images():
    """Under --lint before any image is published, one notice instead of a missing-container
    lint per rule: the rules of unpublished environments get a stand-in reference for the lint
    (nothing runs under --lint)."""
    steps = [s for s in command_steps() if s.container_img is None]
    missing = unpublished(rule_env(step.name) for step in steps)
    if not missing:
        return
    logger.warning(
        f"containers: no image published yet (config/containers.yaml: {missing} is null), so"
        f" {len(steps)} rules have no container: until `bash containers/build.sh --push"
        " REGISTRY` writes their digests; the lint's container check waits for that"
    )
    for step in steps:
        step.container_img = f"unpublished:srpo-{rule_env(step.name)}"


def list_containers():
    """Each step's environment and image, so that a dry run shows the image of every job."""
    lines = [
        f"    {step.name:<20} {rule_env(step.name):<12} {step.container_img}"
        for step in sorted(workflow.rules, key=lambda step: step.name)
        if step.container_img
    ]
    logger.info("Container images (step, environment, image):\n" + "\n".join(lines))


WEIGHTS = config.get("weights") or {}


def verify_options(*paths):
    """`--verify PATH=SHA256` for every `weights:` entry with a hash that is one of `paths` or
    lies under one of them (a model folder): the rule's command checks them before computing.
    """
    roots = [str(path).rstrip("/") for path in paths if path]
    chosen = sorted(
        (entry["path"], entry["sha256"])
        for entry in WEIGHTS.values()
        if entry.get("sha256")
        and any(
            entry["path"] == root or entry["path"].startswith(f"{root}/")
            for root in roots
        )
    )
    return " ".join(shlex.quote(f"--verify={path}={digest}") for path, digest in chosen)


def train_settings():
    """The training config's keys (empty if it cannot be read: `srpo train` then says why)."""
    try:
        with open(config["train"]["config"]) as handle:
            settings = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return {}
    return settings if isinstance(settings, dict) else {}


def held_out_embeddings():
    """The held-out prompts' embedding cache when the training config evaluates during
    training (`evaluation.every`), else nothing: `encode_held_out` runs only then."""
    evaluation = train_settings().get("evaluation") or {}
    if isinstance(evaluation, dict) and evaluation.get("every"):
        return f"{OUT}/embeddings-held-out/index.json"
    return []


def train_reward():
    """The training config's `reward:` section, or None if it is invalid: `srpo train` then
    says why."""
    from pydantic import ValidationError
    from srpo.config import RewardConfig

    try:
        return RewardConfig.model_validate(train_settings().get("reward") or {})
    except ValidationError:
        return None


TRAIN_REWARD = train_reward()
TRAIN_REWARD_KINDS = TRAIN_REWARD.kinds() if TRAIN_REWARD else []
"""The reward models training loads: its kind, or each kind of its `mix`."""


def train_reward_paths():
    """The reward weights the training config names (every model of a `mix` too)."""
    return list(TRAIN_REWARD.weight_paths().values()) if TRAIN_REWARD else []


def resources(rule_name, key, fallback=None):
    table = config["resources"]
    return {**table["default"], **table.get(rule_name, {})}.get(key, fallback)


def launcher(procs, *options, env="main"):
    """`srpo` for one process, `torchrun … -m srpo` for several (one node), each of the
    environment `env`."""
    if procs <= 1:
        return srpo_of(env)
    return " ".join(
        [
            torchrun_of(env),
            *options,
            "--standalone",
            f"--nproc-per-node {procs}",
            "-m srpo",
        ]
    )


STOP_MARGIN_S = 5
"""Seconds torchrun waits beyond the trainer's stop_grace_s before it SIGKILLs the workers."""


def train_launcher():
    """torchrun inside the training job: one node (standalone) or, when the config asks for
    several, one torchrun per node started by srun, meeting at the job's first node. On a stop
    signal torchrun forwards it and waits stop_grace_s (+ a margin) for the checkpoint.
    """
    procs = config["train"].get("nproc_per_node", 1)
    nodes = config["train"].get("nodes", 1)
    grace = float(train_settings().get("stop_grace_s", 25))
    wait = f"--shutdown-timeout {math.ceil(grace) + STOP_MARGIN_S}"
    if nodes == 1:
        return launcher(procs, wait, env=TRAIN_ENV)
    first_node = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (
        f"srun --ntasks-per-node 1 {torchrun_of(TRAIN_ENV)} {wait} --nnodes {nodes}"
        f" --nproc-per-node {procs}"
        f" --rdzv-id $SLURM_JOB_ID --rdzv-backend c10d --rdzv-endpoint {first_node}:29500"
        " -m srpo"
    )


def train_gpus(kind):
    """GPUs of the training job: `gpu` (sbatch --gpus, all on the one node) for one node,
    `gres` (--gres=gpu:N on every node) for several."""
    gpus = resources("train_srpo", "gpu")
    several = config["train"].get("nodes", 1) > 1
    if kind == "gres":
        return f"gpu:{gpus}" if several and gpus else ""
    return 0 if several else gpus


def transformer_option(wildcards):
    return "" if wildcards.model == "base" else f"--transformer {EXPORT}"


def transformer_input(wildcards):
    return [] if wildcards.model == "base" else [EXPORT]


def model_label(model):
    return config["report"]["baseline" if model == "base" else "trained"]


def rule_env(rule_name):
    """The environment a rule runs in (config/containers.yaml); train_srpo's follows its
    training reward (`train_env`)."""
    if rule_name == "train_srpo":
        return TRAIN_ENV
    return CONTAINER_RULES.get(rule_name, "main")


def metric_env(metric):
    return CONTAINER_RULES.get(f"score_{metric}", "main")


def train_env():
    """train_srpo's environment: config/containers.yaml's `train_srpo` (main), unless a reward
    model training loads needs another one, that of its score_<kind> (`score_hpsv3` → hpsv3),
    whose package pins what main cannot hold. Two such environments cannot meet in one process.
    """
    default = CONTAINER_RULES.get("train_srpo", "main")
    needed = {kind: metric_env(kind) for kind in TRAIN_REWARD_KINDS}
    others = sorted(set(needed.values()) - {default})
    if len(others) > 1:
        raise WorkflowError(
            f"{config['train']['config']}: reward: {sorted(needed)} need the environments"
            f" {others}, which cannot run in one training process; train with the rewards of"
            " one environment"
        )
    return others[0] if others else default


TRAIN_ENV = train_env()


def srpo_of(env):
    """The `srpo` command of an environment: `srpo` in main, `srpo-ENV` in a metric
    environment (envs/metric-env.sh puts it on the main environment's PATH, in the image of
    ENV too)."""
    return "srpo" if env == "main" else f"srpo-{env}"


def torchrun_of(env):
    """The `torchrun` of an environment, `torchrun-ENV` beside `srpo-ENV` (envs/metric-env.sh):
    its workers run that environment's interpreter."""
    return "torchrun" if env == "main" else f"torchrun-{env}"


def metric_command(metric):
    return config["metrics"][metric].get("command") or srpo_of(metric_env(metric))


def metric_verify(metric):
    return verify_options(*config["metrics"][metric]["weights"].values())


def metric_weights(metric):
    weights = config["metrics"][metric]["weights"]
    return " ".join(
        shlex.quote(f"--weight={key}={value}") for key, value in sorted(weights.items())
    )


def metric_env_parts():
    """Models built in an environment of their own (build_tiny_<m>): those of the metrics
    and of the training reward whose score rule runs outside main."""
    names = dict.fromkeys([*config["metrics"], *TRAIN_REWARD_KINDS])
    return [name for name in names if metric_env(name) != "main"]


def tiny_manifest(part, paths):
    """The tiny build that makes `paths` of model `part` (its own manifest for a part of
    another environment); none when no path lies under the tiny models (real weights).
    """
    if not any(str(path).startswith(f"{OUT}/models/") for path in paths):
        return []
    if part in metric_env_parts():
        return [f"{OUT}/models/manifest-{part}.json"]
    return model_files()


def train_model_files():
    """The tiny builds training reads: the FLUX base and each reward model's."""
    reward = [
        manifest
        for kind in TRAIN_REWARD_KINDS
        for manifest in tiny_manifest(kind, TRAIN_REWARD.paths_of(kind))
    ]
    return list(dict.fromkeys([*model_files(), *reward]))


def metric_files(metric):
    """The tiny build when the metric's weights come from it; real weights are not tracked."""
    return tiny_manifest(metric, config["metrics"][metric]["weights"].values())


def samples_option():
    return " ".join(
        shlex.quote(f"--samples={model_label(m)}={OUT}/samples/{m}") for m in MODELS
    )


def score_files():
    return [f"{OUT}/scores/{metric}.parquet" for metric in SCORED]
