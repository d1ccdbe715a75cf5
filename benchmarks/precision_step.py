"""One precision policy's process for `python -m benchmarks.precision`:

    python -m benchmarks.precision_step POLICY CONFIG OUT_DIR

Trains two steps of CONFIG under POLICY and writes OUT_DIR/figures.json (loss, reward and
gradient norm of step 1, the seconds of step 2, peak memory) and OUT_DIR/gradient.pt: step 1's
gradient as one fp32 vector, read by an optimizer pre-step hook (after clipping, before AdamW).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.train_step import peak_memory_mb, reset_peak_memory
from srpo.config import load_train_config
from srpo.io import write_json
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.seeds import derive_seed
from srpo.train.step import Trainer


def keep_gradient(trainer: Trainer, into: list[torch.Tensor]):
    """An optimizer pre-step hook that keeps the first step's gradient as one fp32 vector."""

    def keep(optimizer, args, kwargs) -> None:
        if into:
            return
        parts = []
        for parameter in trainer.model.parameters():
            if parameter.grad is not None:
                grad = parameter.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                parts.append(grad.detach().float().flatten().cpu())
        into.append(torch.cat(parts))

    return keep


def run(precision: str, config_path: Path, out: Path) -> None:
    config = load_train_config(config_path).model_copy(
        update={"precision": precision, "output_dir": str(out / "train")}
    )
    with DistributedContext.from_environment() as ctx:
        torch.manual_seed(derive_seed(config.seed, "init", ctx.rank))
        trainer = Trainer(config, ctx)
        reset_peak_memory(ctx.device)
        gradient: list[torch.Tensor] = []
        trainer.optimizer.register_step_pre_hook(keep_gradient(trainer, gradient))
        first = trainer.train_step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        trainer.train_step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start
        peak = peak_memory_mb(ctx.device)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(gradient[0], out / "gradient.pt")
    write_json(
        out / "figures.json",
        {
            "loss": first["loss/denoise"] + first["loss/inversion"],
            "reward": (first["reward/denoise"] + first["reward/inversion"]) / 2,
            "grad_norm": first["grad_norm"],
            "seconds": seconds,
            "peak_rss_mb": peak,
            "gradient_file": str(out / "gradient.pt"),
        },
    )


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
