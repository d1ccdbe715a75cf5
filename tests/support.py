"""Helpers shared by tests: tiny training configs and `torchrun -m srpo train` launches."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from srpo.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
EVAL_CSV = """prompt_id,style,prompt
7,anime,a red fox sitting in the snow
3,photo,"a lighthouse on a cliff, at sunset"
12,paintings,portrait of an old fisherman
0,concept-art,a futuristic city skyline at night
5,photo,a small wooden boat on a calm lake
1,anime,a girl reading a book under a tree
9,paintings,mountains covered in fog at dawn
"""
"""Evaluation prompts as `srpo sample` reads them: ids out of order, a quoted comma."""
TRAIN_PROMPTS = [
    "a red fox sitting in the snow",
    "a lighthouse on a cliff at sunset",
    "portrait of an old fisherman",
    "a bowl of ripe oranges on a table",
    "a futuristic city skyline at night",
    "a small wooden boat on a calm lake",
    "a girl reading a book under a tree",
    "mountains covered in fog at dawn",
]


def tiny_config(models: Path, cache: Path, output_dir: Path, **overrides) -> dict:
    """The tiny training config: 64×64 px, fp32, HPSv2-layout reward."""
    config = {
        "base_model": str(models / "flux"),
        "embeddings": str(cache),
        "output_dir": str(output_dir),
        "reward": {
            "kind": "hpsv2",
            "checkpoint": str(models / "hpsv2" / "HPS_v2.1_compressed.pt"),
            "model_config_path": str(models / "hpsv2" / "open_clip_config.json"),
        },
        "srpo": {},
        "optim": {"learning_rate": 1e-3},
        "batch_size": 2,
        "max_steps": 3,
        "height": 64,
        "width": 64,
        "rollout_steps": 4,
        "seed": 7,
        "precision": "fp32",
        "export_dtype": "float32",
        "checkpoint_every": 100,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    return config


def srpo_command(
    config: Path, nproc: int | None, *extra: str, torchrun_options: tuple[str, ...] = ()
) -> list[str]:
    """`torchrun [OPTIONS] --nproc-per-node N -m srpo train …` as users launch it; nproc None:
    no torchrun."""
    train = ["-m", "srpo", "train", "--config", str(config), *extra]
    if nproc is None:
        return [sys.executable, *train]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, *torchrun_options, "--nproc-per-node", str(nproc), "--standalone", *train]


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}


WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles")


def copy_workflow(folder: Path, *extra: str) -> Path:
    """The workflow files (and `extra` ones) copied into `folder`, so a run writes its results/
    there as `snakemake` does at the repository root; links stay links."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, *extra):
        source = REPO / name
        if source.is_symlink():
            (folder / name).symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)
    return folder


def venv_env(**extra: str) -> dict[str, str]:
    """`run_env` with this environment's bin/ (snakemake, srpo, srpo-ENV) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return run_env(PATH=f"{bin_dir}:{run_env()['PATH']}", **extra)


def snakemake(folder: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in `folder`, run as the users' shell would find it (venv_env)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), *args],
        cwd=folder,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_srpo(
    config: Path, nproc: int | None, *extra: str, **env: str
) -> subprocess.CompletedProcess:
    """Run a training launch to completion, capturing its output."""
    return subprocess.run(
        srpo_command(config, nproc, *extra),
        cwd=REPO,
        env=run_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def start_srpo(
    config: Path, nproc: int | None, torchrun_options: tuple[str, ...] = (), **env: str
) -> subprocess.Popen:
    """Start a training launch in its own session (so a test can kill the whole group)."""
    return subprocess.Popen(
        srpo_command(config, nproc, torchrun_options=torchrun_options),
        cwd=REPO,
        env=run_env(**env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_same_update(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> None:
    """Two trainings from `base` moved every weight alike: no element differs by more than 1%
    of the largest update, and something moved.

    Not a fixed 1e-6: AdamW turns an element whose gradient is near its eps into an update that
    last-bit rounding (another batch layout or order of the gradient sum) changes; measured
    1.6e-6 out of 2e-3 updates. Another sample assignment moves whole tensors by the update's
    size, a hundred times the bound."""
    assert got.keys() == want.keys() == base.keys()
    largest = max(float((want[key] - base[key]).abs().max()) for key in base)
    assert largest > 0, "training changed nothing"
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=largest / 100, msg=key)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or Slurm would.

    torchrun starts its workers in sessions of their own, so killing its group is not enough.
    """
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue


def checkpoints(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", keep_last=3, rank=0)


def terminate_once_resumed(process: subprocess.Popen) -> str:
    """SIGTERM to torchrun as soon as rank 0 reports its resume; then wait for the end."""
    for line in process.stdout:
        if line.startswith("resumed from"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    return err
