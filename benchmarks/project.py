"""From measured figures to FLUX.1-dev on the paper's cluster: memory per rank and wall time.

Memory per rank under FSDP2 with W ranks, P transformer parameters, B = P/57 a block (bytes):
    forward:  16·P/W + 2·2·B    fp32 master weights, gradients and AdamW's two moments, sharded,
                                plus two gathered bf16 blocks (the one in use and the prefetch)
    rollout:  max(12·P/W + 2·P, 16·P/W + 2·2·B)   the rollout holds every gathered bf16 block
                                but no gradients (set to None after each update)
    first_call, step:  16·P/W + 2·P   the gathered parameters stay beside the gradients (first
                                call: through the first call's backward, freeing each block
                                after its own; step: to the step's end)
    literal:  16·P/W + 2·4·B    FSDP1 with fp32 parameters gathers 4 bytes a parameter
  + frozen VAE and reward tower, activations (measured on a GPU, not modelled here)

Wall time of the paper recipe: 19 updates, one sample per rank, 720 px (2025 image tokens), 512
text tokens, 25 rollout steps, activation checkpointing. Time per update = FLOPs per sample /
(GPU bf16 dense peak × MFU), with MFU the one measured by this suite for our trainer (on the
CPU: the fraction of the CPU's own matmul peak, assumed to carry over, which is the weakest
assumption here), and the baseline's time = ours × the measured ratio. Communication is assumed
hidden behind compute; VAE and reward FLOPs are scaled from the counted ones by pixel count.
"""

from __future__ import annotations

import torch

from benchmarks.flops import train_step_flops, transformer_forward_flops
from srpo.memory import FLUX_DEV_TRANSFORMER as FLUX_DEV

GPU_BF16_DENSE_TFLOPS = {"H100 SXM": 989.4, "H20": 148.0}
"""Vendor datasheet peaks (dense, no sparsity)."""
PAPER = {"updates": 19, "ranks": 32, "px": 720, "text_tokens": 512, "rollout_steps": 25}


def flux_dev_parameters() -> int:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    return sum(p.numel() for p in model.parameters())


def memory_per_rank(world_sizes: tuple[int, ...] = (8, 16, 32, 64)) -> dict:
    params = flux_dev_parameters()
    rows = {}
    for world in world_sizes:
        sharded, block = 16 * params / world, params / 57
        forward = sharded + 2 * 2 * block
        rows[str(world)] = {
            "sharded_states_gb": sharded / 1e9,
            "ours_forward_gb": forward / 1e9,
            "ours_rollout_gb": max(12 * params / world + 2 * params, forward) / 1e9,
            "ours_step_gb": (sharded + 2 * params) / 1e9,
            "literal_fsdp1_fp32_gb": (sharded + 2 * 4 * block) / 1e9,
        }
    return {"parameters": params, "formula": __doc__.split("\n\n")[1].strip(), "ranks": rows}


def paper_projection(figures: dict, suite) -> dict:
    spec = figures["spec"]
    image_tokens = (PAPER["px"] // 16) ** 2
    forward = transformer_forward_flops(FLUX_DEV, image_tokens, PAPER["text_tokens"])["total"]
    side = figures["side_flops"]
    pixel_scale = (PAPER["px"] / spec["train_px"]) ** 2
    flops = train_step_flops(
        forward, PAPER["rollout_steps"], True, side["vae_decode_train"] * pixel_scale,
        side["reward"],
    )  # fmt: skip
    train = figures["train_step"]
    mfu = train["mfu"]
    ratio_b, ratio_c = train["ratio_vs_literal"], train["ratio_vs_literal_no_anomaly"]
    rows = {}
    for gpu, tflops in GPU_BF16_DENSE_TFLOPS.items():
        update = flops / (tflops * 1e12 * mfu)
        total = PAPER["updates"] * update
        rows[gpu] = {
            "ours_minutes": total / 60,
            "literal_minutes": total * ratio_b / 60,
            "literal_no_anomaly_minutes": total * ratio_c / 60,
            "seconds_per_update_ours": update,
        }
    return {
        "flops_per_sample_update": flops,
        "assumed_mfu": mfu,
        "mfu_from": f"{suite.name} suite, {spec['name']} model",
        "paper": PAPER,
        "gpus": rows,
        "assumptions": __doc__.split("\n\n")[2].strip(),
    }


TRANSFORMER_PHASES = ("rollout", "branch_forward", "backward")


def scaled_to_flux_dev(figures: dict, transformer: dict, parameters: int) -> dict:
    """Each variant's measured step, its transformer phases scaled to 19 + 38 blocks.

    rollout, branch forward and backward scale with the transformer's FLOPs at the suite's own
    token counts (FLUX.1-dev's forward / the measured model's), the optimizer with the parameter
    count; VAE decode and reward are unchanged. A prediction for this machine, not a measurement.
    """
    spec = figures["spec"]
    image_tokens, text_tokens = (spec["train_px"] // 16) ** 2, spec["text_tokens"]
    flops = transformer_forward_flops(FLUX_DEV, image_tokens, text_tokens)["total"]
    factor = flops / transformer_forward_flops(transformer, image_tokens, text_tokens)["total"]
    optimizer_factor = flux_dev_parameters() / parameters
    seconds = {}
    for variant, phases in figures["train_step"]["phases"].items():
        seconds[variant] = sum(
            value
            * (
                factor
                if phase in TRANSFORMER_PHASES
                else optimizer_factor
                if phase == "optimizer"
                else 1.0
            )
            for phase, value in phases.items()
        )
    return {"flops_factor": factor, "optimizer_factor": optimizer_factor, "step_seconds": seconds}
