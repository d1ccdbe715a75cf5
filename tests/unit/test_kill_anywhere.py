"""Kill-anywhere: `srpo sample`, `srpo score` and `srpo report` killed with SIGKILL at a random
moment while they write, twice, and then run to the end leave the same files, byte for byte, as
one uninterrupted run; a half-written image or score file is refused or made again, never used.

Each run has its own working folder and relative output paths, so A (uninterrupted) and B
(killed, re-run) run the very same command line. The kill delays come from a seeded
random.Random: SRPO_KILL_SEED=<seed> repeats a failing draw (timings still vary a little).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import EVAL_CSV, run_env
from typer.testing import CliRunner

from srpo.cli import app
from srpo.io import InputError, clear_staging, provenance
from srpo.sample_manifest import gather_manifests

SEED = int(os.environ.get("SRPO_KILL_SEED") or random.SystemRandom().randrange(2**32))
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH of every run: provenance's `created` is then fixed
POLL_S = 0.003
Snapshot = dict[str, tuple[int, int]]


def env() -> dict[str, str]:
    return run_env(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", SOURCE_DATE_EPOCH=EPOCH)


def srpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "srpo", *args]


def snapshot(root: Path) -> Snapshot:
    """Relative path → (size, mtime) of everything under root, hidden staging folders included."""
    found: Snapshot = {}
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except FileNotFoundError:
            continue  # a staging folder renamed or removed while it was listed
        for entry in entries:
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found[os.path.relpath(entry.path, root)] = (status.st_size, status.st_mtime_ns)
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return found


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "log.txt", "ab") as log:  # a file, not a pipe that could fill and block
        return subprocess.Popen(
            command, cwd=cwd, env=env(), stdout=log, stderr=log, start_new_session=True
        )


def finish(process: subprocess.Popen, cwd: Path) -> None:
    assert process.wait(timeout=300) == 0, (cwd / "log.txt").read_text()[-3000:]


def wait_for_change(process: subprocess.Popen, output: Path, before: Snapshot) -> float:
    """Poll until the output tree differs from `before` (the run started writing) or the run
    ends; the monotonic time of that moment."""
    while process.poll() is None and snapshot(output) == before:
        time.sleep(POLL_S)
    return time.monotonic()


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its command, where it ran, its output and how long it wrote."""

    command: list[str]
    cwd: Path
    output: str  # relative to cwd
    window_s: float  # from its first write to its last


def run_reference(command: list[str], cwd: Path, output: str) -> Reference:
    """Run to the end, timing the stretch in which the output tree changes."""
    before = snapshot(cwd / output)
    process = start(command, cwd)
    first = last = wait_for_change(process, cwd / output, before)
    current = snapshot(cwd / output)
    while process.poll() is None:
        time.sleep(POLL_S)
        now = snapshot(cwd / output)
        if now != current:
            current, last = now, time.monotonic()
    finish(process, cwd)
    return Reference(command, cwd, output, last - first)


def run_killed(reference: Reference, cwd: Path, rng: random.Random, log: list[str]) -> bool:
    """Start the reference's command in `cwd`, SIGKILL its process group at a random moment of
    its writing (scaled by the share of the reference's files not yet in place) and say whether
    the kill landed before the run ended by itself."""
    output = cwd / reference.output
    left = 1 - len(same_files(reference, cwd)) / len(files(reference.cwd / reference.output))
    delay = rng.uniform(0.05, 0.75) * reference.window_s * max(left, 0.1)
    before = snapshot(output)
    process = start(reference.command, cwd)
    time.sleep(max(0.0, wait_for_change(process, output, before) + delay - time.monotonic()))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    landed = process.wait(timeout=60) == -signal.SIGKILL
    left_behind = sorted(snapshot(output))
    log.append(f"kill {delay:.3f} s after the first write, landed={landed}: {left_behind}")
    return landed


def files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def same_files(reference: Reference, cwd: Path) -> set[str]:
    want, have = files(reference.cwd / reference.output), files(cwd / reference.output)
    return {name for name, data in have.items() if want.get(name) == data}


def assert_killed_twice_then_identical(
    reference: Reference, cwd: Path, name: str, then: Callable[[Path], object] | None = None
) -> None:
    """Kill twice at random moments, run to the end, call `then` on the output, compare."""
    rng = random.Random(f"{SEED}-{name}")
    log = [f"SRPO_KILL_SEED={SEED} {name}: reference wrote for {reference.window_s:.3f} s"]
    landed = [run_killed(reference, cwd, rng, log) for _ in range(2)]
    print("\n".join(log))
    assert landed[0], "\n".join(log)  # the first kill must come before the run ends by itself
    finish(start(reference.command, cwd), cwd)
    if then is not None:
        then(cwd / reference.output)
    want, have = files(reference.cwd / reference.output), files(cwd / reference.output)
    assert sorted(have) == sorted(want), "\n".join(log)
    assert [path for path in want if have[path] != want[path]] == [], "\n".join(log)
    hidden = [path for path in snapshot(cwd / reference.output) if "/." in f"/{path}"]
    assert hidden == [], "\n".join(log)


@pytest.fixture(scope="module")
def inputs(tiny_models: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kill-inputs")
    (folder / "eval.csv").write_text(EVAL_CSV)
    return {"models": tiny_models, "prompts": folder / "eval.csv", "root": folder}


def sample_command(inputs: dict[str, Path]) -> list[str]:
    return srpo(
        "sample", "--base-model", str(inputs["models"] / "flux"), "--prompts",
        str(inputs["prompts"]), "--out-dir", "samples", "--steps", "8", "--height", "64",
        "--width", "64", "--max-sequence-length", "32", "--batch-size", "1", "--dtype", "float32",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sampled(inputs: dict[str, Path]) -> Reference:
    """The uninterrupted sample run, gathered."""
    reference = run_reference(sample_command(inputs), inputs["root"] / "A", "samples")
    gather_manifests(reference.cwd / "samples")
    return reference


@pytest.fixture(scope="module")
def scored(inputs: dict[str, Path], sampled: Reference) -> Reference:
    hpsv2 = inputs["models"] / "hpsv2"
    command = srpo(
        "score", f"--samples=base={sampled.cwd / 'samples'}", "--metric", "hpsv2",
        "--out", "scores/hpsv2.parquet", "--batch-size", "1", "--device", "cpu",
        f"--weight=checkpoint={hpsv2 / 'HPS_v2.1_compressed.pt'}",
        f"--weight=model_config={hpsv2 / 'open_clip_config.json'}",
    )  # fmt: skip
    return run_reference(command, sampled.cwd, "scores")


@pytest.fixture(scope="module")
def reported(scored: Reference, sampled: Reference) -> Reference:
    command = srpo(
        "report", "--scores", str(scored.cwd / "scores" / "hpsv2.parquet"), "--baseline", "base",
        "--out-dir", "report", f"--samples=base={sampled.cwd / 'samples'}",
    )  # fmt: skip
    return run_reference(command, scored.cwd, "report")


def test_sample_killed_anywhere_resumes_to_the_same_bytes(sampled: Reference, tmp_path: Path):
    assert_killed_twice_then_identical(sampled, tmp_path, "sample", then=gather_manifests)


def test_score_killed_anywhere_reruns_to_the_same_bytes(scored: Reference, tmp_path: Path):
    assert_killed_twice_then_identical(scored, tmp_path, "score")


def test_report_killed_anywhere_reruns_to_the_same_bytes(reported: Reference, tmp_path: Path):
    assert_killed_twice_then_identical(reported, tmp_path, "report")


def one_line_cli_error(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    return line


def test_half_written_score_file_is_a_one_line_error(scored: Reference, tmp_path: Path):
    whole = (scored.cwd / "scores" / "hpsv2.parquet").read_bytes()
    half = tmp_path / "half.parquet"
    half.write_bytes(whole[: len(whole) // 2])
    line = one_line_cli_error(
        "report", "--scores", str(half), "--baseline", "base", "--out-dir", str(tmp_path / "r")
    )
    assert line.startswith(f"error: {half}: unreadable score file, expected `srpo score` parquet")
    assert not (tmp_path / "r").exists()


def test_score_refuses_an_image_that_is_not_the_recorded_one(sampled: Reference, tmp_path):
    folder = tmp_path / "samples"
    shutil.copytree(sampled.cwd / "samples", folder)
    manifest = folder / "manifest.json"
    image = folder / json.loads(manifest.read_text())["images"][2]["file"]
    image.write_bytes(image.read_bytes()[:-1])  # PIL still decodes it: only the sha256 tells
    line = one_line_cli_error(
        "score", f"--samples=base={folder}", "--metric", "hpsv2", "--out", str(tmp_path / "s.pq")
    )
    assert line.startswith(f"error: {image}: expected the image with the sha256 recorded in ")
    assert str(manifest) in line
    assert not (tmp_path / "s.pq").exists()


def test_clear_staging_removes_only_the_named_targets(tmp_path: Path):
    mine, other = tmp_path / "00003.png", tmp_path / "00004.png"
    for target in (mine, other):
        (tmp_path / f".{target.name}.k3j_x9a0.tmp").mkdir()
        (tmp_path / f".{target.name}.k3j_x9a0.tmp" / target.name).write_bytes(b"\x89PNG half")
    clear_staging([mine, tmp_path / "absent" / "x.json"])
    assert sorted(path.name for path in tmp_path.iterdir()) == [".00004.png.k3j_x9a0.tmp"]


def test_provenance_honours_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    assert provenance({})["created"] == "2023-11-14T22:13:20+00:00"  # date -u -d @1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InputError, match=r"^SOURCE_DATE_EPOCH: expected whole seconds"):
        provenance({})
