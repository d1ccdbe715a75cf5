"""The three precision policies of `srpo train` side by side on fixed inputs (one process):
the loss, reward and gradient of one step under each vs the fp32 reference, and its seconds.

    python -m benchmarks.precision [--size smoke|full] [--out-dir DIR]

Each policy runs in its own process (`python -m benchmarks.precision_step`), so its peak memory
is its own; the gradients meet in files.

Every policy starts from the same weights and sees the same prompts, rollout noise and mids
(same seed, step 1), so the differences are the policy's alone. The gradient is read before
AdamW's step, after clipping to 0.1 (what the update uses); `grad_norm` is the norm before
clipping. Relative error: |x − x_fp32| / |x_fp32|, over the whole gradient vector for the
gradient. Seconds: a second step, after the first has warmed every kernel up. The device is
the trainer's own: the GPU where there is one, else the CPU (whose bf16 matmuls are slow).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from benchmarks.models import ensure_models
from benchmarks.run import _run, _train_config
from benchmarks.suites import ModelSpec, Suite
from srpo.io import git_commit, package_versions, write_json
from srpo.runtime.precision import POLICIES

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    # The whole code path on the tiny models, for CI.
    "smoke": (ModelSpec("tiny", real_width=False), 2),
    # FLUX.1-dev's block widths (1 double + 1 single block), 64 px, a 4-step rollout.
    "full": (ModelSpec("real-width", real_width=True, train_px=64, sample_px=64), 4),
}
"""Size → (model, rollout steps); batch 1, one process."""
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def measure(precision: str, config: Path, work: Path) -> dict:
    """One policy in its own process: the first step's figures, the second's seconds."""
    out = work / precision
    command = [sys.executable, "-m", "benchmarks.precision_step", precision, str(config), str(out)]
    _run(command, os.cpu_count() or 1)
    return json.loads((out / "figures.json").read_text())


def relative(value: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    difference = torch.as_tensor(value) - torch.as_tensor(reference)
    return float(difference.norm() / torch.as_tensor(reference).norm())


def table(result: dict) -> str:
    lines = [
        f"# Precision policies ({result['size']}: {result['model']}, {result['device']})",
        "",
        f"{result['date']} · commit {result['commit'][:10]} · torch {result['torch']}",
        "",
        "| policy | loss | rel. err | reward | rel. err | grad norm | rel. err | gradient rel. "
        "err | step s | vs fp32 | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = result["policies"]["fp32"]["seconds"]
    for name, row in result["policies"].items():
        lines.append(
            f"| {name} | {row['loss']:.6f} | {row['loss_rel_err']:.2e} | {row['reward']:.6f} | "
            f"{row['reward_rel_err']:.2e} | {row['grad_norm']:.4g} | "
            f"{row['grad_norm_rel_err']:.2e} | {row['gradient_rel_err']:.2e} | "
            f"{row['seconds']:.2f} | {reference / row['seconds']:.2f}× | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    size: Annotated[str, typer.Option(help="smoke (tiny models) or full (real width).")] = "full",
    out_dir: Annotated[
        Path, typer.Option(help="Where precision-<size>-<cpu|gpu>.json and .md go.")
    ] = REPO / "benchmarks" / "results",
) -> None:
    """Loss, reward and gradient of one step per precision policy vs fp32, and step seconds."""
    if size not in SIZES:
        raise typer.BadParameter(f"expected one of {sorted(SIZES)}", param_hint="--size")
    spec, rollout_steps = SIZES[size]
    models = ensure_models(spec, REPO / "results" / "bench" / "models")
    work = REPO / "results" / "bench" / f"precision-{size}"
    # The bench's own training config (fp32; each worker sets its policy and output folder).
    suite = Suite("precision", size, "cpu", "float32", (spec,), rollout_steps=rollout_steps)
    config_path = _train_config(models, spec, suite, 1, work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    figures = {}
    for precision in POLICIES:
        typer.echo(f"  {precision}")
        figures[precision] = measure(precision, config_path, work)
    reference = figures["fp32"]
    reference_gradient = torch.load(reference["gradient_file"])
    policies = {}
    for name, row in figures.items():
        gradient = torch.load(row["gradient_file"])
        policies[name] = {
            "loss": row["loss"],
            "loss_rel_err": relative(row["loss"], reference["loss"]),
            "reward": row["reward"],
            "reward_rel_err": relative(row["reward"], reference["reward"]),
            "grad_norm": row["grad_norm"],
            "grad_norm_rel_err": relative(row["grad_norm"], reference["grad_norm"]),
            "gradient_rel_err": relative(gradient, reference_gradient),
            "seconds": row["seconds"],
            "peak_rss_mb": row["peak_rss_mb"],
        }
        del gradient
    for row in figures.values():
        Path(row["gradient_file"]).unlink()
    result = {
        "size": size,
        "model": spec.name,
        "device": device,
        "rollout_steps": rollout_steps,
        "train_px": spec.train_px,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": package_versions().get("torch"),
        "policies": policies,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    write_json(out_dir / f"precision-{size}-{kind}.json", result)
    (out_dir / f"precision-{size}-{kind}.md").write_text(table(result))
    typer.echo(table(result))


if __name__ == "__main__":
    app()
