"""Peak GPU memory per rank of a training config, per world size, precision and gather scope.

    python -m benchmarks.memory                       # the paper profile at W = 8 and 32
    python -m benchmarks.memory --help                # every option

The figures come from `srpo.memory.estimate` (models built on fake tensors from their real
configs, activations measured by running the trainer's computations on them): the same
estimate `srpo doctor` prints for the config it checks. No GPU, no weights, about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from srpo.config import TrainConfig, load_train_config
from srpo.memory import (
    GB,
    MemoryEstimate,
    estimate,
    gather_scopes,
    gpu_bytes,
    model_configs,
    verdict,
)
from srpo.runtime.precision import POLICIES

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def with_evaluation(config: TrainConfig, metrics: list[str], batch_size: int) -> TrainConfig:
    """`config` with a held-out evaluation watching `metrics` (their published models)."""
    evaluation = config.evaluation.model_copy(
        update={
            "every": 1,
            "metrics": {name: {} for name in metrics},
            "batch_size": batch_size,
            "max_prompts": None,
        }
    )
    return config.model_copy(update={"evaluation": evaluation})


def row(base: MemoryEstimate, evaluated: MemoryEstimate | None, limit: int, host_node: int) -> dict:
    shown = evaluated or base
    return {
        "world_size": base.world_size,
        "precision": base.precision,
        "gather_params": base.gather_params,
        "training_gb": base.training / GB,
        "phase": base.phase,
        "states_gb": (base.shards + base.gradients + base.optimizer) / GB,
        "gathered_gb": base.gathered / GB,
        "activations_gb": base.activations / GB,
        "frozen_gb": (base.vae + base.reward) / GB,
        "startup_gb": base.startup / GB,
        "peak_gb": base.peak / GB,
        "fits": verdict(base, limit),
        "evaluation_gb": evaluated.evaluation / GB if evaluated else None,
        "peak_with_evaluation_gb": shown.peak / GB if evaluated else None,
        "fits_with_evaluation": verdict(shown, limit) if evaluated else None,
        "host_rank0_gb": base.host_rank0 / GB,
        "host_node_gb": host_node / GB,
        "estimate": base.to_dict(),
        "estimate_with_evaluation": evaluated.to_dict() if evaluated else None,
    }


def markdown(rows: list[dict], limit: int, evaluation: str | None) -> str:
    head = (
        "| W | precision | gather_params | training peak (phase) | shards + grads + AdamW | "
        "gathered | activations | VAE + reward | start-up | **peak** |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    if evaluation:
        head += f" evaluation ({evaluation}) | peak with evaluation |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        mark = "" if r["fits"] == "ok" else f" ({r['fits']})"
        line = (
            f"| {r['world_size']} | {r['precision']} | {r['gather_params']} | "
            f"{r['training_gb']:.1f} ({r['phase']}) | {r['states_gb']:.1f} | "
            f"{r['gathered_gb']:.1f} | {r['activations_gb']:.1f} | {r['frozen_gb']:.1f} | "
            f"{r['startup_gb']:.1f} | **{r['peak_gb']:.1f}**{mark} |"
        )
        if evaluation:
            tag = "" if r["fits_with_evaluation"] == "ok" else f" ({r['fits_with_evaluation']})"
            line += f" {r['evaluation_gb']:.1f} | {r['peak_with_evaluation_gb']:.1f}{tag} |"
        lines.append(line)
    lines.append("")
    lines.append(
        f"GB = 1e9 bytes per rank; limit {limit / GB:.1f} GB: (fail) above it, (warn) above 90% "
        "of it (CUDA context, NCCL buffers and fragmentation are not counted)."
    )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    config: Annotated[
        Path, typer.Option(help="Training config (srpo train --config) to estimate.")
    ] = REPO / "config" / "train-paper.yaml",
    world_size: Annotated[
        list[int] | None,
        typer.Option(help="Ranks (GPUs) in all, repeatable. Default: 8 and 32."),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(help="Precision policies, repeatable. Default: every policy."),
    ] = None,
    gather_params: Annotated[
        list[str] | None,
        typer.Option(help="gather_params scopes, repeatable. Default: every scope."),
    ] = None,
    nproc_per_node: Annotated[
        int, typer.Option(help="Ranks per node, for the host memory of rank 0's node.")
    ] = 8,
    text_tokens: Annotated[
        int, typer.Option(help="T5 tokens of the prompt embeddings (encode.max_sequence_length).")
    ] = 512,
    gpu_memory: Annotated[
        float | None,
        typer.Option(help="GB of one GPU for the verdicts. Default: the visible GPU's, else 80."),
    ] = None,
    evaluation_metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated held-out metrics (hpsv2, aesthetic, pickscore, imagereward, "
            "hpsv3) to add a held-out evaluation with their published models: adds the "
            "columns 'evaluation' and 'peak with evaluation'. Default: the config's own."
        ),
    ] = None,
    evaluation_batch_size: Annotated[
        int, typer.Option(help="evaluation.batch_size with --evaluation-metrics.")
    ] = 8,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every estimate to this JSON file.")
    ] = None,
) -> None:
    """Print the per-rank GPU memory table of a training config (Markdown)."""
    base = load_train_config(config)
    limit = int(gpu_memory * GB) if gpu_memory else gpu_bytes()[0]
    metrics = [name.strip() for name in (evaluation_metrics or "").split(",") if name.strip()]
    models = model_configs(base)
    evaluated_models = (
        model_configs(with_evaluation(base, metrics, evaluation_batch_size)) if metrics else None
    )
    rows = []
    for world in world_size or [8, 32]:
        for policy in precision or list(POLICIES):
            for scope in gather_params or list(gather_scopes()):
                chosen = base.model_copy(update={"precision": policy, "gather_params": scope})
                plain = estimate(chosen, world, models, text_tokens)
                evaluated = None
                if evaluated_models is not None:
                    watched = with_evaluation(chosen, metrics, evaluation_batch_size)
                    evaluated = estimate(watched, world, evaluated_models, text_tokens)
                rows.append(row(plain, evaluated, limit, plain.host_per_node(nproc_per_node)))
    label = f"{', '.join(metrics)}; batch {evaluation_batch_size}" if metrics else None
    typer.echo(markdown(rows, limit, label))
    first = rows[0]
    typer.echo(
        f"Parameters {first['estimate']['parameters']:,}. Host memory at start-up: rank 0 "
        f"{first['host_rank0_gb']:.1f} GB, rank 0's node ({nproc_per_node} ranks loading at "
        f"once) {first['host_node_gb']:.1f} GB."
    )
    for note in models.notes:
        typer.echo(f"Note: {note}.")
    if json_out is not None:
        shown = config.resolve()
        shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
        payload = {"config": str(shown), "limit_gb": limit / GB, "rows": rows}
        json_out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    app()
