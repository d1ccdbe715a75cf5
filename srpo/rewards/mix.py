"""A weighted sum of rewards: Σ_k weight_k · SRP_k, each SRP_k on reward k's own model.

Each part keeps its own scale (HPSv2.1 a plain cosine, PickScore logit_scale/20, HPSv3
`hpsv3_scale`·μ), so a weight of 1 adds that reward exactly as it would train alone; the weights
say how much of each the mix takes (e.g. {hpsv2: 1.0, hpsv3: 0.5}).
"""

from __future__ import annotations

import torch
from torch import nn

from srpo.rewards.base import Reward


class MixReward(Reward):
    """Several frozen rewards whose semantic-relative rewards are added with fixed weights."""

    def __init__(self, parts: dict[str, Reward], weights: dict[str, float]) -> None:
        super().__init__()
        if set(parts) != set(weights):
            raise ValueError(f"mix: parts {sorted(parts)} but weights for {sorted(weights)}")
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)
        self.freeze()

    def semantic_relative_reward(
        self, images: torch.Tensor, positive_prompt: str, negative_prompt: str, weight: float
    ) -> torch.Tensor:
        """Σ_k weight_k · SRP_k(images) with every part given the same prompts and w."""
        arguments = (images, positive_prompt, negative_prompt, weight)
        terms = [
            scale * self.parts[kind].semantic_relative_reward(*arguments)
            for kind, scale in self.weights.items()
        ]
        # sum, not stack: under autocast the parts may return different dtypes.
        return sum(terms[1:], start=terms[0])

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Σ_k weight_k · score_k: each part's published score, weighted as in the reward."""
        terms = [
            scale * self.parts[kind].score(images, prompts) for kind, scale in self.weights.items()
        ]
        return sum(terms[1:], start=terms[0])
