"""Precision policies of training: which dtype each model computes in, and where autocast is.

- `fp32`: everything in float32 (the reference; what the CPU tests run).
- `fsdp-bf16`: FSDP2's MixedPrecisionPolicy casts the transformer's parameters to bf16 once per
  forward (fp32 master weights, fp32 gradient reduction), the VAE is held in bf16, the reward in
  fp32; no autocast, so no per-op casts.
- `autocast-bf16`: the authors' recipe: fp32 parameters, every transformer call under
  `torch.autocast(bf16)` (on GPUs LayerNorm/RMSNorm, modulation and RoPE stay fp32), the VAE
  decode under bf16 autocast (GroupNorm fp32 on GPUs), the reward under fp16 autocast.
What each costs in speed and deviation from fp32: benchmarks/README.md ("Precision policies").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes a config may name for exported weights and sampling."""


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    transformer_dtype: torch.dtype
    """FSDP2 compute dtype of the transformer's parameters (master weights stay fp32)."""
    vae_dtype: torch.dtype
    transformer_autocast: torch.dtype | None = None
    vae_autocast: torch.dtype | None = None
    reward_autocast: torch.dtype | None = None

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:
        """What FSDP2 casts the parameters to: None, no cast at all, for fp32 master weights
        computed as they are (a cast to fp32 would also cast each block's inputs)."""
        return None if self.transformer_dtype == torch.float32 else self.transformer_dtype


POLICIES = {
    "fp32": PrecisionPolicy("fp32", torch.float32, torch.float32),
    "fsdp-bf16": PrecisionPolicy("fsdp-bf16", torch.bfloat16, torch.bfloat16),
    "autocast-bf16": PrecisionPolicy(
        "autocast-bf16",
        torch.float32,
        torch.float32,
        transformer_autocast=torch.bfloat16,
        vae_autocast=torch.bfloat16,
        reward_autocast=torch.float16,
    ),
}


def under_autocast(function: F, dtype: torch.dtype | None, device: torch.device) -> F:
    """`function` run under `torch.autocast(device, dtype)`; itself when dtype is None.

    Autocast's weight cache is off: it would keep a low-precision copy of every gathered
    parameter until the call ends (the whole model under a kept gather), while each weight is
    used once per forward anyway."""
    if dtype is None:
        return function

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            return function(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
