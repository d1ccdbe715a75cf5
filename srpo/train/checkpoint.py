"""DCP checkpoints with exact resume, and the export users load with the stock FluxPipeline.

A checkpoint is the folder `step-NNNNNNNN/` holding the sharded model + AdamW state written by
`torch.distributed.checkpoint`, one RNG file per rank, `train_state.json` and
`provenance.json`. It is written as `.step-NNNNNNNN.partial/` and renamed only when every rank
has finished, so a run killed mid-write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from srpo.io import InputError, atomic_path, write_json

STEP_PATTERN = re.compile(r"^step-(\d{8})$")
TRAIN_STATE = "train_state.json"
EXPORT_SOURCE = "source.json"
PAUSE_ENV = "SRPO_CHECKPOINT_PAUSE_S"
"""Seconds to wait between writing a checkpoint's data and publishing it; widens the window in
which the crash-during-write test kills a run. Zero (no wait) unless set."""


class CheckpointError(InputError):
    """A checkpoint that is missing or cannot be read."""


class TrainingState(Stateful):
    """Model + optimizer as DCP sees them: sharded on save, resharded on load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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

    def save(self, step: int, state: TrainingState, train_state: dict, provenance: dict) -> Path:
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
            write_json(partial / TRAIN_STATE, train_state)
            time.sleep(float(os.environ.get(PAUSE_ENV, "0")))
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

    def load(self, path: Path, state: TrainingState) -> dict:
        """Restore model, optimizer and this rank's RNG; return the saved train state."""
        path = Path(path)
        if not (path / TRAIN_STATE).is_file() or not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (missing {TRAIN_STATE})")
        try:
            train_state = json.loads((path / TRAIN_STATE).read_text())
            dcp.load({"app": state}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as error:
            raise CheckpointError(f"{path}: checkpoint is unreadable ({_reason(error)})") from None
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        if rng_file.is_file():
            restore_rng_states(torch.load(rng_file, weights_only=False))
        return train_state


def export_checkpoint(
    checkpoint: Path, base_model: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a checkpoint's transformer as (a) `transformer/` and (b) one safetensors file.

    (b) is `out_dir/diffusion_pytorch_model.safetensors`, the state dict the released SRPO
    quick start loads with `pipe.transformer.load_state_dict(load_file(...))`. Runs in one
    process without a process group: DCP reads the shards of any world size.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (missing .metadata)")
    config = FluxTransformer2DModel.load_config(base_model, subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model_state = {
        name: torch.empty_like(tensor, device="cpu") for name, tensor in model.state_dict().items()
    }
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"app": {"model": model_state}}, checkpoint_id=str(checkpoint))
    except (Exception, CheckpointException) as error:
        reason = _reason(error)
        raise CheckpointError(f"{checkpoint}: checkpoint is unreadable ({reason})") from None
    model.load_state_dict({k: v.to(dtype) for k, v in model_state.items()}, assign=True)
    with atomic_path(Path(out_dir)) as staged:
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
    """Export unless `out_dir` already holds the export of this very checkpoint."""
    source = Path(out_dir) / EXPORT_SOURCE
    if source.is_file() and json.loads(source.read_text()).get("step") == step_of(checkpoint):
        return Path(out_dir)
    return export_checkpoint(checkpoint, base_model, out_dir, dtype)
