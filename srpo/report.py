"""Paper-style results from score files: tables (Markdown, LaTeX, CSV), figures, provenance.

Every number in a table comes from `summarise`, a long table with one row per
(metric, model, style): n, mean, std, 95% confidence interval (Student t) and the change vs the
baseline model. The Markdown report embeds the PNG figures by relative path. Each file is
written atomically and a re-run first removes what a killed run left, so a report killed anywhere
and run again is byte-identical to an uninterrupted one (with SOURCE_DATE_EPOCH set for `created`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import yaml
from scipy import stats

from srpo.io import InputError, atomic_path, clear_staging, one_line, provenance, write_json
from srpo.sample_manifest import model_record, read_sample_manifest
from srpo.score import SCORE_COLUMNS
from srpo.scorers import SCORERS, TABLE_ORDER

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ALL_STYLES = "all"
METRIC_TITLES = {name: SCORERS[name].title for name in TABLE_ORDER}
REPORT_FILES = (
    "report.md",
    "provenance.json",
    "tables/summary.csv",
    "tables/overall.md",
    "tables/tables.tex",
    "tables/tables.html",
    "figures/score_distributions.png",
    "figures/image_grid.png",
    "figures/training_curves.png",
)
"""Everything `write_report` may write, relative to its out_dir."""


def read_scores(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate `srpo score` parquet files, checking each has the expected columns."""
    frames = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: score file not found")
        try:
            frame = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several unrelated types
            raise InputError(
                f"{path}: unreadable score file, expected `srpo score` parquet ({one_line(error)})"
            ) from None
        missing = [column for column in SCORE_COLUMNS if column not in frame.columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}, expected {list(SCORE_COLUMNS)}")
        frames.append(frame)
    if not frames:
        raise InputError("no score files given")
    return pd.concat(frames, ignore_index=True)


def _metric_order(metrics: Sequence[str]) -> list[str]:
    known = [m for m in TABLE_ORDER if m in metrics]
    return known + sorted(set(metrics) - set(known))


def _interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """mean, std (ddof 1), and the 95% Student-t interval of the mean."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * std / np.sqrt(len(values))
    return mean, std, mean - half, mean + half


def summarise(scores: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per (metric, model, style) — style "all" pools every prompt."""
    if baseline not in set(scores["model"]):
        raise InputError(
            f"baseline model {baseline!r} has no scores; models: {sorted(set(scores['model']))}"
        )
    rows = []
    pooled = scores.assign(style=ALL_STYLES)
    styled = scores[scores["style"].astype(str) != ""]
    for (metric, model, style), group in pd.concat([pooled, styled]).groupby(
        ["metric", "model", "style"], sort=False
    ):
        mean, std, low, high = _interval(group["score"].to_numpy(dtype=float))
        rows.append(
            {
                "metric": metric,
                "model": model,
                "style": style,
                "n": len(group),
                "mean": mean,
                "std": std,
                "ci95_low": low,
                "ci95_high": high,
            }
        )
    summary = pd.DataFrame(rows)
    base = summary[summary["model"] == baseline].set_index(["metric", "style"])["mean"]
    reference = summary.set_index(["metric", "style"]).index.map(base.get)
    summary["delta"] = summary["mean"] - reference.astype(float)
    summary["delta_pct"] = 100 * summary["delta"] / reference.astype(float).map(abs)
    return summary


def _cell(row: pd.Series, baseline: str, precision: int) -> str:
    text = f"{row['mean']:.{precision}f} ± {row['std']:.{precision}f}"
    if row["model"] != baseline and np.isfinite(row["delta_pct"]):
        text += f" ({row['delta_pct']:+.1f}%)"
    return text


def overall_table(summary: pd.DataFrame, baseline: str, models: Sequence[str], precision: int):
    """Models × metrics: "mean ± std (+x.x% vs baseline)"."""
    overall = summary[summary["style"] == ALL_STYLES]
    metrics = _metric_order(list(overall["metric"].unique()))
    table = pd.DataFrame(index=list(models), columns=[METRIC_TITLES.get(m, m) for m in metrics])
    for _, row in overall.iterrows():
        table.loc[row["model"], METRIC_TITLES.get(row["metric"], row["metric"])] = _cell(
            row, baseline, precision
        )
    table.index.name = "model"
    return table.fillna("—")


def style_table(
    summary: pd.DataFrame, metric: str, baseline: str, models: Sequence[str], precision: int
):
    """Models × HPD styles (+ all) for one metric."""
    rows = summary[summary["metric"] == metric]
    styles = [s for s in sorted(rows["style"].unique()) if s != ALL_STYLES] + [ALL_STYLES]
    table = pd.DataFrame(index=list(models), columns=styles)
    for _, row in rows.iterrows():
        table.loc[row["model"], row["style"]] = _cell(row, baseline, precision)
    table.index.name = "model"
    return table.fillna("—")


def to_markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                          ("#", r"\#"), ("±", r"$\pm$")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs} in the paper)."""
    columns = [table.index.name or "", *map(str, table.columns)]
    body = [
        " & ".join(_latex_escape(str(cell)) for cell in [index, *row.tolist()]) + r" \\"
        for index, row in table.iterrows()
    ]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
            r"\toprule",
            " & ".join(_latex_escape(c) for c in columns) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            rf"\caption{{{_latex_escape(caption)}}}",
            rf"\label{{{label}}}",
            r"\end{table}",
            "",
        ]
    )


def _save_figure(figure, path: Path) -> None:
    with atomic_path(path) as staged:
        figure.savefig(staged, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def score_distributions(scores: pd.DataFrame, models: Sequence[str], path: Path) -> Path:
    """One panel per metric: the per-image score distribution of each model."""
    metrics = _metric_order(list(scores["metric"].unique()))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        data = [
            scores[(scores["metric"] == metric) & (scores["model"] == m)]["score"].to_numpy()
            for m in models
        ]
        axis.boxplot(data, tick_labels=list(models), showmeans=True)
        axis.set_title(METRIC_TITLES.get(metric, metric))
        axis.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def image_grid(
    samples: dict[str, Path], path: Path, max_prompts: int = 8
) -> tuple[Path, list[int]]:
    """Rows: the same prompts (same seeds); columns: baseline then each checkpoint."""
    from srpo.score import open_rgb

    manifests = {label: read_sample_manifest(folder) for label, folder in samples.items()}
    shared = set.intersection(*({image.prompt_id for image in m} for m in manifests.values()))
    first = next(iter(manifests.values()))
    chosen = [image for image in first if image.prompt_id in shared][:max_prompts]
    if not chosen:
        raise InputError(f"no prompt was sampled by every model: {sorted(samples)}")
    columns = list(samples)
    figure, axes = plt.subplots(
        len(chosen), len(columns), figsize=(2.6 * len(columns), 2.6 * len(chosen)), squeeze=False
    )
    by_id = {label: {image.prompt_id: image for image in m} for label, m in manifests.items()}
    for row, prompt in enumerate(chosen):
        for column, label in enumerate(columns):
            axis = axes[row][column]
            axis.imshow(open_rgb(by_id[label][prompt.prompt_id].path))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(label, fontsize=10)
            if column == 0:
                axis.set_ylabel(f"#{prompt.prompt_id} {prompt.prompt[:28]}", fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)
    return path, [prompt.prompt_id for prompt in chosen]


TRAINING_PANELS = ("reward/denoise", "reward/inversion", "loss/denoise", "grad_norm")
"""Curves of every run; the held-out evaluation's `eval/…` curves (srpo/train/evaluate.py)
follow them, when a run has them, so a metric falling while the reward rises shows."""


def training_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """Reward, loss, grad-norm and held-out curves from each run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    held_out: set[str] = set()
    for label, folder in runs.items():
        if not Path(folder).is_dir():
            continue
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        held_out |= {tag for tag in tags if tag.startswith("eval/") and tag != "eval/collapse"}
        curves[label] = {
            tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in tags
            if tag in TRAINING_PANELS or tag in held_out
        }
    if not any(curves.values()):
        return None
    panels = [*TRAINING_PANELS, *sorted(held_out)]
    columns = len(TRAINING_PANELS)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, tag in zip(axes.flat, panels, strict=False):
        for label, series in curves.items():
            if tag in series:
                axis.plot(*series[tag], marker=".", label=label)
        axis.set_title(f"{tag} (held-out)" if tag in held_out else tag)
        axis.set_xlabel("step")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def _read_configs(configs: Sequence[Path]) -> dict[str, dict]:
    """Each workflow config file's keys, by path, in command-line order (later ones win)."""
    read = {}
    for path in map(Path, configs):
        try:
            read[str(path)] = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise InputError(f"{path}: unreadable workflow config ({error})") from None
        if not isinstance(read[str(path)], dict):
            raise InputError(f"{path}: expected a YAML mapping of config keys")
    return read


def _origin(configs: dict[str, dict], overrides: Sequence[str]) -> list[str]:
    """The report's opening sentences: which config made it, and what tiny scores can mean."""
    if not configs:
        return []
    merged = {key: value for config in configs.values() for key, value in config.items()}
    files = " + ".join(f"`{path}`" for path in configs)
    changed = "".join(f", `--config {override}`" for override in overrides)
    sentences = [
        f"Produced by the workflow config {files}{changed} (run `{merged.get('run', '?')}`)."
    ]
    if merged.get("tiny_models"):
        sentences.append(
            "Tiny random-initialised models (`tiny_models: true`): these scores only show that "
            "the pipeline runs end to end. They carry no meaning about SRPO or FLUX.1-dev."
        )
    return sentences


def tables_html(title: str, origin: Sequence[str], tables: dict[str, pd.DataFrame]) -> str:
    """The paper-style tables as one HTML page (what `snakemake --report` shows inline)."""

    def paragraph(sentence: str) -> str:
        parts = html.escape(sentence).split("`")
        return "<p>" + "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = "".join(
        f"<h2>{html.escape(heading)}</h2>"
        f"{table.reset_index().to_html(border=0, classes='scores', index=False)}"
        for heading, table in tables.items()
    )
    style = (
        "body{font-family:sans-serif;margin:1.5em}table.scores{border-collapse:collapse;"
        "margin-bottom:1.5em}th,td{padding:.3em .8em;border-bottom:1px solid #ccc;"
        "text-align:right}th:first-child,td:first-child{text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{''.join(map(paragraph, origin))}{body}</body></html>\n"
    )


def _weight_hashes(scores: pd.DataFrame, samples: dict[str, Path]) -> dict[str, object]:
    hashes: dict[str, object] = {
        f"metric:{metric}": json.loads(value)
        for metric, value in scores.groupby("metric")["checkpoint_sha256"].first().items()
    }
    for label, folder in samples.items():
        model = model_record(folder)
        if model is not None:
            hashes[f"model:{label}"] = model
    return hashes


def write_report(
    score_files: Sequence[Path],
    baseline: str,
    out_dir: Path,
    samples: dict[str, Path] | None = None,
    training_runs: dict[str, Path] | None = None,
    configs: Sequence[Path] = (),
    precision: int = 4,
    config_overrides: Sequence[str] = (),
) -> Path:
    """Write report.md, tables/ (CSV, .tex, .md, .html), figures/ and provenance.json into
    out_dir. `configs`: the workflow config file(s) that produced the scores, named at the top
    with the command line's `config_overrides` (KEY=VALUE)."""
    workflow_configs = _read_configs(configs)
    origin = _origin(workflow_configs, config_overrides)
    record = provenance(  # before any output: a bad SOURCE_DATE_EPOCH writes nothing
        {"config_files": list(workflow_configs), "config_overrides": list(config_overrides),
         "configs": {path: Path(path).read_text() for path in workflow_configs}},
        None,
    )  # fmt: skip
    scores = read_scores(score_files)
    summary = summarise(scores, baseline)
    models = [baseline, *sorted(set(scores["model"]) - {baseline})]
    out_dir = Path(out_dir)
    clear_staging(out_dir / name for name in REPORT_FILES)
    tables, figures = out_dir / "tables", out_dir / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)

    with atomic_path(tables / "summary.csv") as staged:
        summary.to_csv(staged, index=False)
    overall = overall_table(summary, baseline, models, precision)
    sections = [
        "# SRPO evaluation report",
        "",
        *(line for sentence in origin for line in (sentence, "")),
        f"Baseline: **{baseline}**. Cells: mean ± std over images (change of the mean vs the "
        "baseline). 95% confidence intervals: `tables/summary.csv`.",
        "",
        "## All prompts",
        "",
        to_markdown(overall),
        "",
    ]
    latex = [to_latex(overall, "Mean ± std per metric (change vs baseline).", "tab:overall")]
    html_tables = {"All prompts": overall}
    for metric in _metric_order(list(summary["metric"].unique())):
        per_style = style_table(summary, metric, baseline, models, precision)
        title = METRIC_TITLES.get(metric, metric)
        sections += [f"## {title} by HPD style", "", to_markdown(per_style), ""]
        latex.append(to_latex(per_style, f"{title} by HPD style.", f"tab:{metric}-styles"))
        html_tables[f"{title} by HPD style"] = per_style
    with atomic_path(tables / "overall.md") as staged:
        staged.write_text(to_markdown(overall) + "\n")
    with atomic_path(tables / "tables.tex") as staged:
        staged.write_text("\n".join(latex))
    with atomic_path(tables / "tables.html") as staged:
        staged.write_text(tables_html("SRPO evaluation: mean ± std", origin, html_tables))

    sections += ["## Score distributions", "", "![scores](figures/score_distributions.png)", ""]
    score_distributions(scores, models, figures / "score_distributions.png")
    if samples:
        ordered = {label: samples[label] for label in models if label in samples}
        _, prompt_ids = image_grid(ordered, figures / "image_grid.png")
        sections += [
            "## Image grid",
            "",
            f"Same prompts and seeds in every column (prompt ids {prompt_ids}).",
            "",
            "![grid](figures/image_grid.png)",
            "",
        ]
    if training_runs and training_curves(training_runs, figures / "training_curves.png"):
        sections += ["## Training curves", "", "![curves](figures/training_curves.png)", ""]

    record["weights"] = _weight_hashes(scores, samples or {})
    record["score_files"] = [str(path) for path in score_files]
    write_json(out_dir / "provenance.json", record)
    sections += [
        "## Provenance",
        "",
        f"- git commit: `{record['git_commit']}`",
        f"- created: {record['created']} on {record['host']}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items()),
        "- weights (sha256): see `provenance.json`",
    ]
    for path in workflow_configs:
        sections += ["", f"`{path}`:", "", "```yaml", Path(path).read_text().rstrip(), "```"]
    report = out_dir / "report.md"
    with atomic_path(report) as staged:
        staged.write_text("\n".join(sections) + "\n")
    return report
