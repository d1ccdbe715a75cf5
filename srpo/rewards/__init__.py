"""Reward models behind one interface, chosen by name from the config (`reward.kind`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from srpo.io import InputError
from srpo.rewards import hpsv2, pickscore
from srpo.rewards.base import RewardModel

LOADERS: dict[str, Callable[..., RewardModel]] = {"hpsv2": hpsv2.load, "pickscore": pickscore.load}


def load_reward(kind: str, **paths: Any) -> RewardModel:
    """Load a frozen reward model; `paths` are the keyword arguments of that kind's `load`."""
    if kind not in LOADERS:
        raise InputError(f"unknown reward kind {kind!r}; expected one of: {', '.join(LOADERS)}")
    return LOADERS[kind](**paths)


__all__ = ["LOADERS", "RewardModel", "load_reward"]
