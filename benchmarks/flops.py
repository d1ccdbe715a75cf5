"""The FLOP model behind every MFU figure, and the matmul peak it is divided by.

FLUX transformer, one sample, per forward (H = heads × head_dim, N = Ni image + Nt text tokens,
C = 64 packed latent channels, J = joint dim, P = pooled dim); 2 FLOPs per multiply-add:
    embedders   2·C·H·Ni + 2·J·H·Nt + 2·(256·H + H²)·(1 + guidance) + 2·(P·H + H²)
    double      2·12·H²·N  (q, k, v, out: 4·H², MLP 8·H², per token of its own stream)
                + 2·2·6·H²  (the two AdaLN modulations, once per sample)  + 4·N²·H (attention)
    single      2·12·H²·N  (q, k, v 3·H², MLP in 4·H², out 5·H²) + 2·3·H² + 4·N²·H
    output      2·2·H² + 2·H·C·Ni
A train step (per sample) = R rollout forwards + 2 branches × (forward + 2 × forward for the
backward + 1 forward recomputed under activation checkpointing), plus the VAE decode and the
reward tower (counted by torch's FlopCounterMode on one forward, ×2 with their input-gradient
backward). Norms, RoPE and activations are not counted (they are memory-bound, not matmuls).
"""

from __future__ import annotations

import time

import torch


def transformer_forward_flops(config: dict, image_tokens: int, text_tokens: int) -> dict:
    """FLOPs of one forward of a FLUX transformer with `config` (diffusers keys), one sample."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = image_tokens + text_tokens
    channels = config["in_channels"]
    guidance = 1 + int(bool(config.get("guidance_embeds", True)))
    embed = (
        2 * channels * hidden * image_tokens
        + 2 * config["joint_attention_dim"] * hidden * text_tokens
        + 2 * (256 * hidden + hidden**2) * guidance
        + 2 * (config["pooled_projection_dim"] * hidden + hidden**2)
    )
    attention = 4 * tokens**2 * hidden
    double = 2 * 12 * hidden**2 * tokens + 2 * 2 * 6 * hidden**2 + attention
    single = 2 * 12 * hidden**2 * tokens + 2 * 3 * hidden**2 + attention
    output = 2 * 2 * hidden**2 + 2 * hidden * channels * image_tokens
    total = embed + config["num_layers"] * double + config["num_single_layers"] * single + output
    return {
        "total": total,
        "double_block": double,
        "single_block": single,
        "outside_blocks": embed + output,
        "attention_share": attention * (config["num_layers"] + config["num_single_layers"]) / total,
    }


def train_step_flops(
    forward: float, rollout_steps: int, checkpointing: bool, vae: float, reward: float
) -> float:
    """Executed FLOPs of one sample's step (recompute included); see the module docstring."""
    per_branch = forward * (3 + int(checkpointing)) + 2 * (vae + reward)
    return rollout_steps * forward + 2 * per_branch


def counted_flops(function, *args, **kwargs) -> float:
    """FLOPs torch counts (matmuls, convolutions, attention) in one call of `function`.

    Attention runs on the math backend here: torch's counter has no entry for the CPU flash
    kernel, which would otherwise count as zero.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        function(*args, **kwargs)
    return float(counter.get_total_flops())


def gemm_peak_gflops(size: int, device: torch.device, dtype: torch.dtype, repeats: int = 5):
    """Best GFLOP/s of a size×size matmul on this machine, in the benchmark's dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
