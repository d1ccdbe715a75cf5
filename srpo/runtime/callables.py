"""The three model callables the SRPO math sees: models produce them, `srpo.algorithm` uses them.

Declared below both, so that the math needs no model code and the models no math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, float | list[float]], torch.Tensor]
"""velocity(x, sigma) -> v ≈ ε − x₀, sigma the exact (unquantised) noise level: one for every
row of x, or a list of one per row."""
Decode = Callable[[torch.Tensor], torch.Tensor]
"""decode(latents) -> image in [0, 1], differentiable."""
RewardFn = Callable[[torch.Tensor, str, str, float], torch.Tensor]
"""reward(image, positive_prompt, negative_prompt, weight) -> f·((1 + w)·p − n), shape [B]."""
