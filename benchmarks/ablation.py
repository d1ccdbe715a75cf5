"""What each optimisation of our trainer buys, measured in one run on the same machine.

    python -m benchmarks.ablation [--suite cpu --size full]

Runs our train step on the suite's headline model (same ranks, inputs and threads as
`python -m benchmarks`) once per configuration, from the code before the optimisations (FSDP2's
per-forward gathers, the per-tensor AdamW loop) to today's default, and writes
benchmarks/results/<suite>-ablation.json and .md.
"""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from benchmarks.models import ensure_models
from benchmarks.run import REPO, _train, _train_config
from benchmarks.suites import get_suite
from srpo.io import git_commit, write_json

CONFIGURATIONS = {
    "before (gather per forward, AdamW loop)": {
        "gather_params": "forward", "fused": False, "fuse_branches": False, "huge_pages": False,
    },
    "+ fused AdamW": {
        "gather_params": "forward", "fused": True, "fuse_branches": False, "huge_pages": False,
    },
    "+ gather once for the rollout": {
        "gather_params": "rollout", "fused": True, "fuse_branches": False, "huge_pages": False,
    },
    "+ both branches in one call": {
        "gather_params": "rollout", "fused": True, "fuse_branches": True, "huge_pages": False,
    },
    "+ huge pages for large CPU tensors": {
        "gather_params": "rollout", "fused": True, "fuse_branches": True, "huge_pages": True,
    },
    "+ the rollout's gather kept through the first call's backward (default)": {
        "gather_params": "first_call", "fused": True, "fuse_branches": True, "huge_pages": True,
    },
    "gather once for the whole step": {
        "gather_params": "step", "fused": True, "fuse_branches": True, "huge_pages": True,
    },
}  # fmt: skip
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    suite: Annotated[str, typer.Option(help="cpu or gpu.")] = "cpu",
    size: Annotated[str, typer.Option(help="smoke or full.")] = "full",
    only: Annotated[
        list[int] | None,
        typer.Option(
            help="Run only these rows of the table (0 = before, 6 = gather for the whole "
            "step; repeatable); the results go to <suite>-ablation-<rows>.json and .md."
        ),
    ] = None,
) -> None:
    """Time our step under each configuration of CONFIGURATIONS."""
    chosen = sorted(set(only)) if only else list(range(len(CONFIGURATIONS)))
    if not all(0 <= row < len(CONFIGURATIONS) for row in chosen):
        raise typer.BadParameter(
            f"expected rows 0 to {len(CONFIGURATIONS) - 1}", param_hint="--only"
        )
    bench = get_suite(suite, size)
    spec = next(s for s in bench.models if s.name == bench.headline)
    models = ensure_models(spec, REPO / "results" / "bench" / "models")
    world = max(bench.world_sizes)
    work = REPO / "results" / "bench" / f"{suite}-{size}-ablation"
    base = yaml.safe_load(_train_config(models, spec, bench, world, work).read_text())
    rows = {}
    for number, (name, settings) in enumerate(CONFIGURATIONS.items()):
        if number not in chosen:
            continue
        config = {**base, "gather_params": settings["gather_params"]}
        config["fuse_branches"] = settings["fuse_branches"]
        config["optim"] = {"fused": settings["fused"]}
        folder = work / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.yaml").write_text(yaml.safe_dump(config))
        pages = {"THP_MEM_ALLOC_ENABLE": "1" if settings["huge_pages"] else "0"}
        run = _train("ours", folder / "train.yaml", world, bench, folder, pages)
        rows[name] = {
            "settings": settings,
            "seconds": run["seconds"],
            "peak_memory_mb": run["peak_memory_mb"],
            "phases": run["phases"],
        }
    first = next(iter(rows.values()))["seconds"]
    options = "".join(f" --only {row}" for row in chosen) if only else ""
    lines = [
        f"# Ablation: `python -m benchmarks.ablation --suite {suite} --size {size}{options}`",
        "",
        f"commit {git_commit(REPO)[:10]} · {spec.name} model · {world} ranks",
        "",
        "| configuration | step s | speed-up vs first row | peak MB | rollout s | branch forward s "
        "| backward s | optimizer s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        phases = row["phases"]
        lines.append(
            f"| {name} | {row['seconds']:.2f} | {first / row['seconds']:.2f}× | "
            f"{row['peak_memory_mb']:.0f} | {phases['rollout']:.2f} | "
            f"{phases['branch_forward']:.2f} | {phases['backward']:.2f} | "
            f"{phases['optimizer']:.2f} |"
        )
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-ablation" + ("-" + "-".join(map(str, chosen)) if only else "")
    write_json(out / f"{stem}.json", {"suite": suite, "size": size, "rows": rows})
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
