"""Check a CUDA machine end to end: `python -m benchmarks.gpu_check OUT_DIR` (benchmarks/gpu.sh
runs it after installing the carried wheels).

Four parts, each writing into OUT_DIR and a line per check into OUT_DIR/summary.json:
- `kernels`: each fused attention kernel's bf16 backward against the unfused one on a FLUX
  block and the FLUX VAE's middle block (benchmarks/attention_probe.py);
- `cli`: the tiny default's command-line path as users run it, on the GPU, in every precision
  policy and with LoRA (side by side, one process each): `torchrun … -m srpo train` stopped by
  SIGTERM after its first steps, resumed to the end (with its export), `srpo export`,
  `srpo sample` + `gather-samples` with the trained transformer, `srpo score` with three
  metrics; once more in fsdp-bf16 with every fused attention kernel off (srpo.runtime.attention),
  which tells a kernel's fault from the rest's;
- `bench`: `python -m benchmarks --suite gpu --size full`;
- `precision`: the precision policies side by side (`python -m benchmarks.precision`).
A part that fails is reported and the next one still runs; the exit status is 1 if any failed.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TextIO

import typer
import yaml

from benchmarks.run import checkout_pythonpath
from srpo.runtime.attention import DISABLE_ENV, FUSED

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = "results/tiny/"
PARTS = ("kernels", "cli", "bench", "precision")
VARIANTS = {
    "fp32": {"precision": "fp32"},
    "fsdp-bf16": {"precision": "fsdp-bf16"},
    "autocast-bf16": {"precision": "autocast-bf16"},
    "lora": {"precision": "fsdp-bf16", "lora": {}},
    "fsdp-bf16-unfused-attention": {"precision": "fsdp-bf16"},
}
VARIANT_ENV = {"fsdp-bf16-unfused-attention": {DISABLE_ENV: ",".join(FUSED)}}
"""A variant with every fused attention kernel off: tells a kernel's fault from the rest's."""
SCORED = ("hpsv2", "aesthetic", "pickscore")
MAX_STEPS = 20
STOP_AFTER_STEP = 2
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class CheckFailed(RuntimeError):
    """One command of a check ended otherwise than expected; its log says why."""


def _srpo(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "srpo", *arguments]


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The checkout first on the path, then whatever the caller had (the carried wheels)."""
    fixed = {"PYTHONPATH": checkout_pythonpath(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {**os.environ, **fixed, **(extra or {})}


@contextmanager
def _logged(command: list[str], log: Path, note: str = "") -> Iterator[TextIO]:
    """`log` opened for appending, the command line written first."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}{note}\n")
        handle.flush()
        yield handle


def _run(
    command: list[str], log: Path, expect: int = 0, extra: dict[str, str] | None = None
) -> None:
    with _logged(command, log) as handle:
        code = subprocess.call(
            command, stdout=handle, stderr=subprocess.STDOUT, env=_environment(extra), cwd=REPO
        )
    if code != expect:
        raise CheckFailed(f"{' '.join(command[2:5])}: exit {code}, expected {expect} (see {log})")


def _stopped_run(
    command: list[str], log: Path, after: str, extra: dict[str, str] | None = None
) -> int:
    """Run `command`, send SIGTERM once its output shows `after`; returns the exit status."""
    with _logged(command, log, f"  (SIGTERM after {after!r})") as handle:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_environment(extra),
            cwd=REPO,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            if after in line and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return process.wait()


def _tiny_settings(models: Path) -> tuple[dict, dict]:
    """The tiny default's training config and metric weights, pointed at `models`."""
    prefix = f"{TINY_RUN}models/"

    def moved(value):
        if isinstance(value, str) and value.startswith(prefix):
            return str(models / value.removeprefix(prefix))
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        return value

    train = moved(yaml.safe_load((REPO / "config/train-tiny.yaml").read_text()))
    workflow = yaml.safe_load((REPO / "config/config.yaml").read_text())
    weights = {name: moved(workflow["metrics"][name]["weights"]) for name in SCORED}
    return train, weights


def _prepare(out: Path) -> None:
    """Tiny models, prompts and both embedding caches, as the workflow makes them."""
    log = out / "logs" / "prepare.log"
    models = out / "models"
    _run(_srpo("make-tiny", str(models)), log)
    prompts = out / "prompts"
    _run(
        _srpo(
            "prepare-prompts", "--out-dir", str(prompts), "--source", "bundled",
            "--eval-per-style", "2", "--base-model", str(models / "flux"),
            "--max-sequence-length", "32",
        ),
        log,
    )  # fmt: skip
    for source, folder in (("train.txt", "embeddings"), ("eval.csv", "embeddings-held-out")):
        _run(
            _srpo(
                "encode", "--base-model", str(models / "flux"), "--prompts",
                str(prompts / source), "--out-dir", str(out / folder),
                "--max-sequence-length", "32",
            ),
            log,
        )  # fmt: skip


def _variant(out: Path, name: str) -> dict:
    """Train (stopped, resumed), export, sample, score one policy; returns its figures."""
    folder = out / "cli" / name
    log = out / "logs" / f"cli-{name}.log"
    train, weights = _tiny_settings(out / "models")
    train.update(VARIANTS[name])
    train.update(
        embeddings=str(out / "embeddings" / "index.json"),
        output_dir=str(folder / "train"),
        max_steps=MAX_STEPS,
    )
    train["evaluation"]["embeddings"] = str(out / "embeddings-held-out" / "index.json")
    config = folder / "train.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(train))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    launch += ["-m", "srpo", "train", "--config", str(config)]
    started = time.perf_counter()
    extra = VARIANT_ENV.get(name)
    code = _stopped_run(launch, log, f"step {STOP_AFTER_STEP}/{MAX_STEPS}", extra)
    checkpoints = sorted((folder / "train" / "checkpoints").glob("step-*"))
    if code == 0 or not checkpoints:
        raise CheckFailed(f"{name}: SIGTERM did not stop training with a checkpoint (see {log})")
    stopped_at = checkpoints[-1].name
    _run(launch, log, extra=extra)
    if "resumed from" not in log.read_text():
        raise CheckFailed(f"{name}: the second run did not resume (see {log})")
    latest = sorted((folder / "train" / "checkpoints").glob("step-*"))[-1]
    export = folder / "export"
    base = str(out / "models" / "flux")
    _run(
        _srpo("export", str(latest), "--base-model", base, "--out-dir", str(export)), log, 0, extra
    )
    samples = folder / "samples"
    transformer = folder / "train" / "model" / "diffusion_pytorch_model.safetensors"
    _run(
        _srpo(
            "sample", "--base-model", base, "--transformer", str(transformer), "--prompts",
            str(out / "prompts" / "eval.csv"), "--out-dir", str(samples), "--steps", "4",
            "--height", "64", "--width", "64", "--max-sequence-length", "32",
        ),
        log, 0, extra,
    )  # fmt: skip
    _run(_srpo("gather-samples", str(samples)), log)
    scores = {}
    for metric in SCORED:
        target = folder / "scores" / f"{metric}.parquet"
        options = [f"--weight={key}={value}" for key, value in sorted(weights[metric].items())]
        _run(
            _srpo(
                "score", "--metric", metric, "--samples", f"srpo={samples}", *options,
                "--out", str(target),
            ),
            log, 0, extra,
        )  # fmt: skip
        scores[metric] = _mean_score(target.with_suffix(".csv"))
    eval_csv = (folder / "train" / "eval.csv").read_text().splitlines()
    return {
        "stopped_at": stopped_at,
        "final_checkpoint": latest.name,
        "eval_csv": eval_csv,
        "scores": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mean_score(table: Path) -> float:
    import pandas

    return float(pandas.read_csv(table)["score"].mean())


def _cli(out: Path, variants: list[str]) -> dict:
    _prepare(out)
    results: dict = {}
    with ThreadPoolExecutor(len(variants)) as pool:
        futures = {name: pool.submit(_variant, out, name) for name in variants}
        for name, future in futures.items():
            try:
                results[name] = {"ok": True, **future.result()}
            except CheckFailed as error:
                results[name] = {"ok": False, "error": str(error)}
            # each variant's verdict as soon as it is known, should a later one hang
            (out / "cli" / name / "result.json").write_text(json.dumps(results[name], indent=2))
    return {"ok": all(result["ok"] for result in results.values()), **results}


def _kernels(out: Path) -> dict:
    """Each fused attention kernel against the unfused one (benchmarks/attention_probe.py)."""
    import torch

    from benchmarks.attention_probe import probe

    device, size = ("cuda", "real") if torch.cuda.is_available() else ("cpu", "tiny")
    rows = probe(size, device)
    (out / "attention-kernels.json").write_text(json.dumps(rows, indent=2))
    broken = sorted({row["kernel"] for row in rows if row["broken"]})
    return {"ok": not broken, "broken": broken, "size": size}


def _written(command: list[str], out: Path, name: str) -> dict:
    """`command --out-dir OUT/name`, logged to OUT/logs/name.log; the files it wrote."""
    _run([*command, "--out-dir", str(out / name)], out / "logs" / f"{name}.log")
    return {"ok": True, "files": sorted(p.name for p in (out / name).iterdir())}


def _bench(out: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks", "--suite", "gpu", "--size", "full"]
    return _written(command, out, "bench")


def _precision(out: Path) -> dict:
    return _written(
        [sys.executable, "-m", "benchmarks.precision", "--size", "full"], out, "precision"
    )


CHECKS: dict[str, Callable[[Path], dict]] = {
    "kernels": _kernels,
    "cli": _cli,
    "bench": _bench,
    "precision": _precision,
}
"""Each part, given the output folder (the cli part also its variants, bound in `main`)."""


def _machine() -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    return facts


def _passed(result: dict) -> bool:
    """A part passed if it and each of its variants (the cli part's) did."""
    inner = [value for value in result.values() if isinstance(value, dict) and "ok" in value]
    return result.get("ok", True) and all(value["ok"] for value in inner)


@app.command()
def main(
    out_dir: Annotated[Path, typer.Argument(help="Folder for every output, log and summary.")],
    part: Annotated[
        list[str] | None,
        typer.Option(help=f"Part to run, repeatable: {', '.join(PARTS)} (default: all, in order)."),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help=f"The cli part's variants, repeatable: {', '.join(VARIANTS)} (default: all)."
        ),
    ] = None,
) -> None:
    """Run the checks on this machine's GPU and write OUT_DIR/summary.json."""
    chosen = part or list(PARTS)
    if unknown := sorted(set(chosen) - set(PARTS)):
        raise typer.BadParameter(f"unknown part(s) {unknown}; expected some of {PARTS}")
    variants = variant or list(VARIANTS)
    if unknown := sorted(set(variants) - set(VARIANTS)):
        raise typer.BadParameter(f"unknown variant(s) {unknown}; expected some of {[*VARIANTS]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = {**CHECKS, "cli": functools.partial(_cli, variants=variants)}
    summary: dict = {"machine": _machine(), "parts": {}}
    started = time.perf_counter()
    for name in chosen:
        begun = time.perf_counter()
        try:
            result = checks[name](out_dir)
        except CheckFailed as error:
            result = {"ok": False, "error": str(error)}
        result["part_seconds"] = round(time.perf_counter() - begun, 1)
        summary["parts"][name] = result
        typer.echo(f"{name}: {json.dumps(result)[:2000]}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [name for name, result in summary["parts"].items() if not _passed(result)]
    passed = len(chosen) - len(failed)
    typer.echo(f"gpu check: {passed} of {len(chosen)} parts passed in {summary['seconds']} s")
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
