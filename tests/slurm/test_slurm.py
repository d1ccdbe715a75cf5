"""The tiny workflow through real `sbatch` jobs on the local cluster, with the users' profile.

Needs the cluster of tests/slurm/start-cluster.sh and SLURM_CONF pointing at it (CI's slurm
stage does both). Skipped without it unless SRPO_REQUIRE_SLURM=1, where that is a failure.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import support
import yaml
from support import copy_workflow, venv_env

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


def snakemake(folder: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """`snakemake` with the users' slurm profile and the local cluster's override."""
    return support.snakemake(folder, *OVERRIDE, *args, timeout=timeout)


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


def wait_for_job(comment: str, process: subprocess.Popen, timeout: float = 600) -> str:
    """The id of the running Slurm job whose comment names `comment` (the rule)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"snakemake ended early: {process.communicate()[1][-3000:]}")
        listing = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True,
                                 text=True, timeout=15).stdout  # fmt: skip
        for line in listing.splitlines():
            job, _, note = line.partition(" ")
            if comment in note:
                return job
        time.sleep(0.5)
    raise AssertionError(f"no running {comment} job within {timeout} s")


def test_tiny_workflow_through_sbatch_after_a_cancelled_training(tmp_path):
    """The tiny workflow in real sbatch jobs. `scancel` on the training job fails it within
    seconds, with no partial export; the re-run submits only what is missing, each job with the
    resources the profile gives its rule, and completes the report. One run for both, since a
    second whole run through sbatch would repeat every job before training."""
    folder = copy_workflow(tmp_path, "slurm", "tests")
    process = subprocess.Popen([SNAKEMAKE, *OVERRIDE], cwd=folder, env=venv_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    job = wait_for_job("rule_train_srpo", process)
    time.sleep(3)
    subprocess.run(["scancel", job], check=True, timeout=30)
    started = time.monotonic()
    first_out, first_err = process.communicate(timeout=600)
    assert process.returncode != 0
    assert time.monotonic() - started < 300, "snakemake took too long to notice the cancel"
    assert "train_srpo" in first_err and "Error" in first_err, first_err[-3000:]
    model = folder / "results" / "tiny" / "train" / "model"
    assert not model.exists(), "a cancelled training left a (partial) export"

    plan = snakemake(folder, "-n")
    planned = set(re.findall(r"^(\w+)\s+\d+\s*$", plan.stdout.split("Job stats:")[1], re.M))
    assert "train_srpo" in planned and not planned & {"prepare_prompts", "encode_prompts"}
    watcher = JobWatcher()
    watcher.start()
    result = snakemake(folder)
    watcher.stop.set()
    watcher.join()
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert (folder / "results" / "tiny" / "report" / "report.md").is_file()
    pattern = r"submitted with SLURM jobid (\d+)|SLURM run ID: (\d+)"
    submitted = re.findall(pattern, first_out + first_err + log)
    assert len(submitted) >= 12, log[-3000:]
    assert watcher.jobs, "no running job was observed"
    train = next(r for r in watcher.jobs.values() if "train_srpo" in r)
    assert field(train, "NumCPUs") == "2" and field(train, "TimeLimit") == "01:00:00"
    assert field(train, "MinMemoryNode") in {"8000M", "8G"} or "mem=8000M" in train
    state = json.loads(
        next(
            (folder / "results/tiny/train/checkpoints").glob("step-*/train_state.json")
        ).read_text()
    )
    assert state["world_size"] == 2  # two processes inside ONE Slurm job
    shards = list((folder / "results/tiny/samples").glob("*/manifests/shard-???-of-???.json"))
    granted = {json.loads(m.read_text())["provenance"]["environment"]["CUDA_VISIBLE_DEVICES"]
               for m in shards}  # fmt: skip
    assert shards and granted <= {"0", "1"}, granted  # one fake GPU each, from Slurm


def test_paper_sbatch_arguments(tmp_path):
    """The plugin's own sbatch calls for the paper config: GPUs, nodes, memory, time, cpus.

    The jobs ask for more than this one-node cluster has, so nothing runs and no weights are
    needed: Slurm refuses them, or on some machines queues them as pending for ever, and then
    Snakemake, interrupted, waits on them; the test cancels those and stops it.
    """
    folder = copy_workflow(tmp_path, "slurm", "tests")
    paper = folder / "results" / "paper"
    for name in ("prompts/train.txt", "prompts/eval.csv", "prompts/manifest.json",
                 "embeddings/index.json", "embeddings-held-out/index.json"):  # fmt: skip
        (paper / name).parent.mkdir(parents=True, exist_ok=True)
        (paper / name).write_text("placeholder\n")
        time.sleep(0.05)
    log_file = tmp_path / "snakemake.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [SNAKEMAKE, *OVERRIDE, "--configfile", "config/paper.yaml", "--verbose",
             "results/paper/train/model/diffusion_pytorch_model.safetensors",
             "results/paper/samples/base/manifests/shard-000-of-016.json"],
            cwd=folder, env=venv_env(), text=True, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        calls: list[str] = []
        while len(calls) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            calls = re.findall(r"sbatch call: (.*)", log_file.read_text())
        process.send_signal(signal.SIGINT)  # Snakemake exits once none of its jobs runs
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            support.kill_tree(process.pid)
            process.wait(timeout=60)
    run_id = re.search(r"SLURM run ID: (\S+)", log_file.read_text())
    if run_id:  # the jobs Slurm queued instead of refusing (their name is the run's ID)
        subprocess.run(["scancel", "--name", run_id.group(1)], env=venv_env(), check=True)
    assert len(calls) == 2, log_file.read_text()[-4000:]
    train = next(c for c in calls if "rule_train_srpo" in c)
    sample = next(c for c in calls if "rule_sample_eval" in c)
    assert "--nodes=4" in train and "--gres=gpu:8" in train and "--gpus" not in train
    assert re.search(r"--mem[= ]400000", train) and re.search(r"(-t|--time)[= ]120\b", train)
    assert "--cpus-per-task=64" in train
    assert "--gpus=1" in sample and re.search(r"--mem[= ]64000", sample)
    assert re.search(r"(-t|--time)[= ]240\b", sample)


def test_time_limit_signal_checkpoints_and_rerun_resumes(tmp_path):
    """`--signal=TERM@60` on a 3-minute training job: Slurm stops it before the limit (its
    signal may come up to 60 s early), the trainer checkpoints, the job fails; the re-run,
    without the limit, resumes from that checkpoint."""
    folder = copy_workflow(tmp_path, "slurm", "tests")
    training = yaml.safe_load((folder / "config" / "train-tiny.yaml").read_text())
    training.update(max_steps=5000, checkpoint_every=5000)
    (folder / "config" / "train-long.yaml").write_text(yaml.safe_dump(training))
    config = yaml.safe_load((folder / "config" / "config.yaml").read_text())
    config["train"]["config"] = "config/train-long.yaml"
    (folder / "config" / "resume.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    config["resources"]["train_srpo"].update(runtime=3, slurm_extra="--signal=TERM@60")
    (folder / "config" / "long.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/tiny/train/model/diffusion_pytorch_model.safetensors"

    first = snakemake(folder, target, "--configfile", "config/long.yaml", timeout=600)
    assert first.returncode != 0
    train_log = (folder / "results" / "tiny" / "logs" / "train_srpo.log").read_text()
    assert "stopped by signal 15" in train_log, train_log[-3000:]
    checkpoints = sorted((folder / "results/tiny/train/checkpoints").glob("step-*"))
    assert checkpoints, "no checkpoint written before the time limit"
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 0 < stopped_at < 5000

    training.update(max_steps=stopped_at + 2)
    (folder / "config" / "train-long.yaml").write_text(yaml.safe_dump(training))
    second = snakemake(folder, target, "--configfile", "config/resume.yaml", timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    train_log = (folder / "results" / "tiny" / "logs" / "train_srpo.log").read_text()
    assert f"resumed from results/tiny/train/checkpoints/step-{stopped_at:08d}" in train_log
    assert (folder / target).is_file()
