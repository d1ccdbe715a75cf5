"""Wall time of each phase of a train step, so a user (and the benchmarks) sees where time goes.

On a GPU every phase boundary synchronises the device: a handful of syncs per step of seconds,
the price of figures that mean what they say.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("rollout", "branch_forward", "vae_decode", "reward", "backward", "optimizer")
"""Phases of one step; branch_forward, vae_decode and reward are forward passes only."""


class PhaseTimer:
    """Seconds per phase, summed since the last `take`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function`, with each call's time added to phase `name`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        """The totals so far; the timer starts again from zero."""
        totals, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return totals
