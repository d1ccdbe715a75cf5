"""Config validation and every piece of Python the rules use; rules hold no logic."""

import os

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
    return CONTAINER_IMAGES.get(CONTAINER_RULES.get(rule_name))


def check_containers():
    """Stop before any job, with one line, if a job would run outside its image."""
    missing_images = set()
    for step in workflow.rules:
        if step.shellcmd is None and step.run_func is None:
            continue
        env = CONTAINER_RULES.get(step.name)
        if env is None:
            raise WorkflowError(
                f"config/containers.yaml: containers.rules has no environment for {step.name}"
            )
        if CONTAINER_IMAGES.get(env) is None:
            missing_images.add(env)
        elif step.container_img != CONTAINER_IMAGES[env]:
            raise WorkflowError(
                f"{step.name}: container: {step.container_img!r} is not the image of its"
                f" environment {env} ({CONTAINER_IMAGES[env]}); use image_of({step.name!r})"
            )
    if missing_images:
        raise WorkflowError(
            f"config/containers.yaml: containers.images.{{{','.join(sorted(missing_images))}}}"
            " is null: build and push the images first (bash containers/build.sh --push"
            " REGISTRY), or run without --sdm apptainer"
        )


def list_containers():
    """Each step's environment and image, so that a dry run shows the image of every job."""
    lines = [
        f"    {step.name:<20} {CONTAINER_RULES[step.name]:<12} {step.container_img}"
        for step in sorted(workflow.rules, key=lambda step: step.name)
        if step.container_img
    ]
    logger.info("Container images (step, environment, image):\n" + "\n".join(lines))


def resources(rule_name, key, fallback=None):
    table = config["resources"]
    return {**table["default"], **table.get(rule_name, {})}.get(key, fallback)


def launcher(procs):
    """`srpo` for one process, `torchrun … -m srpo` for several (one node)."""
    if procs <= 1:
        return "srpo"
    return f"torchrun --standalone --nproc-per-node {procs} -m srpo"


def train_launcher():
    """torchrun inside the training job: one node (standalone) or, when the config asks for
    several, one torchrun per node started by srun, meeting at the job's first node."""
    procs = config["train"].get("nproc_per_node", 1)
    nodes = config["train"].get("nodes", 1)
    if nodes == 1:
        return launcher(procs)
    first_node = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (
        f"srun --ntasks-per-node 1 torchrun --nnodes {nodes} --nproc-per-node {procs}"
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


def metric_weights(metric):
    weights = config["metrics"][metric]["weights"]
    return " ".join(f"--weight {key}={value}" for key, value in sorted(weights.items()))


def metric_files(metric):
    """The tiny build when the metric's weights come from it; real weights are not tracked."""
    weights = config["metrics"][metric]["weights"].values()
    local = [w for w in weights if w.startswith(f"{OUT}/models/")]
    return model_files() if local else []


def samples_option():
    return " ".join(f"--samples {model_label(m)}={OUT}/samples/{m}" for m in MODELS)


def score_files():
    return [f"{OUT}/scores/{metric}.parquet" for metric in config["metrics"]]
