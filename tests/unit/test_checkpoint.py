"""The RNG file of a checkpoint: this process's GPU only, so a resume that sees fewer GPUs
works, and files of the old every-GPU layout still load."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from srpo.train.checkpoint import restore_rng_states, rng_states


class FakeCuda:
    """torch.cuda's per-device RNG functions for `visible` GPUs of which `current` is this
    process's; GPU i's state is a tensor filled with i until set. torch's own
    `get_rng_state_all` / `set_rng_state_all` run on top of them, so the old code meets the
    IndexError a real resume does."""

    def __init__(self, visible: int, current: int) -> None:
        self.visible, self.current = visible, current
        self.states = {index: filled(index) for index in range(visible)}

    def _index(self, device: int | str | torch.device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = self.current if device.index is None else device.index
        if not 0 <= index < self.visible:  # as torch.cuda.default_generators[index] does
            raise IndexError("tuple index out of range")
        return index

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
            monkeypatch.setattr(module, "device_count", lambda: self.visible)
            monkeypatch.setattr(module, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return self


def filled(value: int) -> torch.Tensor:
    """A stand-in RNG state."""
    return torch.full((8,), value, dtype=torch.uint8)


def saved_and_reloaded(states: dict, tmp_path: Path) -> dict:
    """`states` as `Checkpointer.load` reads them back."""
    path = tmp_path / "rng-rank00005.pt"
    torch.save(states, path)
    return torch.load(path, weights_only=False)


def test_a_resume_on_fewer_visible_gpus_restores_this_gpus_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Saved by local rank 5 of a node showing 8 GPUs, restored by a process that sees one
    (CUDA_VISIBLE_DEVICES per rank): its GPU 0 gets what GPU 5 had."""
    with monkeypatch.context() as patch:
        FakeCuda(visible=8, current=5).install(patch)
        states = saved_and_reloaded(rng_states(), tmp_path)
    python_after_save = random.random()
    with monkeypatch.context() as patch:
        resumed = FakeCuda(visible=1, current=0).install(patch)
        restore_rng_states(states)
    assert torch.equal(resumed.states[0], filled(5))
    assert random.random() == python_after_save, "the CPU generators are restored too"


def test_a_checkpoint_of_every_visible_gpu_still_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The old layout, a list of every visible GPU's state: this process's entry is taken, and
    a list too short to have it is passed over, not an IndexError."""
    old = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": [filled(10 + index) for index in range(2)],
    }
    states = saved_and_reloaded(old, tmp_path)
    with monkeypatch.context() as patch:
        same = FakeCuda(visible=2, current=1).install(patch)
        restore_rng_states(states)
    assert torch.equal(same.states[1], filled(11))
    assert torch.equal(same.states[0], filled(0)), "GPU 0 untouched"
    with monkeypatch.context() as patch:
        beyond = FakeCuda(visible=4, current=3).install(patch)
        restore_rng_states(states)
    assert torch.equal(beyond.states[3], filled(3))
