"""`python -m benchmarks`: every figure of a suite in one run, written as JSON and a Markdown table.

Each measurement runs in its own process (torchrun for several ranks), so peak memory is that
variant's alone and the variants share nothing but the machine and the model files.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from statistics import median
from typing import Annotated

import torch
import typer
import yaml

from benchmarks.flops import (
    counted_flops,
    gemm_peak_gflops,
    train_step_flops,
    transformer_forward_flops,
)
from benchmarks.models import BenchModels, ensure_models
from benchmarks.project import memory_per_rank, paper_projection, scaled_to_flux_dev
from benchmarks.suites import ModelSpec, Suite, get_suite
from srpo.io import git_commit, package_versions, write_json

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "literal", "literal-no-anomaly")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} × {os.cpu_count()} cores"
    return platform.processor()


def _train_config(models: BenchModels, spec: ModelSpec, suite: Suite, batch: int, out: Path):
    config = {
        "base_model": str(models.flux),
        "embeddings": str(models.embeddings),
        "output_dir": str(out / "train"),
        "reward": {"kind": "hpsv2", "checkpoint": str(models.reward_checkpoint)},
        "batch_size": batch,
        "max_steps": 1000,
        "height": spec.train_px,
        "width": spec.train_px,
        "rollout_steps": suite.rollout_steps,
        "precision": "fp32" if suite.dtype == "float32" else "fsdp-bf16",
    }
    if models.reward_config is not None:
        config["reward"]["model_config_path"] = str(models.reward_config)
    path = out / f"train-{batch}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def checkout_pythonpath() -> str:
    """PYTHONPATH for a worker: the checkout first, then whatever the caller had (packages
    installed with --target, as benchmarks/gpu.sh does)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _run(command: list[str], threads: int, extra_env: dict[str, str] | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": checkout_pythonpath()}
    env.update(extra_env or {})
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{tail}")


def _train(
    variant: str,
    config: Path,
    world: int,
    suite: Suite,
    out: Path,
    extra_env: dict[str, str] | None = None,
) -> dict:
    target = out / f"{variant}-w{world}.json"
    worker = ["-m", "benchmarks.train_step", variant, str(config), str(target)]
    worker += [str(suite.warmup_steps), str(suite.train_steps), str(suite.warmup_rollout_steps)]
    if world == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={world}", *worker]
    typer.echo(f"  train step: {variant}, {world} process(es)")
    _run(command, max(1, (os.cpu_count() or 1) // world), extra_env)
    figures = json.loads(target.read_text())
    figures["seconds"] = median(figures["step_seconds"])
    return figures


def _sampling(models: BenchModels, spec: ModelSpec, suite: Suite, out: Path) -> dict:
    target = out / "sampling.json"
    options = {
        "device": suite.device,
        "dtype": suite.dtype,
        "steps": suite.sample_steps,
        "px": spec.sample_px,
        "text_tokens": spec.text_tokens,
        "prompts": suite.sample_prompts,
        "batches": list(suite.sample_batches),
    }
    command = [sys.executable, "-m", "benchmarks.sampling", str(models.flux)]
    command += [str(models.eval_prompts), str(target), json.dumps(options)]
    typer.echo("  sampling: stock FluxPipeline vs srpo sample")
    _run(command, os.cpu_count() or 1)
    return json.loads(target.read_text())


def _side_flops(models: BenchModels, spec: ModelSpec, device: torch.device) -> dict:
    """Counted forward FLOPs of the VAE decode (train and sample sizes) and the reward tower."""
    from srpo.flux import load_vae
    from srpo.rewards import load_reward

    vae = load_vae(str(models.flux)).to(device)
    arguments = {"checkpoint": models.reward_checkpoint}
    if models.reward_config is not None:
        arguments["model_config"] = models.reward_config
    reward = load_reward("hpsv2", **arguments).to(device)
    figures = {}
    for name, px in (("train", spec.train_px), ("sample", spec.sample_px)):
        latents = torch.zeros(1, 16, px // 8, px // 8, device=device)
        figures[f"vae_decode_{name}"] = counted_flops(vae.decode, latents)
    image = torch.zeros(1, 3, spec.train_px, spec.train_px, device=device)
    figures["reward"] = counted_flops(reward.semantic_relative_reward, image, "a", "b", 0.1)
    return figures


def _model_figures(spec: ModelSpec, suite: Suite, out: Path, peak: float, headline: bool):
    typer.echo(f"model {spec.name}: building or reusing {REPO / 'results/bench/models'}")
    models = ensure_models(spec, REPO / "results" / "bench" / "models")
    device = torch.device(suite.device)
    world = max(suite.world_sizes) if headline else 1
    config = _train_config(models, spec, suite, world, out)
    runs = {variant: _train(variant, config, world, suite, out) for variant in VARIANTS}
    lora = _train("ours-lora", config, world, suite, out)
    scaling = {}
    if headline and len(suite.world_sizes) > 1:
        for size in suite.world_sizes:
            run = runs["ours"] if size == world else _train("ours", config, size, suite, out)
            scaling[str(size)] = {
                "step_seconds": run["seconds"],
                "samples_per_s": world / run["seconds"],
                "peak_memory_mb_per_process": run["peak_memory_mb"],
                "threads_per_process": run["threads"],
            }
    sampling = _sampling(models, spec, suite, out)

    transformer = json.loads((models.flux / "transformer" / "config.json").read_text())
    train_tokens = (spec.train_px // 16) ** 2
    sample_tokens = (spec.sample_px // 16) ** 2
    forward = transformer_forward_flops(transformer, train_tokens, spec.text_tokens)
    side = _side_flops(models, spec, device)
    step_flops = world * train_step_flops(
        forward["total"], suite.rollout_steps, True, side["vae_decode_train"], side["reward"]
    )
    for row in scaling.values():  # the same global batch's FLOPs at each process count
        row["mfu"] = step_flops / row["step_seconds"] / (peak * 1e9)
    sample_forward = transformer_forward_flops(transformer, sample_tokens, spec.text_tokens)
    image_flops = suite.sample_steps * sample_forward["total"] + side["vae_decode_sample"]

    ours, literal = runs["ours"], runs["literal"]
    no_anomaly = runs["literal-no-anomaly"]
    best_batch = max(sampling["ours"], key=lambda b: sampling["ours"][b]["images_per_s"])
    best = sampling["ours"][best_batch]
    gflops = peak  # the whole machine: on the CPU the ranks share its cores
    parameters = _parameter_count(models.flux / "transformer")
    figures = {
        "spec": asdict(spec),
        "world_size": world,
        "train_step": {
            "seconds": {variant: run["seconds"] for variant, run in runs.items()},
            "ratio_vs_literal": literal["seconds"] / ours["seconds"],
            "ratio_vs_literal_no_anomaly": no_anomaly["seconds"] / ours["seconds"],
            "peak_memory_mb": {variant: run["peak_memory_mb"] for variant, run in runs.items()},
            "peak_rss_ratio": ours["peak_memory_mb"] / literal["peak_memory_mb"],
            "memory_kind": ours["memory_kind"],
            "phases": {variant: run["phases"] for variant, run in runs.items()},
            "losses_equal": _same_losses(ours, no_anomaly),
            "flops": step_flops,
            "mfu": step_flops / ours["seconds"] / (gflops * 1e9),
            "mfu_literal_no_anomaly": step_flops / no_anomaly["seconds"] / (gflops * 1e9),
            "forward_flops": forward,
            "lora_step_ratio": lora["seconds"] / ours["seconds"],
            "lora_peak_memory_ratio": lora["peak_memory_mb"] / ours["peak_memory_mb"],
            "lora": _lora_figures(lora, ours),
        },
        "scaling": scaling,
        "sampling": {
            "stock_images_per_s": sampling["stock_images_per_s"],
            "ours": sampling["ours"],
            "best_batch": int(best_batch),
            "ratio_vs_stock": best["images_per_s"] / sampling["stock_images_per_s"],
            "ratio_vs_stock_batch_1": sampling["ours"]["1"]["images_per_s"]
            / sampling["stock_images_per_s"],
            "max_abs_pixel_diff": sampling["ours"]["1"]["max_abs_pixel_diff_vs_stock"],
            "max_abs_pixel_diff_best_batch": best["max_abs_pixel_diff_vs_stock"],
            "flops_per_image": image_flops,
            "mfu": image_flops * best["images_per_s"] / (peak * 1e9),
        },
        "side_flops": side,
    }
    figures["flux_dev_depth"] = scaled_to_flux_dev(figures, transformer, parameters)
    return figures


def _lora_figures(lora: dict, full: dict) -> dict:
    """Our trainer with the default `lora:` section beside the same trainer in full."""
    from srpo.config import LoraConfig

    return {
        "rank": LoraConfig().rank,
        "seconds": {"full": full["seconds"], "lora": lora["seconds"]},
        "peak_memory_mb": {"full": full["peak_memory_mb"], "lora": lora["peak_memory_mb"]},
        "trainable_parameters": {
            "full": full["trainable_parameters"],
            "lora": lora["trainable_parameters"],
        },
        "phases": lora["phases"],
        # B starts at zero, so the first step's model, and loss, is the full run's
        "same_first_loss": _same_losses(
            {"records": lora["records"][:1]}, {"records": full["records"][:1]}, 0.0
        ),
    }


def _parameter_count(folder: Path) -> int:
    """Parameters of a saved diffusers model, read from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def _same_losses(first: dict, second: dict, tolerance: float = 1e-4) -> bool:
    keys = [k for k in first["records"][0] if k.startswith("loss/")]
    return all(
        abs(a[k] - b[k]) <= tolerance * max(1.0, abs(b[k]))
        for a, b in zip(first["records"], second["records"], strict=True)
        for k in keys
    )


def bench(suite_name: str, size: str, out_dir: Path) -> Path:
    suite = get_suite(suite_name, size)
    device = torch.device(suite.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--suite gpu --size full needs a CUDA device (smoke runs on the CPU)")
    work = REPO / "results" / "bench" / f"{suite.name}-{suite.size}"
    dtype = torch.float32 if suite.dtype == "float32" else torch.bfloat16
    torch.set_num_threads(os.cpu_count() or 1)
    peak = gemm_peak_gflops(suite.gemm_size, device, dtype)
    typer.echo(f"{suite.name}/{suite.size}: matmul peak {peak:.1f} GFLOP/s ({suite.dtype})")
    models = {}
    for spec in suite.models:
        headline = spec.name == suite.headline
        models[spec.name] = _model_figures(spec, suite, work / spec.name, peak, headline)
    top = models[suite.headline]
    result = {
        "suite": suite.name,
        "size": size,
        "commit": git_commit(REPO),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "device": suite.device,
        "dtype": suite.dtype,
        "packages": package_versions(("torch", "diffusers", "transformers", "open_clip_torch")),
        "gemm_peak_gflops": peak,
        "gemm_size": suite.gemm_size,
        "headline_model": suite.headline,
        "train_step": {k: top["train_step"][k] for k in TRAIN_KEYS},
        "sampling": {k: top["sampling"][k] for k in SAMPLING_KEYS},
        "scaling": top["scaling"],
        "memory_per_rank": memory_per_rank(),
        "projection": paper_projection(top, suite),
        "models": models,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = suite.name if size == "full" else f"{suite.name}-{size}"
    json_path = out_dir / f"{stem}-latest.json"
    write_json(json_path, result)
    from benchmarks.table import markdown

    (out_dir / f"{stem}-latest.md").write_text(markdown(result))
    typer.echo(markdown(result))
    return json_path


TRAIN_KEYS = (
    "ratio_vs_literal",
    "ratio_vs_literal_no_anomaly",
    "peak_rss_ratio",
    "mfu",
    "seconds",
    "losses_equal",
    "lora_step_ratio",
    "lora_peak_memory_ratio",
)
SAMPLING_KEYS = (
    "ratio_vs_stock",
    "ratio_vs_stock_batch_1",
    "max_abs_pixel_diff",
    "max_abs_pixel_diff_best_batch",
    "best_batch",
    "mfu",
)


class SuiteName(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


class Size(StrEnum):
    smoke = "smoke"
    full = "full"


@app.command()
def main(
    suite: Annotated[
        SuiteName,
        typer.Option(
            help="cpu: fp32 on this machine (tiny + real-width FLUX blocks); gpu: bf16 on one "
            "CUDA device (real width, 2+4 blocks, 720 px training, 1024 px sampling)."
        ),
    ] = SuiteName.cpu,
    size: Annotated[
        Size,
        typer.Option(help="smoke: minutes, the code path only (CI); full: the committed figures."),
    ] = Size.smoke,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where <suite>[-smoke]-latest.json and .md go (default: benchmarks/results)."
        ),
    ] = None,
) -> None:
    """Time our train step and sampler beside the authors' recipe and the stock FluxPipeline."""
    try:
        path = bench(suite.value, size.value, out_dir or REPO / "benchmarks" / "results")
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")
