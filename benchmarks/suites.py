"""What each suite measures: model shapes, resolutions, step counts, process counts."""

from __future__ import annotations

from dataclasses import dataclass, field

FLUX_DEV_BLOCKS = (19, 38)
"""FLUX.1-dev's double and single blocks: per-block figures are scaled to these."""


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: a FLUX folder (transformer at tiny or real width) plus a reward."""

    name: str
    real_width: bool
    double_blocks: int = 1
    single_blocks: int = 1
    vae: str = "tiny"  # tiny | flux (FLUX.1-dev's VAE architecture, random weights)
    reward: str = "tiny"  # tiny (ViT-H-14 layout, tiny widths) | vit-h-14 (full size)
    text_tokens: int = 32
    train_px: int = 64
    sample_px: int = 64


@dataclass(frozen=True)
class Suite:
    name: str
    size: str
    device: str  # cpu | cuda
    dtype: str  # float32 | bfloat16: ours as FSDP2 param dtype, the baseline as autocast
    models: tuple[ModelSpec, ...]
    rollout_steps: int = 25
    warmup_steps: int = 1
    warmup_rollout_steps: int = 1  # Euler steps of a warm-up rollout: one-time costs need no more
    train_steps: int = 2
    sample_steps: int = 10
    sample_prompts: int = 4
    sample_batches: tuple[int, ...] = (1, 2, 4)
    world_sizes: tuple[int, ...] = (1, 2)
    gemm_size: int = 4096
    headline: str = "real-width"
    notes: list[str] = field(default_factory=list)


def _cpu(size: str) -> Suite:
    tiny = ModelSpec("tiny", real_width=False)
    if size == "smoke":  # the whole code path on the tiny models, for CI
        return Suite(
            "cpu", size, "cpu", "float32", (tiny,), rollout_steps=4, train_steps=1,
            sample_steps=2, sample_prompts=2, sample_batches=(1, 2), gemm_size=1024,
            headline="tiny",
        )  # fmt: skip
    real = ModelSpec("real-width", real_width=True, text_tokens=32, train_px=128, sample_px=128)
    return Suite("cpu", size, "cpu", "float32", (tiny, real), train_steps=1)


def _gpu(size: str) -> Suite:
    if size == "smoke":  # the gpu suite's code path on CPU, small enough for CI
        model = ModelSpec(  # the tiny VAE: bf16 convolutions crawl on the CPU
            "gpu-stand-in",
            real_width=False,
            double_blocks=2,
            single_blocks=4,
            text_tokens=16,
            train_px=32,
            sample_px=32,
        )
        return Suite(
            "gpu", size, "cpu", "bfloat16", (model,), rollout_steps=2, train_steps=1,
            sample_steps=2, sample_prompts=2, sample_batches=(1, 2), world_sizes=(1,),
            gemm_size=1024, headline="gpu-stand-in",
        )  # fmt: skip
    model = ModelSpec(
        "real-width",
        real_width=True,
        double_blocks=2,
        single_blocks=4,
        vae="flux",
        reward="vit-h-14",
        text_tokens=512,
        train_px=720,
        sample_px=1024,
    )
    return Suite(
        "gpu", size, "cuda", "bfloat16", (model,), train_steps=3, sample_steps=10,
        sample_prompts=4, sample_batches=(1, 2, 4), world_sizes=(1,), gemm_size=8192,
    )  # fmt: skip


def get_suite(name: str, size: str) -> Suite:
    if name not in ("cpu", "gpu"):
        raise ValueError(f"--suite: expected cpu or gpu, got {name!r}")
    if size not in ("smoke", "full"):
        raise ValueError(f"--size: expected smoke or full, got {size!r}")
    return _cpu(size) if name == "cpu" else _gpu(size)
