"""The SRPO objective's hyper-parameters (SPEC §3), apart from the math that uses them: the
config reads them without importing torch, which the workflow's DAG parse never needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MID_MARGIN = 5
"""The mid index is drawn uniformly in [MID_MARGIN, T − MID_MARGIN] (SPEC §3 step 2)."""


def _pair(name: str, value: Sequence[float], kind: type) -> tuple:
    if isinstance(value, str | bytes) or len(value) != 2:
        raise ValueError(f"SRPOSettings.{name}: expected a pair of {kind.__name__}, got {value!r}")
    try:
        first, second = (kind(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"SRPOSettings.{name}: expected numbers, got {value!r}") from error
    if kind is int and any(isinstance(v, float) and not float(v).is_integer() for v in value):
        raise ValueError(f"SRPOSettings.{name}: expected integers, got {value!r}")
    return (first, second)


@dataclass
class SRPOSettings:
    """Hyper-parameters of the SRPO objective; the defaults are the paper's (HPSv2.1 recipe)."""

    timestep_length: int = 1000
    train_timestep: tuple[int, int] = (5, 25)
    schedule_steps: int = 50
    shift: float = 3.0
    groundtruth_ratio: float = 0.9
    discount_pos: tuple[float, float] = (0.1, 0.25)
    discount_inv: tuple[float, float] = (0.3, 0.01)
    reward_threshold: float = 0.7
    positive_words: list[str] = field(
        default_factory=lambda: ["Natural-lighting", "Detail", "Detailed", "Real"]
    )
    negative_words: list[str] = field(
        default_factory=lambda: ["Concept art", "Painting", "Anime", "Flat", "Oil"]
    )

    def __post_init__(self) -> None:
        for name in ("timestep_length", "schedule_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SRPOSettings.{name}: expected a positive integer, got {value!r}")
        if self.timestep_length <= 2 * MID_MARGIN:
            raise ValueError(
                f"SRPOSettings.timestep_length: expected > {2 * MID_MARGIN} so that a mid index "
                f"in [{MID_MARGIN}, T - {MID_MARGIN}] exists, got {self.timestep_length}"
            )
        self.train_timestep = _pair("train_timestep", self.train_timestep, int)
        low, high = self.train_timestep
        if not 0 <= low < high <= self.schedule_steps:
            raise ValueError(
                "SRPOSettings.train_timestep: expected 0 <= start < end <= schedule_steps "
                f"({self.schedule_steps}), got {self.train_timestep}"
            )
        if high == self.schedule_steps:
            raise ValueError(
                "SRPOSettings.train_timestep: the end index must stay below schedule_steps, "
                "where sigma = 0 makes the one-shot recovery divide by zero"
            )
        for name in ("shift", "groundtruth_ratio", "reward_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"SRPOSettings.{name}: expected a number, got {value!r}")
            setattr(self, name, float(value))
        if self.shift <= 0:
            raise ValueError(f"SRPOSettings.shift: expected > 0, got {self.shift}")
        if not 0.0 <= self.groundtruth_ratio < 1.0:
            raise ValueError(
                "SRPOSettings.groundtruth_ratio: expected 0 <= ratio < 1, "
                f"got {self.groundtruth_ratio}"
            )
        self.discount_pos = _pair("discount_pos", self.discount_pos, float)
        self.discount_inv = _pair("discount_inv", self.discount_inv, float)
        for name in ("positive_words", "negative_words"):
            words = getattr(self, name)
            if (
                isinstance(words, str)
                or not words
                or not all(isinstance(w, str) and w.strip() for w in words)
            ):
                raise ValueError(
                    f"SRPOSettings.{name}: expected a non-empty list of words, got {words!r}"
                )
            setattr(self, name, list(words))
