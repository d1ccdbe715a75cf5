"""Each fused attention (SDPA) kernel against the unfused one, on the attention modules that
training backpropagates through: `python -m benchmarks.attention_probe [--size tiny|real]`.

Cases: a FLUX double block (the transformer's attention, many heads of 128) and the FLUX VAE
decoder's middle block (its attention is one head as wide as the channels), in bf16, forward
and backward with a fixed upstream gradient. Each (case, kernel) runs in its own process, so
a kernel that kills its process (an illegal memory access) is reported rather than fatal. A
kernel is broken for a case when it crashes, gives a non-finite gradient, or one whose norm is
off the math kernel's by more than TOLERANCE; SRPO_SDPA_DISABLE (srpo/runtime/attention.py)
switches such kernels off for training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
import typer

from srpo.memory import FLUX_DEV_VAE
from srpo.runtime.attention import SWITCHES

KERNELS = (*SWITCHES, "math")
CASES = ("flux-block", "vae-mid-block")
TOLERANCE = 0.02
"""Relative difference of gradient norms that bf16 rounding stays well inside."""
REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _inputs(case: str, size: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The module of `case` at `size` in bf16 and its keyword inputs (seeded)."""
    from diffusers import AutoencoderKL, FluxPipeline
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxTransformerBlock,
    )

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if case == "flux-block":
        heads, dim, axes, px, text = (
            (24, 128, (16, 56, 56), 720, 512) if size == "real" else (2, 16, (4, 4, 8), 64, 32)
        )
        block = FluxTransformerBlock(
            dim=heads * dim, num_attention_heads=heads, attention_head_dim=dim
        )
        image_ids = FluxPipeline._prepare_latent_image_ids(1, px // 16, px // 16, device, dtype)
        ids = torch.cat([torch.zeros(text, 3, device=device, dtype=dtype), image_ids])
        width = heads * dim
        return block.to(device, dtype), {
            "hidden_states": torch.randn(2, (px // 16) ** 2, width, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(2, text, width, device=device, dtype=dtype),
            "temb": torch.randn(2, width, device=device, dtype=dtype),
            "image_rotary_emb": FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids),
        }
    config = dict(FLUX_DEV_VAE)
    if size == "tiny":
        config.update(block_out_channels=[8] * 4, layers_per_block=1, norm_num_groups=4)
    latent = (720 if size == "real" else 64) // 8
    middle = AutoencoderKL(**config).decoder.mid_block
    channels = config["block_out_channels"][-1]
    hidden = torch.randn(1, channels, latent, latent, device=device, dtype=dtype)
    return middle.to(device, dtype), {"hidden_states": hidden}


def _one(case: str, size: str, kernel: str, device: torch.device) -> dict:
    """Forward and backward of `case` with only `kernel` allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    module, inputs = _inputs(case, size, device)
    first = next(iter(inputs.values())).requires_grad_()
    with sdpa_kernel([backends[kernel]]):
        output = module(**inputs)
        output = output[-1] if isinstance(output, tuple) else output
        upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
        (output.float() * upstream.to(device)).sum().backward()
    grads = [first.grad, *(p.grad for p in module.parameters() if p.grad is not None)]
    return {
        "finite": all(bool(torch.isfinite(g).all()) for g in grads),
        "input_grad_norm": float(first.grad.float().norm()),
    }


UNAVAILABLE = ("No viable backend", "No available kernel")
"""How torch says a kernel cannot run here at all (the CPU has no cuDNN or efficient kernel)."""


def verdicts(case: str, found: dict[str, dict]) -> list[dict]:
    """One row per kernel of `case`: broken if it crashed, gave a non-finite gradient or one
    off the math kernel's; a kernel this device lacks is not broken."""
    reference = found["math"].get("input_grad_norm")
    rows = []
    for kernel, result in found.items():
        error = result.get("error", "")
        norm = result.get("input_grad_norm")
        if any(reason in error for reason in UNAVAILABLE):
            broken = False
        elif error or not result.get("finite") or reference is None:
            broken = True
        else:
            broken = abs(norm - reference) > TOLERANCE * max(abs(reference), 1e-12)
        rows.append({"case": case, "kernel": kernel, **result, "broken": broken})
    return rows


def _run_one(case: str, kernel: str, size: str, device: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.attention_probe", "--one", case]
    command += ["--kernel", kernel, "--size", size, "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"error": f"exit {done.returncode}: {tail}"}


def probe(size: str, device: str) -> list[dict]:
    """Every (case, kernel), each in a process of its own (side by side on a GPU)."""
    workers = len(KERNELS) if device.startswith("cuda") else 1
    with ThreadPoolExecutor(workers) as pool:
        futures = {
            (case, kernel): pool.submit(_run_one, case, kernel, size, device)
            for case in CASES
            for kernel in KERNELS
        }
    rows = []
    for case in CASES:
        rows.extend(verdicts(case, {k: futures[case, k].result() for k in KERNELS}))
    return rows


@app.command()
def main(
    size: Annotated[str, typer.Option(help="real (FLUX.1-dev widths, 720 px) or tiny.")] = "real",
    device: Annotated[str, typer.Option(help="cuda or cpu.")] = "cuda",
    out: Annotated[Path | None, typer.Option(help="Also write the rows to this JSON.")] = None,
    one: Annotated[
        str | None, typer.Option(help="Internal: run this one case (with --kernel) and print it.")
    ] = None,
    kernel: Annotated[str, typer.Option(help="Internal: the kernel of --one.")] = "math",
) -> None:
    """Print each kernel's verdict per case and the SRPO_SDPA_DISABLE value they suggest."""
    if size not in ("real", "tiny") or kernel not in KERNELS:
        raise typer.BadParameter(f"--size real|tiny, --kernel one of {KERNELS}")
    if one is not None:
        typer.echo(json.dumps(_one(one, size, kernel, torch.device(device))))
        return
    rows = probe(size, device)
    for row in rows:
        missing = any(reason in row.get("error", "") for reason in UNAVAILABLE)
        verdict = "BROKEN" if row["broken"] else "n/a" if missing else "ok"
        detail = row.get("error") or f"finite={row['finite']} |grad|={row['input_grad_norm']:.6g}"
        typer.echo(f"{row['case']:14s} {row['kernel']:10s} {verdict:7s} {detail}")
    broken = sorted({row["kernel"] for row in rows if row["broken"] and row["kernel"] != "math"})
    typer.echo(f"suggested: SRPO_SDPA_DISABLE={','.join(broken) or 'none'}")
    if out is not None:
        out.write_text(json.dumps({"size": size, "device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    app()
