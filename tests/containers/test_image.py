"""The built CPU images (bash containers/build.sh --variant cpu --push REGISTRY): they hold the
locks CI tested, the tiny workflow run with every rule in the image of its environment writes the
same bytes as outside, and the paper dry run lists every job with its image by digest.

Skipped when the images are not built, unless SRPO_REQUIRE_CONTAINERS=1 (CI, stage containers).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO, copy_workflow, mix_training, run_env

BIN = Path(sys.executable).parent
STAND_IN = Path(__file__).parent / "apptainer-stand-in"
ON_DOCKER = Path(__file__).parent / "apptainer-on-docker"
ENVS = ("main", "hpsv3", "imagereward")
ENGINE = os.environ.get("SRPO_CONTAINER_ENGINE", "docker")
# Files of the tiny workflow that must be byte-identical inside and outside the images: every
# model, embedding, checkpoint shard, export, image, score and figure. Logs, benchmarks,
# manifests, provenance and TensorBoard events hold times, hosts and the Python patch version;
# `rng-rank*.pt` and DCP's `.metadata` hold pickled process state.
DETERMINISTIC = re.compile(
    r"\.(safetensors|pt|pth|distcp|png|csv|parquet|tex|txt)$|index\.json$|train_state\.json$"
    r"|tables/overall\.md$|/config\.json$|tokenizer(_config)?\.json$|source\.json$"
)
NOT_DETERMINISTIC = re.compile(r"/rng-rank\d+\.pt$|/logs/|/benchmarks/")


def image_exists(tag: str) -> bool:
    inspect = [ENGINE, "image", "inspect", tag]
    try:
        return subprocess.run(inspect, capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    missing = [env for env in ENVS if not image_exists(f"srpo-{env}:cpu")]
    if missing:
        message = f"images not built: {missing} (bash containers/build.sh --variant cpu)"
        if os.environ.get("SRPO_REQUIRE_CONTAINERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def check_image(env: str, locks: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, REPO / "containers" / "check.py", "image", f"srpo-{env}:cpu"]
    options = ["--env", env, "--locks", locks, "--engine", ENGINE]
    return subprocess.run(
        [str(part) for part in (*command, *options)], capture_output=True, text=True
    )


@pytest.mark.parametrize("env", ENVS)
def test_image_holds_the_locks_ci_tested(env, tmp_path):
    result = check_image(env, REPO / "envs")
    assert result.returncode == 0, result.stderr
    # Broken example: a lock that moved on after the image was built.
    for lock in (REPO / "envs").glob("*.lock.txt"):
        shutil.copy(lock, tmp_path / lock.name)
    lock = tmp_path / f"{env}.lock.txt"
    lock.write_text(lock.read_text().replace("\nrich==15.0.0 ", "\nrich==14.0.0 "))
    result = check_image(env, tmp_path)
    assert result.returncode == 1
    assert "label io.srpo-workflow.lock-sha256=" in result.stderr
    assert f"has rich 15.0.0, but {lock} pins 14.0.0" in result.stderr


def tiny_workflow(folder: Path, *options: str, **env: str) -> dict[str, str]:
    """The tiny default trained on the reward mix {hpsv2: 1.0, hpsv3: 0.5}, which needs the
    hpsv3 environment, run in a copy of the repository's workflow files; sha256 per output."""
    copy_workflow(folder)
    mix = mix_training(folder, max_steps=4)
    path = ":".join([*env.pop("PATH", "").split(":"), str(BIN), run_env()["PATH"]]).lstrip(":")
    result = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", "--configfile", mix, *options],
        cwd=folder,
        env=run_env(PATH=path, HF_HUB_OFFLINE="1", **env),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((folder / "results").rglob("*"))
        if path.is_file()
    }


def test_tiny_workflow_in_the_images_writes_the_same_bytes(tmp_path):
    """`--sdm apptainer`, each job in the image config/containers.yaml gives its rule (run by
    Docker through tests/containers/apptainer-on-docker): training in the hpsv3 image, as its
    reward needs; every deterministic output equals the run outside containers."""
    outside = tiny_workflow(tmp_path / "outside")
    jobs = tmp_path / "jobs.tsv"
    inside = tiny_workflow(
        tmp_path / "inside",
        "--sdm",
        "apptainer",
        PATH=str(ON_DOCKER),
        APPTAINER_STAND_IN_LOG=str(jobs),
    )
    # The same files, but for TensorBoard's event file (named by time, host and pid).
    events = re.compile(r"/events\.out\.tfevents\.[^/]+$")
    assert {events.sub("/events", name) for name in inside} == {
        events.sub("/events", name) for name in outside
    }
    compared = [
        name
        for name in outside
        if DETERMINISTIC.search(name) and not NOT_DETERMINISTIC.search(name)
    ]
    differ = [name for name in compared if inside[name] != outside[name]]
    assert not differ, f"{len(differ)} of {len(compared)} files differ: {differ}"
    # Every stage of the pipeline is among the files compared.
    for stage in (
        "models/flux/",
        "models/hpsv3/",
        "embeddings/",
        "train/checkpoints/",
        "train/model/",
        "samples/srpo/images/",
        "scores/hpsv3.parquet",
        "report/figures/",
    ):
        assert any(stage in name for name in compared), stage
    # Each job ran in the image of its rule's environment: training in hpsv3's.
    images = yaml.safe_load((REPO / "config" / "containers.yaml").read_text())["containers"]
    pushed = {env: images["images"][env].removeprefix("docker://") for env in ENVS}
    ran = [line.split("\t", 1) for line in jobs.read_text().splitlines()]
    expected = {
        " make-tiny results/tiny/models > ": "main",
        " make-tiny results/tiny/models --part hpsv3 ": "hpsv3",
        "torchrun-hpsv3 --shutdown-timeout": "hpsv3",
        "srpo score --metric hpsv2 ": "main",
        "srpo-hpsv3 score --metric hpsv3 ": "hpsv3",
        "srpo report ": "main",
    }
    for needle, env in expected.items():
        found = [image for image, command in ran if needle in command]
        assert found == [pushed[env]], (needle, found)
    assert len(ran) == len({command for _, command in ran}) >= 15


def test_paper_dry_run_lists_every_job_with_its_pushed_image():
    images = yaml.safe_load((REPO / "config" / "containers.yaml").read_text())["containers"]
    pushed = {}
    for env in ENVS:
        assert images["images"][env], f"config/containers.yaml: no image for {env} (--push)"
        inspect = [ENGINE, "image", "inspect", "--format", "{{json .RepoDigests}}"]
        digests = subprocess.run([*inspect, f"srpo-{env}:cpu"], capture_output=True, text=True)
        pushed[env] = images["images"][env].removeprefix("docker://")
        assert pushed[env] in digests.stdout, (env, digests.stdout)
    env = run_env(PATH=f"{STAND_IN}:{BIN}:{run_env()['PATH']}")
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--sdm", "apptainer", "--profile", "slurm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    listing = dict(re.findall(r"^\s{4}(\w+)\s+\w+\s+docker://(\S+)$", output, re.M))
    jobs = re.findall(r"^rule (\w+):$", output, re.M)
    assert len(jobs) > 40  # the paper DAG: 32 sampling shards, training, 5 metrics, ...
    for rule in set(jobs) - {"all"}:
        assert listing[rule] == pushed[images["rules"][rule]], rule
    for image in set(pushed.values()):
        assert f"Singularity image docker://{image} will be pulled." in output
