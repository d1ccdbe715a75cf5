"""The `srpo` command: one sub-command per pipeline stage, each a thin call into the package.

User mistakes (a missing file, a bad config value) end as one line on stderr and exit status 2;
a stop by SIGTERM / SIGUSR1 during training ends with status 75 after a checkpoint, a run stopped
by its numerical guard (`max_bad_steps` NaN/Inf updates in a row) with status 3.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click  # typer 0.29 vendors click (pinned in the locks)

from srpo import __version__
from srpo.io import InputError
from srpo.scorers import MAIN, SCORERS, TABLE_ORDER

OWN_ENVIRONMENT = [name for name in TABLE_ORDER if SCORERS[name].environment != MAIN]
"""Scorers whose models `srpo make-tiny` builds only inside their own environment."""

app = typer.Typer(
    help="SRPO fine-tuning of FLUX: tiny models, text-embedding cache, training, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class DType(StrEnum):
    """Floating-point formats an option may name."""

    float32 = "float32"
    bfloat16 = "bfloat16"

    @property
    def torch(self):
        from srpo.runtime.precision import DTYPES

        return DTYPES[self.value]


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (InputError, ValueError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return run


VerifyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--verify",
        help="PATH=SHA256, repeatable: check the file's sha256 before any compute (the "
        "workflow passes its config's `weights:` entries); hashes of files of 64 MB and more "
        "are cached by path, size and mtime.",
    ),
]


def _check_inputs(verify: list[str] | None, pretrained: dict[str, str | None]) -> None:
    """Before any compute: the --verify hashes, and each folder / hub id (named by its option
    or key) reachable, so a bad download is one line and not a failure minutes in."""
    from srpo.verify import parse_expected, require_pretrained, verify_files

    verify_files(parse_expected(verify))
    for what, reference in pretrained.items():
        if reference:
            require_pretrained(reference, what)


def _usage_line(error: click.ClickException) -> str:
    """Typer's usage errors (a boxed panel otherwise) in the one-line form of every other
    error: `<option>: <what was expected>`."""
    command = error.ctx.command_path if getattr(error, "ctx", None) else "srpo"
    see = f"see `{command} --help`"
    if isinstance(error, click.BadParameter):
        param = error.param
        hint = "/".join(param.opts) if param is not None else str(error.param_hint or command)
        if isinstance(error, click.MissingParameter):
            return f"{hint}: required, {see}"
        return f"{hint}: {error.message.removeprefix('Value error, ').rstrip('.')}"
    if isinstance(error, click.NoSuchOption):
        guess = (
            f", did you mean {' or '.join(sorted(error.possibilities))}?"
            if error.possibilities
            else ""
        )
        return f"{error.option_name}: no such option of `{command}`{guess} ({see})"
    if isinstance(error, click.BadOptionUsage):
        wanted = "a value after it" if "requires" in error.message else "no value"
        return f"{error.option_name}: expected {wanted} ({see})"
    return f"{command}: {error.format_message()} ({see})"


def main() -> None:
    """The `srpo` command: the app, with usage errors as one line and exit status 2."""
    try:
        status = app(prog_name="srpo", standalone_mode=False)
    except click.NoArgsIsHelpError as error:
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:
        typer.echo(f"error: {_usage_line(error)}", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"srpo {__version__}")
        raise typer.Exit()


@app.callback()
def srpo(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """SRPO (Direct-Align + Semantic Relative Preference Optimization) for FLUX."""


@app.command("make-tiny")
@_one_line_errors
def make_tiny_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create, one sub-folder per model.")],
    seed: Annotated[int, typer.Option(help="Seed of every random weight.")] = 0,
    part: Annotated[
        list[str] | None,
        typer.Option(
            help="Model to build, repeatable: flux, hpsv2, pickscore, aesthetic (default: all "
            f"four); {' and '.join(OWN_ENVIRONMENT)} only inside their own environments "
            "(.venv-NAME)."
        ),
    ] = None,
) -> None:
    """Build tiny random FLUX + scorer models in the real on-disk formats (offline, seconds)."""
    from srpo.tiny import MAIN_PARTS, make_tiny, manifest_name

    parts = tuple(part) if part else MAIN_PARTS
    hashes = make_tiny(out_dir, seed, parts)
    typer.echo(
        f"wrote {len(hashes)} files to {out_dir} ({manifest_name(parts)} lists their sha256)"
    )


@app.command("encode")
@_one_line_errors
def encode_command(
    base_model: Annotated[str, typer.Option(help="diffusers FLUX folder or hub id.")],
    prompts: Annotated[
        Path, typer.Option(help="Prompt file: .txt, one prompt per line, or an evaluation CSV.")
    ],
    out_dir: Annotated[Path, typer.Option(help="Cache folder to write (index.json + shards).")],
    max_sequence_length: Annotated[int, typer.Option(help="T5 tokens per prompt.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Prompts per encoder call.")] = 8,
    dtype: Annotated[DType, typer.Option(help="Stored dtype.")] = DType.float32,
    verify: VerifyOption = None,
) -> None:
    """Pre-compute FLUX text conditioning; under torchrun each rank encodes one shard."""
    _check_inputs(verify, {"--base-model": base_model})
    from srpo.encode import encode_prompts

    index = encode_prompts(
        base_model, prompts, out_dir, max_sequence_length, batch_size, dtype.torch
    )
    typer.echo(f"wrote {index}")


@app.command("train")
@_one_line_errors
def train_command(
    config: Annotated[Path, typer.Option(help="Training config YAML (see config/README.md).")],
    max_steps: Annotated[
        int | None, typer.Option(help="Override max_steps (optimizer updates).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the run seed.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Override output_dir.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Override base_model.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Override embeddings.")] = None,
    eval_embeddings: Annotated[
        Path | None,
        typer.Option(help="Override evaluation.embeddings (the held-out prompts' cache)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Resume from the newest complete checkpoint in output_dir.")
    ] = True,
    resume_from: Annotated[
        Path | None, typer.Option(help="Resume from this checkpoint folder instead.")
    ] = None,
    verify: VerifyOption = None,
) -> None:
    """Fine-tune the FLUX transformer with SRPO; launch with torchrun for several processes."""
    from srpo.config import load_train_config

    overrides = {
        "max_steps": max_steps,
        "seed": seed,
        "base_model": base_model,
        "output_dir": str(output_dir) if output_dir else None,
        "embeddings": str(embeddings) if embeddings else None,
        "evaluation.embeddings": str(eval_embeddings) if eval_embeddings else None,
    }
    settings = load_train_config(config, overrides)
    _check_inputs(
        verify,
        {
            f"{config}: base_model": settings.base_model,
            f"{config}: reward.model_path": settings.reward.model_path,
            f"{config}: reward.processor_path": settings.reward.processor_path,
        },
    )
    # The trainer's imports (torch, diffusers) come after the config and inputs are checked,
    # so that a mistake there is one line at once.
    from srpo.train.evaluate import EXIT_COLLAPSED, RewardHacking
    from srpo.train.run import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingDiverged, train

    try:
        result = train(settings, resume, resume_from)
    except TrainingDiverged as error:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DIVERGED)
    except RewardHacking as error:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"error: {error}", err=True)
        sys.exit(EXIT_COLLAPSED)
    if result.stopped_by_signal is not None:
        typer.echo(
            f"stopped by signal {result.stopped_by_signal} after step {result.step}; "
            f"checkpoint {result.checkpoint}; run again to resume",
            err=True,
        )
        sys.exit(EXIT_PREEMPTED)
    if result.export is not None:
        typer.echo(f"trained to step {result.step}; model exported to {result.export}")


@app.command("export")
@_one_line_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A step-NNNNNNNN checkpoint folder.")],
    base_model: Annotated[str, typer.Option(help="The FLUX base the run started from.")],
    out_dir: Annotated[Path, typer.Option(help="Folder to write.")],
    dtype: Annotated[DType, typer.Option(help="Dtype of the exported weights.")] = DType.bfloat16,
) -> None:
    """Write a checkpoint as a diffusers transformer folder + one safetensors state dict."""
    _check_inputs(None, {"--base-model": base_model})
    from srpo.train.checkpoint import export_checkpoint

    typer.echo(f"wrote {export_checkpoint(checkpoint, base_model, out_dir, dtype.torch)}")


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """KEY=VALUE options → dict; a value without '=' is a one-line error naming the option."""
    pairs = {}
    for value in values or []:
        key, separator, rest = value.partition("=")
        if not separator or not key or not rest:
            raise InputError(f"{option}: expected KEY=VALUE, got {value!r}")
        pairs[key] = rest
    return pairs


@app.command("score")
@_one_line_errors
def score_command(
    samples: Annotated[
        list[str], typer.Option(help="LABEL=DIR: a gathered `srpo sample` folder, repeatable.")
    ],
    metric: Annotated[
        str, typer.Option(help=f"{', '.join(TABLE_ORDER[:-1])} or {TABLE_ORDER[-1]}.")
    ],
    out: Annotated[Path, typer.Option(help="Parquet file to write (a CSV is written beside).")],
    weight: Annotated[
        list[str] | None,
        typer.Option(help="Metric weights as KEY=PATH, repeatable (e.g. checkpoint=HPS.pt)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per metric call.")] = 8,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu (default: auto).")] = None,
    dtype: Annotated[DType, typer.Option(help="Dtype of the metric model.")] = DType.float32,
    verify: VerifyOption = None,
) -> None:
    """Score the sampled images of one or more models with one metric: a row per image."""
    folders = {label: Path(folder) for label, folder in _pairs(samples, "--samples").items()}
    weights = _pairs(weight, "--weight")
    from srpo.scorers import HUB_KEYS

    _check_inputs(verify, {f"--weight {key}": weights.get(key) for key in HUB_KEYS})
    from srpo.score import score_folders

    score_folders(folders, metric, out, weights, batch_size, device, dtype.torch)


@app.command("report")
@_one_line_errors
def report_command(
    scores: Annotated[list[Path], typer.Option(help="`srpo score` parquet files, repeatable.")],
    baseline: Annotated[str, typer.Option(help="Model label the others are compared with.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for report.md, tables/, figures/.")],
    samples: Annotated[
        list[str] | None, typer.Option(help="LABEL=DIR sample folders for the image grid.")
    ] = None,
    training_run: Annotated[
        list[str] | None, typer.Option(help="LABEL=DIR TensorBoard folders for curves.")
    ] = None,
    config: Annotated[
        list[Path] | None,
        typer.Option(
            help="Workflow config file(s) that produced the scores, repeatable: named at the "
            "report's top (with a warning when `tiny_models` is true) and kept in provenance."
        ),
    ] = None,
    config_override: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE given to snakemake --config, repeatable: named with --config."
        ),
    ] = None,
    precision: Annotated[int, typer.Option(help="Decimals in the tables.")] = 4,
) -> None:
    """Paper-style tables (Markdown, LaTeX, CSV), figures and provenance from score files."""
    from srpo.report import write_report

    sample_dirs = {k: Path(v) for k, v in _pairs(samples, "--samples").items()}
    runs = {k: Path(v) for k, v in _pairs(training_run, "--training-run").items()}
    report = write_report(
        scores, baseline, out_dir, sample_dirs, runs, config or (), precision, config_override or ()
    )
    typer.echo(f"wrote {report}")


@app.command("sample")
@_one_line_errors
def sample_command(
    base_model: Annotated[str, typer.Option(help="diffusers FLUX folder or hub id.")],
    prompts: Annotated[
        Path, typer.Option(help="Evaluation prompts: CSV prompt_id,style,prompt or .txt.")
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            help="Folder for images/, manifests/, shared by the shards; this shard's images "
            "made with other settings or another model are replaced."
        ),
    ],
    transformer: Annotated[
        Path | None,
        typer.Option(
            help="Trained transformer: an exported diffusion_pytorch_model.safetensors or a "
            "diffusers transformer folder; default: the base model's."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Global seed; each prompt's seed is derived from it.")
    ] = 42,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="FLUX guidance scale.")] = 3.5,
    height: Annotated[int, typer.Option(help="Image height in pixels (multiple of 16).")] = 1024,
    width: Annotated[int, typer.Option(help="Image width in pixels (multiple of 16).")] = 1024,
    max_sequence_length: Annotated[int, typer.Option(help="T5 tokens per prompt.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Prompts per pipeline call.")] = 1,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32 or bfloat16; default bfloat16 on a GPU, float32 on the CPU."),
    ] = None,
    shard: Annotated[
        str, typer.Option(help="i/n: sample batches i, i+n, … of the prompt list.")
    ] = "0/1",
    verify: VerifyOption = None,
) -> None:
    """Sample evaluation images with fixed per-prompt seeds; rerun to finish a stopped shard
    or to replace its images after the settings or the model changed."""
    _check_inputs(verify, {"--base-model": base_model})
    from srpo.sample import SampleSettings, SettingError, parse_shard, sample_images

    settings = SampleSettings(
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
    )
    index_count = parse_shard(shard)
    try:
        settings.validate()
    except SettingError as error:  # named by the option that set it
        raise InputError(f"--{error.setting.replace('_', '-')}: {error.problem}") from None
    result = sample_images(base_model, prompts, out_dir, settings, transformer, index_count)
    typer.echo(result.summary())


@app.command("gather-samples")
@_one_line_errors
def gather_samples_command(
    out_dir: Annotated[Path, typer.Argument(help="The --out-dir every shard sampled into.")],
    shards: Annotated[
        int,
        typer.Option(
            help="n of the shards' --shard i/n: manifests shard-000-of-n … are merged, "
            "any others ignored."
        ),
    ] = 1,
) -> None:
    """Check that shards 0..n−1 share one spec and every prompt has its recorded image, then
    merge their manifests into manifest.json."""
    from srpo.sample_manifest import gather_manifests

    typer.echo(f"wrote {gather_manifests(out_dir, shards)}")


@app.command("prepare-prompts")
@_one_line_errors
def prepare_prompts_command(
    out_dir: Annotated[Path, typer.Option(help="Folder for train.txt, eval.csv, manifest.json.")],
    source: Annotated[
        str, typer.Option(help="bundled (offline set), local (HPDv2 folder) or hub (ymhao/HPDv2).")
    ] = "bundled",
    path: Annotated[str | None, typer.Option(help="HPDv2 folder when --source local.")] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Keep at most this many training prompts.")
    ] = None,
    eval_per_style: Annotated[
        int | None, typer.Option(help="Keep at most this many benchmark prompts per style.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsampling.")] = 42,
    train_file: Annotated[
        Path | None,
        typer.Option(help="Training prompts, one per line, instead of the source's train.json."),
    ] = None,
    cjk: Annotated[
        str, typer.Option(help="keep or drop prompts with Han, Hiragana, Katakana or Hangul.")
    ] = "keep",
    base_model: Annotated[
        str | None,
        typer.Option(
            help="FLUX folder or hub id whose T5 tokenizer (tokenizer_2/) counts the prompts "
            "over --max-sequence-length; without it they are not counted."
        ),
    ] = None,
    max_sequence_length: Annotated[
        int, typer.Option(help="T5 tokens the encoder keeps (longer prompts are truncated).")
    ] = 512,
) -> None:
    """HPD prompts: cleaned, deduplicated training prompts and the HPDv2 benchmark prompts by
    style; what cleaning did is counted in manifest.json and summarised here."""
    _check_inputs(None, {"--base-model": base_model})
    from srpo.hpd import prepare_prompts, summary

    manifest = prepare_prompts(
        out_dir,
        source,
        path,
        train_limit,
        eval_per_style,
        seed,
        train_file=train_file,
        cjk=cjk,
        base_model=base_model,
        max_sequence_length=max_sequence_length,
    )
    for split, report in manifest["cleaning"].items():
        typer.echo(summary(split, report, max_sequence_length))
    counts = manifest["counts"]
    typer.echo(
        f"wrote {counts['train']} training and {counts['eval']} evaluation prompts to {out_dir}"
    )


@app.command("doctor")
@_one_line_errors
def doctor_command(
    config: Annotated[
        list[Path] | None,
        typer.Option(
            help="Workflow config file(s) as given to snakemake --configfile, repeatable "
            "(default: config/config.yaml); read with config/containers.yaml, from the "
            "workflow's folder."
        ),
    ] = None,
) -> None:
    """Check a workflow config before running it: weights present and their sha256 verified,
    prompts readable, environments or images there, GPUs visible, disk enough for the outputs
    (estimated). Prints a table; exit status 2 if any check failed."""
    from rich.console import Console
    from rich.table import Table

    from srpo.doctor import diagnose

    doctor = diagnose(config or [])
    table = Table("area", "subject", "status", "detail", title="srpo doctor")
    colours = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for row in doctor.rows:
        table.add_row(row.area, row.subject, f"[{colours[row.status]}]{row.status}", row.detail)
    Console(width=160).print(table)
    failed = [row for row in doctor.rows if row.status == "fail"]
    for row in failed:
        typer.echo(f"fail: {row.area}: {row.subject}: {row.detail}", err=True)
    typer.echo(f"{len(doctor.rows)} checks, {len(failed)} failed")
    if failed:
        raise typer.Exit(2)
