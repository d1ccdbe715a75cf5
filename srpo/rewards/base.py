"""The one interface every training reward offers, and its CLIP-tower implementation.

`Reward` is what the trainer calls: the semantic-relative reward (SPEC §3 step 5) of decoded
images, differentiable w.r.t. the pixels. `RewardModel` implements it on separate image and text
towers: subclasses only say how to embed pixels and prompts and how the metric scales a cosine;
the preprocessing and the formula live here once, so HPSv2.1 and PickScore cannot drift apart.
HPSv3 (a joint vision-language scorer, `srpo.rewards.hpsv3`) and weighted mixes
(`srpo.rewards.mix`) implement `Reward` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Reward(nn.Module, ABC):
    """A frozen scorer of [0,1] images whose reward stays differentiable w.r.t. the pixels."""

    @abstractmethod
    def semantic_relative_reward(
        self, images: torch.Tensor, positive_prompt: str, negative_prompt: str, weight: float
    ) -> torch.Tensor:
        """Reward [B] of images [B,3,H,W] in [0,1]: the `reward` callable of the trainer."""

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The scorer's own score [B] of image i against prompt i (held-out evaluation)."""

    def freeze(self) -> Reward:
        """Reward models are never trained: gradients must reach the pixels only."""
        self.eval()
        self.requires_grad_(False)
        return self

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device


class RewardModel(Reward):
    """A frozen CLIP-style scorer whose image branch stays differentiable w.r.t. the pixels."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size

    @abstractmethod
    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image embeddings of CLIP-normalised pixels."""

    @abstractmethod
    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Projected (not normalised) text embeddings."""

    @property
    @abstractmethod
    def score_scale(self) -> float | torch.Tensor:
        """Factor from cosine to the metric's published score."""

    @property
    @abstractmethod
    def reward_scale(self) -> float | torch.Tensor:
        """Factor applied to the semantic-relative reward during training (SPEC §3.5)."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] → CLIP input, with the same differentiable ops as training."""
        size = self.image_size
        pixels = TF.resize(images, [size], InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.center_crop(pixels, [size, size])
        return TF.normalize(pixels, list(CLIP_MEAN), list(CLIP_STD))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-normalised image features [B,D]; differentiable w.r.t. `images`."""
        return self.pixel_features(self.preprocess(images).to(self._device, self._dtype))

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-normalised features [B,D] of pixels already preprocessed: by `preprocess` in
        training, by an evaluation metric's own transform (srpo.rewards.metric.CosineMetric)."""
        return nn.functional.normalize(self._embed_images(pixels), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unit-normalised text features [N,D]."""
        return nn.functional.normalize(self._embed_prompts(list(prompts)), dim=-1)

    def semantic_relative_reward(
        self, images: torch.Tensor, positive_prompt: str, negative_prompt: str, weight: float
    ) -> torch.Tensor:
        """reward_scale · f·((1 + w)·p − n) per image, f, p, n unit-normalised features."""
        features = self.image_features(images)
        positive, negative = self.text_features([positive_prompt, negative_prompt])
        direction = (1 + weight) * positive - negative
        return self.reward_scale * (features @ direction)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The metric's per-image score of image i against prompt i, shape [B]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"score: {images.shape[0]} images but {len(prompts)} prompts")
        features = self.image_features(images)
        texts = self.text_features(prompts)
        return self.score_scale * (features * texts).sum(dim=-1)
