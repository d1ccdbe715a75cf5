"""Static checks of the containers, each shown failing on a broken example: hadolint, FROM by
digest, image references by digest in the config, and a `container:` on every rule."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO, copy_workflow, run_env

BIN = Path(sys.executable).parent
BROKEN = Path(__file__).parent / "broken"
STAND_IN = Path(__file__).parent / "apptainer-stand-in"
# Well-formed references for the tests of the workflow's checks: they are never pulled.
IMAGES = {
    env: f"docker://registry.example/srpo-{env}@sha256:{index:064x}"
    for index, env in enumerate(("main", "hpsv3", "imagereward"), start=1)
}


def run(*command: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = run_env(PATH=f"{STAND_IN}:{BIN}:{run_env()['PATH']}")
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True
    )


def check(*args: str | Path) -> subprocess.CompletedProcess:
    return run(sys.executable, REPO / "containers" / "check.py", *args)


def test_hadolint_passes_the_dockerfile_and_fails_the_broken_one():
    assert run(BIN / "hadolint", "containers/Dockerfile").returncode == 0
    broken = run(BIN / "hadolint", BROKEN / "hadolint.Dockerfile")
    assert broken.returncode == 1
    assert {"DL3015", "DL3009", "DL3003"} <= set(re.findall(r"DL\d{4}", broken.stdout))


def test_every_from_is_pinned_by_digest_and_the_broken_one_is_named():
    assert check("dockerfile", "containers/Dockerfile").returncode == 0
    broken = check("dockerfile", BROKEN / "unpinned.Dockerfile")
    assert broken.returncode == 1
    assert "FROM ${BASE} (= 'debian:bookworm-slim') is not pinned by digest" in broken.stderr


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    """The workflow with every environment's image set, as containers/build.sh --push leaves it."""
    copy_workflow(tmp_path)
    images = tmp_path / "config" / "containers.yaml"
    content = yaml.safe_load(images.read_text())
    content["containers"]["images"] = IMAGES
    images.write_text(yaml.safe_dump(content))
    return tmp_path


def dry_run(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        BIN / "snakemake",
        "-n",
        "--sdm",
        "apptainer",
        "--profile",
        "profiles/slurm",
        *extra,
        cwd=folder,
    )


def test_dry_run_lists_the_image_of_every_rule(workflow_copy):
    result = dry_run(workflow_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    listing = dict(re.findall(r"^\s{4}(\w+)\s+\w+\s+(docker://\S+)$", output, re.M))
    rules = yaml.safe_load((REPO / "config" / "containers.yaml").read_text())["containers"]
    assert listing == {rule: IMAGES[env] for rule, env in rules["rules"].items()}


def test_a_rule_without_container_stops_the_run(workflow_copy):
    train = workflow_copy / "workflow" / "rules" / "train.smk"
    text = train.read_text()
    train.write_text(re.sub(r"    container:\n        image_of\(\"train_srpo\"\)\n", "", text))
    assert train.read_text() != text
    result = dry_run(workflow_copy)
    assert result.returncode == 1
    assert (
        "train_srpo: container: None is not the image of its environment main"
        in result.stdout + result.stderr
    )


def test_an_image_by_tag_is_a_config_error(workflow_copy):
    images = workflow_copy / "config" / "containers.yaml"
    images.write_text(images.read_text().replace(IMAGES["main"], "docker://ghcr.io/x/srpo-main:1"))
    result = dry_run(workflow_copy)
    assert result.returncode == 1
    assert "config: containers.images.main: 'docker://ghcr.io/x/srpo-main:1' is not valid" in (
        result.stdout + result.stderr
    )


def test_images_not_built_yet_stop_an_apptainer_run_with_one_line(workflow_copy):
    images = workflow_copy / "config" / "containers.yaml"
    content = yaml.safe_load(images.read_text())
    content["containers"]["images"] = dict.fromkeys(IMAGES)
    images.write_text(yaml.safe_dump(content))
    result = dry_run(workflow_copy)
    assert result.returncode == 1
    assert "containers.images.{hpsv3,imagereward,main} is null: build and push" in (
        result.stdout + result.stderr
    )


def test_lock_check_passes_and_names_a_stale_lock(tmp_path):
    envs = tmp_path / "envs"
    shutil.copytree(REPO / "envs", envs)
    uv = {"UV": str(BIN / "uv")}
    command = ["bash", str(envs / "lock.sh"), "--check", "test-reference"]
    fresh = subprocess.run(command, env=run_env(**uv), capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    lock = envs / "test-reference.lock.txt"
    lock.write_text(lock.read_text().replace("args==0.1.0 ", "args==0.0.9 "))
    stale = subprocess.run(command, env=run_env(**uv), capture_output=True, text=True)
    assert stale.returncode == 1
    assert "envs/test-reference.lock.txt is not what envs/test-reference.in resolves to" in (
        stale.stderr
    )
    assert "< args==0.0.9" in stale.stderr and "> args==0.1.0" in stale.stderr


def test_build_reads_and_writes_the_config_it_is_given(tmp_path):
    """--config names the containers config build.sh reads and writes (CI pushes into a copy);
    a missing one, or an environment it lacks, is one line naming that file."""
    missing = tmp_path / "none.yaml"
    result = run("bash", "containers/build.sh", "--config", missing)
    assert result.returncode == 2
    assert result.stderr == f"build: --config: {missing} is not a file\n"
    copy = tmp_path / "containers.yaml"
    copy.write_text("containers:\n  images:\n    main:\n    other:\n")
    result = run("bash", "containers/build.sh", "--config", copy, "hpsv3")
    assert result.returncode == 2
    assert result.stderr == f"build: {copy}: no environment 'hpsv3' (known: main other)\n"
