"""Reward models behind one interface, chosen by name from the config (`reward.kind`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from srpo.io import InputError
from srpo.rewards import hpsv2, hpsv3, pickscore
from srpo.rewards.base import Reward, RewardModel
from srpo.rewards.mix import MixReward


def _load_mix(weights: dict[str, float], arguments: dict[str, dict[str, Any]]) -> MixReward:
    """Σ weight_k · reward k; `arguments[k]` are the keyword arguments of reward k's `load`."""
    return MixReward({kind: load_reward(kind, **arguments[kind]) for kind in weights}, weights)


LOADERS: dict[str, Callable[..., Reward]] = {
    "hpsv2": hpsv2.load,
    "pickscore": pickscore.load,
    "hpsv3": hpsv3.load,
    "mix": _load_mix,
}
"""hpsv3 (alone or in a mix) loads only in .venv-hpsv3; elsewhere it fails in one line."""


def load_reward(kind: str, **paths: Any) -> Reward:
    """Load a frozen reward model; `paths` are the keyword arguments of that kind's `load`."""
    if kind not in LOADERS:
        raise InputError(f"unknown reward kind {kind!r}; expected one of: {', '.join(LOADERS)}")
    return LOADERS[kind](**paths)


__all__ = ["LOADERS", "MixReward", "Reward", "RewardModel", "load_reward"]
