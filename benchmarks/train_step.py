"""One benchmark process (or torchrun rank) that times train steps of one variant.

    python -m benchmarks.train_step VARIANT CONFIG OUT_JSON WARMUP STEPS [WARMUP_ROLLOUT]

VARIANT is `ours` (srpo.train.step.Trainer), `ours-lora` (the same trainer with the default
`lora:` section: adapters instead of the full transformer), `literal` (the authors' recipe,
anomaly detection on) or `literal-no-anomaly`. Rank 0 writes per-step seconds, losses, per-phase
seconds (mean over ranks), the peak memory of the busiest rank and, for ours, the trainable and
total parameter counts.

The WARMUP steps are whole steps (rollout, both branches, backward, optimizer: every shape,
gather, lazy initialisation and first allocation of a measured step) with a rollout of
WARMUP_ROLLOUT Euler steps (default: the config's), the same for every variant.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from srpo.config import TrainConfig, load_train_config
from srpo.io import write_json
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.seeds import derive_seed

VARIANTS = ("ours", "ours-lora", "literal", "literal-no-anomaly")


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on a GPU since `reset_peak_memory`, else this process's peak
    resident set (Linux: KiB; it cannot be reset, so it includes start-up)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start the device's peak over, so that it measures the steps and not the start-up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def make_trainer(variant: str, config: TrainConfig, ctx: DistributedContext):
    if variant in ("ours", "ours-lora"):
        from srpo.train.step import Trainer

        if variant == "ours-lora":
            config = TrainConfig.model_validate({**config.to_dict(), "lora": {}})
        return Trainer(config, ctx)
    from benchmarks.literal import LiteralTrainer

    return LiteralTrainer(config, ctx, anomaly=variant == "literal")


def run(
    variant: str,
    config_path: Path,
    out: Path,
    warmup: int,
    steps: int,
    warmup_rollout: int | None = None,
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = load_train_config(config_path)
    with DistributedContext.from_environment() as ctx:
        torch.manual_seed(derive_seed(config.seed, "init", ctx.rank))
        trainer = make_trainer(variant, config, ctx)
        reset_peak_memory(ctx.device)
        measured_config = trainer.config
        if warmup_rollout is not None:
            trainer.config = measured_config.model_copy(update={"rollout_steps": warmup_rollout})
        records = []
        for index in range(warmup + steps):
            if index == warmup:
                trainer.config = measured_config
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            ctx.barrier()
            start = time.perf_counter()
            metrics = trainer.train_step()
            ctx.barrier()
            records.append({"seconds": time.perf_counter() - start, **metrics})
        peak = torch.tensor([peak_memory_mb(ctx.device)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        phases = sorted(k for k in records[-1] if k.startswith("time/"))
        measured = records[warmup:]
        sums = torch.tensor(
            [sum(r[k] for r in measured) / len(measured) for k in phases],
            dtype=torch.float64,
            device=ctx.device,
        )
        dist.all_reduce(sums)
        counts = {}
        if variant.startswith("ours"):
            counts = {
                "trainable_parameters": sum(p.numel() for p in trainer.trainable),
                "parameters": sum(p.numel() for p in trainer.model.parameters()),
            }
        if ctx.is_main:
            write_json(
                out,
                {
                    "variant": variant,
                    **counts,
                    "world_size": ctx.world_size,
                    "threads": torch.get_num_threads(),
                    "records": records,
                    "warmup": warmup,
                    "warmup_rollout_steps": warmup_rollout or config.rollout_steps,
                    "step_seconds": [r["seconds"] for r in measured],
                    "phases": {
                        k.removeprefix("time/").removesuffix("_s"): float(v) / ctx.world_size
                        for k, v in zip(phases, sums, strict=True)
                    },
                    "peak_memory_mb": float(peak),
                    "memory_kind": "device" if ctx.device.type == "cuda" else "rss",
                },
            )


if __name__ == "__main__":
    name, config_file, out_file, warm, count, *short = sys.argv[1:]
    run(name, Path(config_file), Path(out_file), int(warm), int(count), *map(int, short))
