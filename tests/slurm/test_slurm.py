"""The tiny workflow through real `sbatch` jobs on the local cluster, with the users' profile.

Needs the cluster of tests/slurm/start-cluster.sh and SLURM_CONF pointing at it (CI's slurm
stage does both). Skipped without it unless SRPO_REQUIRE_SLURM=1, where that is a failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import REPO, run_env

pytestmark = pytest.mark.slurm
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
OVERRIDE = ["--profile", "slurm", "--profile", "tests/slurm/profile"]


def slurm_up() -> bool:
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                timeout=15)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = result.stdout.split()
    return result.returncode == 0 and any(s in {"idle", "mixed", "allocated"} for s in states)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not slurm_up():
        message = "no local Slurm cluster (bash tests/slurm/start-cluster.sh; export SLURM_CONF)"
        if os.environ.get("SRPO_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return run_env(PATH=f"{bin_dir}:{run_env()['PATH']}")


def copy_workflow(folder: Path) -> Path:
    for name in ("Snakefile", "workflow", "config", "profiles", "slurm", "tests"):
        source = REPO / name
        if source.is_symlink():
            (folder / name).symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)
    return folder


def snakemake(folder: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, *OVERRIDE, *args], cwd=folder, env=env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


class JobWatcher(threading.Thread):
    """Records `scontrol show job` of every job while it runs: the resources Slurm granted."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            ids = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True,
                                 text=True, timeout=15).stdout.split()  # fmt: skip
            for job in ids:
                shown = subprocess.run(["scontrol", "-o", "show", "job", job],
                                       capture_output=True, text=True, timeout=15)  # fmt: skip
                self.jobs.setdefault(job, shown.stdout)
            time.sleep(0.5)


def field(record: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", record)
    return match[1] if match else ""


def test_tiny_workflow_through_sbatch(tmp_path):
    folder = copy_workflow(tmp_path)
    watcher = JobWatcher()
    watcher.start()
    result = snakemake(folder)
    watcher.stop.set()
    watcher.join()
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert (folder / "results" / "tiny" / "report" / "report.md").is_file()
    submitted = re.findall(r"submitted with SLURM jobid (\d+)|SLURM run ID: (\d+)", log)
    assert len(submitted) >= 12, log[-3000:]
    names = {field(record, "JobName"): record for record in watcher.jobs.values()}
    train = next(r for r in watcher.jobs.values() if "train_srpo" in r)
    assert field(train, "NumCPUs") == "2" and field(train, "TimeLimit") == "01:00:00"
    assert field(train, "MinMemoryNode") in {"8000M", "8G"} or "mem=8000M" in train
    assert names, "no running job was observed"
    state = json.loads(
        next(
            (folder / "results/tiny/train/checkpoints").glob("step-*/train_state.json")
        ).read_text()
    )
    assert state["world_size"] == 2  # two processes inside ONE Slurm job
