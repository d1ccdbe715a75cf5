"""Evaluation metrics (SPEC §4): each scorer's published number for decoded images and prompts.

A training reward (`RewardModel`) takes differentiable [0,1] tensors through one shared crop. An
evaluation metric instead reproduces the scorer's OWN preprocessing on PIL images (HPSv2.1 pads
instead of cropping; PickScore uses its processor), because a paper's table is only comparable
with numbers computed the way the scorer's authors compute them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from srpo.io import InputError
from srpo.rewards.base import RewardModel
from srpo.scorers import METRICS, SCORERS, resolve


class Metric(ABC):
    """A frozen scorer: `score(images, prompts)` gives image i's score against prompt i."""

    name: ClassVar[str]
    version: ClassVar[str]
    """The published model the numbers belong to, e.g. "HPSv2.1"; recorded beside every score."""

    def __init__(
        self, model: nn.Module, checkpoint_sha256: dict[str, str], batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise InputError(f"{self.name}: batch_size must be at least 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.checkpoint_sha256 = checkpoint_sha256
        """Path of every weight file loaded → its sha256, so a result names the exact weights."""
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Metric:
        self.model.to(device=device, dtype=dtype)
        return self

    @abstractmethod
    def _score_batch(self, images: Sequence[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores [B] of one batch of PIL images, image i against prompt i."""

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Per-image scores, computed `batch_size` images at a time, returned as Python floats."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch = self._score_batch(images[start:stop], list(prompts[start:stop]))
            scores.extend(batch.float().cpu().tolist())
        return scores


class PixelMetric(Metric):
    """A metric whose own preprocessing turns a batch of PIL images into one pixel tensor.

    Split from `Metric` because not every scorer has such a tensor: HPSv3's Qwen2-VL processor
    makes variable-length patch sequences inside the package's inferencer, and ImageReward's
    package scores one PIL image per call.
    """

    @abstractmethod
    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The scorer's own preprocessing: PIL images → float32 model input [B,3,H,W] on CPU."""

    @abstractmethod
    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [B] of preprocessed pixels (already on the model's device and dtype)."""

    def _score_batch(self, images: Sequence[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self._score_pixels(self.pixels(images).to(self.device, self.dtype), prompts)


class CosineMetric(PixelMetric):
    """A metric on a `RewardModel`'s towers: score_scale · cosine(image i, prompt i).

    The towers and the text side are the training reward's own, so the two cannot drift apart;
    only the image preprocessing (the subclass's `pixels`) differs.
    """

    model: RewardModel

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = self.model.pixel_features(pixels)
        texts = self.model.text_features(prompts)
        return self.model.score_scale * (images * texts).sum(dim=-1)


def load_metric(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    **paths: Any,
) -> Metric:
    """Load metric `name` onto `device` in `dtype`; `paths` are the keyword arguments of its
    module's `load_metric` (srpo.scorers names it)."""
    if name not in METRICS:
        raise InputError(f"--metric: expected one of {', '.join(METRICS)}, got {name!r}")
    loader = resolve(SCORERS[name].metric)
    return loader(batch_size=batch_size, **paths).to(device, dtype)
