"""DCP checkpoints with exact resume, and the export users load with the stock FluxPipeline.

A checkpoint is the folder `step-NNNNNNNN/` holding the sharded model + AdamW state written by
`torch.distributed.checkpoint`, one RNG file per rank, `train_state.json` and
`provenance.json`. The model state is the trainable parameters only: the whole transformer, or
under `lora` the adapters alone (the frozen base is read again from `base_model`). It is written
as `.step-NNNNNNNN.partial/` and renamed only when every rank has finished, so a run killed
mid-write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from srpo.config import LoraConfig
from srpo.io import InputError, atomic_path, write_json
from srpo.train.lora import add_lora, merge_lora, save_lora_weights

STEP_PATTERN = re.compile(r"^step-(\d{8})$")
TRAIN_STATE = "train_state.json"
EXPORT_SOURCE = "source.json"


class CheckpointError(InputError):
    """A checkpoint that is missing or cannot be read."""


class ModelOptimizerState(Stateful):
    """Model + optimizer as DCP sees them: sharded on save, resharded on load.

    Frozen parameters are left out, so a LoRA checkpoint holds the adapters and their AdamW
    state only. Loading is therefore not strict about the model's keys; DCP itself still fails
    on a trainable key that the checkpoint lacks.
    """

    SAVE = StateDictOptions(ignore_frozen_params=True)
    LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.SAVE)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.LOAD,
        )


def rng_states() -> dict[str, Any]:
    """This process's generators. Of the GPUs only the current one: each rank draws on its own
    device, and a list of every visible GPU could not be restored where a process sees fewer
    (one GPU per process on resume, say)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states()`; from the files of earlier versions, which hold a list of every
    visible GPU's state, this process's GPU takes its own entry, or keeps its state if the list
    is too short to have one."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, list | tuple):
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


def _reason(error: BaseException) -> str:
    """One line for a failed DCP read: the first rank's own error, not DCP's wrapper text.

    DCP's CheckpointException derives from BaseException and carries per-rank failures.
    """
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        if isinstance(error, tuple):  # (exception, traceback summary)
            error = error[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def step_of(path: Path) -> int:
    match = STEP_PATTERN.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected step-NNNNNNNN)")
    return int(match.group(1))


class Checkpointer:
    """Save / find / load the checkpoints of one run folder; keeps the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int, rank: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder is complete once it has its final name)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        checkpoints = self.complete()
        return checkpoints[-1] if checkpoints else None

    def save(self, step: int, state: ModelOptimizerState, counters: dict, provenance: dict) -> Path:
        """Collective: every rank writes its shard, then rank 0 publishes the folder."""
        final = self.root / f"step-{step:08d}"
        partial = self.root / f".step-{step:08d}.partial"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        dcp.save({"app": state}, checkpoint_id=str(partial))
        torch.save(rng_states(), partial / f"rng-rank{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            write_json(partial / "provenance.json", provenance)
            write_json(partial / TRAIN_STATE, counters)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for stale in self.complete()[: -self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for partial in self.root.glob(".step-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def run_config(self, path: Path) -> dict:
        """The training config a checkpoint was written with (its provenance); {} if absent."""
        provenance = Path(path) / "provenance.json"
        if not provenance.is_file():
            return {}
        try:
            return json.loads(provenance.read_text()).get("config") or {}
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{provenance}: unreadable ({_reason(error)})") from None

    def train_state(self, path: Path) -> dict:
        """A complete checkpoint's `train_state.json`, read before any tensor is."""
        path = Path(path)
        if not (path / TRAIN_STATE).is_file() or not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (missing {TRAIN_STATE})")
        try:
            return json.loads((path / TRAIN_STATE).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: checkpoint is unreadable ({_reason(error)})") from None

    def load(self, path: Path, state: ModelOptimizerState) -> dict:
        """Restore model, optimizer and this rank's RNG; return the saved train state."""
        path = Path(path)
        train_state = self.train_state(path)
        try:
            dcp.load({"app": state}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as error:
            raise CheckpointError(f"{path}: checkpoint is unreadable ({_reason(error)})") from None
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        if rng_file.is_file():
            restore_rng_states(torch.load(rng_file, weights_only=False))
        return train_state


def _read_model_state(checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` (tensors named as the model's parameters) from a checkpoint's DCP shards."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"app": {"model": state}}, checkpoint_id=str(checkpoint))
    except (Exception, CheckpointException) as error:
        reason = _reason(error)
        raise CheckpointError(f"{checkpoint}: checkpoint is unreadable ({reason})") from None


def _lora_of(checkpoint: Path) -> LoraConfig | None:
    """The run's `lora` section, from the config in the provenance every checkpoint holds."""
    provenance = checkpoint / "provenance.json"
    if not provenance.is_file():
        return None
    section = json.loads(provenance.read_text()).get("config", {}).get("lora")
    return None if section is None else LoraConfig.model_validate(section)


def _full_transformer(checkpoint: Path, base_model: str, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's whole transformer, built on the meta device and filled from DCP."""
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(base_model, subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model_state = {
        name: torch.empty_like(tensor, device="cpu") for name, tensor in model.state_dict().items()
    }
    _read_model_state(checkpoint, model_state)
    model.load_state_dict({k: v.to(dtype) for k, v in model_state.items()}, assign=True)
    return model


def _adapted_transformer(checkpoint: Path, base_model: str, lora: LoraConfig) -> torch.nn.Module:
    """The fp32 base transformer with the checkpoint's adapters on it."""
    from srpo.flux import load_transformer

    model = load_transformer(base_model)
    add_lora(model, lora, seed=0)  # every adapter weight is then read from the checkpoint
    parameters = dict(model.named_parameters())
    state = {name: torch.empty_like(p) for name, p in parameters.items() if p.requires_grad}
    _read_model_state(checkpoint, state)
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)
    return model


def export_checkpoint(
    checkpoint: Path, base_model: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a checkpoint's transformer as (a) `transformer/` and (b) one safetensors file.

    (b) is `out_dir/diffusion_pytorch_model.safetensors`, the state dict the released SRPO
    quick start loads with `pipe.transformer.load_state_dict(load_file(...))`. Runs in one
    process without a process group: DCP reads the shards of any world size.

    A LoRA run's checkpoint (its provenance config has a `lora` section) holds only adapters:
    they go on the base weights and are written as `pytorch_lora_weights.safetensors`, which
    `pipe.load_lora_weights(out_dir)` loads; with `lora.export_merged` they are also merged in
    fp32 into (a) and (b).
    """
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (missing .metadata)")
    lora = _lora_of(checkpoint)
    if lora is None:
        model = _full_transformer(checkpoint, base_model, dtype)
    else:
        model = _adapted_transformer(checkpoint, base_model, lora)
    with atomic_path(Path(out_dir)) as staged:
        if lora is not None:
            save_lora_weights(model, staged, dtype)
            merge_lora(model)
            model.load_state_dict(
                {k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True
            )
        if lora is None or lora.export_merged:
            model.save_pretrained(staged / "transformer", safe_serialization=True)
            save_file(
                {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
                str(staged / "diffusion_pytorch_model.safetensors"),
            )
        shutil.copy(checkpoint / "provenance.json", staged / "provenance.json")
        write_json(
            staged / EXPORT_SOURCE, {"checkpoint": checkpoint.name, "step": step_of(checkpoint)}
        )
    return Path(out_dir)


def ensure_export(
    checkpoint: Path, base_model: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Export unless `out_dir` already holds the whole export of this very checkpoint (a
    workflow re-run deletes the declared output file, not the folder around it)."""
    out_dir = Path(out_dir)
    source = out_dir / EXPORT_SOURCE
    lora = _lora_of(Path(checkpoint))
    written = [
        *(["pytorch_lora_weights.safetensors"] if lora is not None else []),
        *(["diffusion_pytorch_model.safetensors"] if lora is None or lora.export_merged else []),
    ]
    if (
        source.is_file()
        and json.loads(source.read_text()).get("step") == step_of(checkpoint)
        and all((out_dir / name).is_file() for name in written)
    ):
        return out_dir
    return export_checkpoint(checkpoint, base_model, out_dir, dtype)
