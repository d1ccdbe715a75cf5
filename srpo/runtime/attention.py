"""Which fused attention (SDPA) kernels a CUDA process may use.

A fused kernel whose backward is broken on a torch release fails silently (non-finite
gradients) or kills the process (an illegal memory access); with it switched off PyTorch picks
the next one of its priority list, down to the unfused `math` kernel. `SRPO_SDPA_DISABLE`
(comma-separated: flash, efficient, cudnn; `none`) chooses them for a process and everything
it starts. benchmarks/README.md ("GPU: the H200 runs of 2026-12-04") says what was seen and where.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

DISABLE_ENV = "SRPO_SDPA_DISABLE"
SWITCHES = {
    "flash": torch.backends.cuda.enable_flash_sdp,
    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
}
BROKEN_BACKWARD: tuple[str, ...] = ()
"""Disabled unless the environment says otherwise: none is known broken in our use."""
FUSED = tuple(SWITCHES)


def disabled_kernels(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The kernels to switch off: the environment's list, else BROKEN_BACKWARD."""
    spec = environ.get(DISABLE_ENV)
    if spec is None:
        return BROKEN_BACKWARD
    names = tuple(name.strip() for name in spec.split(",") if name.strip() not in ("", "none"))
    if unknown := sorted(set(names) - set(SWITCHES)):
        raise ValueError(
            f"{DISABLE_ENV}: unknown kernel(s) {unknown}; expected some of "
            f"{', '.join(SWITCHES)} or none"
        )
    return names


def configure_attention(device: torch.device, environ: Mapping[str, str] = os.environ) -> None:
    """Switch the broken kernels off for this process when it computes on a GPU."""
    if device.type != "cuda":
        return
    for name in disabled_kernels(environ):
        SWITCHES[name](False)
