"""Reward models behind one interface, chosen by name from the config (`reward.kind`)."""

from __future__ import annotations

from typing import Any

from srpo.io import InputError
from srpo.rewards.base import Reward, RewardModel
from srpo.rewards.mix import MixReward
from srpo.scorers import MIX, REWARD_KINDS, resolve, reward_kind


def _load_mix(weights: dict[str, float], arguments: dict[str, dict[str, Any]]) -> MixReward:
    """Σ weight_k · reward k; `arguments[k]` are the keyword arguments of reward k's `load`."""
    return MixReward({kind: load_reward(kind, **arguments[kind]) for kind in weights}, weights)


def load_reward(kind: str, **paths: Any) -> Reward:
    """Load a frozen reward model; `paths` are the keyword arguments of that kind's `load`
    (srpo.scorers names it). A kind outside main (hpsv3, alone or in a mix) loads only in its
    own environment; elsewhere it fails in one line."""
    if kind == MIX:
        return _load_mix(**paths)
    if kind not in REWARD_KINDS:
        known = ", ".join((*REWARD_KINDS, MIX))
        raise InputError(f"unknown reward kind {kind!r}; expected one of: {known}")
    return resolve(reward_kind(kind).loader)(**paths)


__all__ = ["MixReward", "Reward", "RewardModel", "load_reward"]
