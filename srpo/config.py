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

from srpo.algorithm import SRPOSettings
from srpo.io import InputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardConfig(_Section):
    """Which reward model scores the decoded images, and where its weights are."""

    kind: Literal["hpsv2", "pickscore"] = Field("hpsv2", description="reward model family")
    checkpoint: str | None = Field(
        None, description="hpsv2: path of HPS_v2.1_compressed.pt ({'state_dict': ...})"
    )
    model_name: str = Field("ViT-H-14", description="hpsv2: open_clip architecture name")
    model_config_path: str | None = Field(
        None, description="hpsv2: open_clip model-config JSON for a non-built-in architecture"
    )
    model_path: str | None = Field(None, description="pickscore: CLIPModel folder or hub id")
    processor_path: str | None = Field(
        None, description="pickscore: CLIP processor folder or hub id (default: model_path)"
    )

    def load_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `srpo.rewards.load_reward` for this kind."""
        if self.kind == "hpsv2":
            if not self.checkpoint:
                raise InputError("reward.checkpoint: required for kind 'hpsv2'")
            arguments: dict[str, Any] = {
                "checkpoint": Path(self.checkpoint),
                "model_name": self.model_name,
            }
            if self.model_config_path:
                arguments["model_config"] = Path(self.model_config_path)
            return arguments
        if not self.model_path:
            raise InputError("reward.model_path: required for kind 'pickscore'")
        return {"model_path": self.model_path, "processor_path": self.processor_path}


class OptimConfig(_Section):
    """AdamW with a constant learning rate and grad-norm clipping (SPEC §3 step 6)."""

    learning_rate: float = Field(5e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(0.1, gt=0)
    fused: bool = Field(True, description="torch's fused AdamW kernel: one pass over memory")


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
    gather_params: Literal["rollout", "step", "forward"] = Field(
        "rollout",
        description="how long an FSDP2 block keeps its all-gathered parameters: through the "
        "no-grad rollout (one gather instead of 25; full parameters, no gradients, in memory), "
        "through the whole step (also the branches' forward and backward; full parameters in "
        "memory while the gradients are), or one forward (FSDP2's default)",
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
    """Read and validate a YAML config; any problem is one InputError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of keys at the top level")
    raw.update({key: value for key, value in (overrides or {}).items() if value is not None})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise InputError(_format_error(str(path), error)) from None
