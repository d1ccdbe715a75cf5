"""Verified inputs: --verify hashes checked before any compute, hub ids checked for reach, the
tiny models' hashes in config/config.yaml, and `srpo doctor` on a workflow config."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO, copy_workflow, mix_training, run_env

from srpo.io import InputError
from srpo.verify import parse_expected, require_pretrained


def srpo(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srpo", *args],
        cwd=cwd,
        env=run_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flipped_copy(source: Path, target: Path) -> Path:
    """`source` copied to `target` with one byte in its middle changed."""
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))
    return target


def test_tiny_weight_hashes_in_the_default_config_match_a_fresh_build(tiny_models):
    """config/config.yaml lists the tiny models' sha256: a fresh build has exactly those bytes
    (a change to srpo/tiny.py that moves them must update the config)."""
    weights = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["weights"]
    prefix = "results/tiny/models/"
    checked = 0
    for name, entry in weights.items():
        built = tiny_models / entry["path"].removeprefix(prefix)
        if built.exists():  # hpsv3 and imagereward are built in their own environments
            assert digest(built) == entry["sha256"], name
            checked += 1
    assert checked == 8


def test_one_flipped_byte_is_caught_before_any_compute(tiny_models, tmp_path):
    """The sample folders do not even exist: the hash check comes first and names both hashes."""
    good = tiny_models / "hpsv2" / "HPS_v2.1_compressed.pt"
    bad = flipped_copy(good, tmp_path / "HPS_v2.1_compressed.pt")
    out = tmp_path / "scores" / "hpsv2.parquet"
    result = srpo(
        "score",
        "--metric=hpsv2",
        f"--samples=A={tmp_path / 'missing'}",
        f"--weight=checkpoint={bad}",
        f"--weight=model_config={tiny_models / 'hpsv2' / 'open_clip_config.json'}",
        f"--verify={bad}={digest(good)}",
        f"--out={out}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: sha256 is {digest(bad)}, expected {digest(good)}: the file is "
        "truncated, corrupt or another version; download it again"
    ]
    assert not out.parent.exists()


def test_flipped_byte_in_the_base_model_stops_sampling(tiny_models, tmp_path):
    flux = shutil.copytree(tiny_models / "flux", tmp_path / "flux")
    weights = flux / "transformer" / "diffusion_pytorch_model.safetensors"
    good = digest(weights)
    flipped_copy(weights, weights)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    result = srpo(
        "sample",
        f"--base-model={flux}",
        f"--prompts={prompts}",
        f"--out-dir={tmp_path / 'samples'}",
        f"--verify={weights}={good}",
    )
    assert result.returncode == 2
    assert f"error: {weights}: sha256 is {digest(weights)}, expected {good}" in result.stderr
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("model.pt", "--verify: expected PATH=SHA256 (64 hex digits), got 'model.pt'"),
        ("model.pt=abc", "--verify: expected PATH=SHA256 (64 hex digits), got 'model.pt=abc'"),
    ],
)
def test_bad_verify_option(value, message):
    with pytest.raises(InputError) as error:
        parse_expected([value])
    assert str(error.value) == message


def test_hub_id_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError) as error:
        require_pretrained("black-forest-labs/FLUX.1-dev", "--base-model")
    message = str(error.value)
    assert message.startswith("--base-model: black-forest-labs/FLUX.1-dev is not a folder here")
    assert "HF_HUB_OFFLINE is set" in message
    assert "`hf download black-forest-labs/FLUX.1-dev --local-dir weights/FLUX.1-dev`" in message
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    require_pretrained("black-forest-labs/FLUX.1-dev", "--base-model")


def doctor_rows(output: str) -> dict[str, str]:
    """subject → status of the doctor's table (rich box rows)."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[2] in {"ok", "warn", "fail"}:
            rows[cells[1]] = cells[2]
    return rows


def test_doctor_passes_the_tiny_default_before_any_run(tmp_path):
    folder = copy_workflow(tmp_path / "wf")
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = srpo("doctor", cwd=folder, PATH=path, COLUMNS="250")  # fewer wrapped rows
    assert result.returncode == 0, result.stdout + result.stderr
    rows = doctor_rows(result.stdout)
    assert rows["flux_transformer"] == rows["base_model"] == rows["bundled"] == "ok"
    assert rows["hpsv3"] == rows["main"] == rows["visible"] == "ok"
    assert rows["results/tiny"] == "ok"
    held_out = "config/train-tiny.yaml: evaluation.metrics"
    assert rows[f"{held_out}.aesthetic.model_config"] == "ok"  # made by the tiny build
    assert rows[f"{held_out}.pickscore.model_path"] == "ok"
    assert "0 failed" in result.stdout


def test_doctor_checks_the_paper_runs_held_out_metrics(tmp_path, monkeypatch):
    """PickScore's hub ids get a row each (the aesthetic files already have theirs, under
    `weights:`); offline and without a cache they fail in one line."""
    from srpo.doctor import Doctor, load_workflow_config

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    doctor = Doctor(load_workflow_config([REPO / "config" / "paper.yaml"]))
    doctor.train_config()
    rows = {row.subject: row for row in doctor.rows}
    held_out = "config/train-paper.yaml: evaluation.metrics"
    assert rows["config/train-paper.yaml"].status in {"ok", "warn"}
    for key in ("model_path", "processor_path"):
        row = rows[f"{held_out}.pickscore.{key}"]
        assert row.status == "fail", row.detail
    assert not any(subject.startswith(f"{held_out}.aesthetic") for subject in rows)


def test_doctor_fails_a_corrupt_weight_and_a_missing_environment(tiny_models, tmp_path):
    folder = copy_workflow(tmp_path / "wf")
    good = tiny_models / "hpsv2" / "HPS_v2.1_compressed.pt"
    bad = flipped_copy(good, folder / "weights" / "hps.pt")
    config = yaml.safe_load((folder / "config" / "config.yaml").read_text())
    config["weights"]["hpsv2"] = {"path": "weights/hps.pt", "sha256": digest(good)}
    (folder / "custom.yaml").write_text(yaml.safe_dump(config))
    bare_path = f"{tmp_path / 'empty'}:/usr/bin:/bin"  # no srpo-hpsv3 on it
    result = srpo("doctor", "--config=custom.yaml", cwd=folder, PATH=bare_path)
    assert result.returncode == 2
    rows = doctor_rows(result.stdout)
    assert rows["hpsv2"] == rows["hpsv3"] == rows["main"] == "fail"
    assert rows["flux_transformer"] == rows["pickscore"] == "ok"
    assert result.stderr.splitlines() == [
        f"fail: weights: hpsv2: weights/hps.pt: sha256 is {digest(bad)}, expected {digest(good)}",
        "fail: environment: hpsv3: srpo-hpsv3 not on PATH: run `bash envs/metric-env.sh hpsv3`",
        "fail: environment: main: srpo not on PATH: run `bash scripts/setup.sh`",
    ]
    assert "31 checks, 3 failed" in result.stdout


def test_doctor_checks_the_training_rewards_environment_and_files(tmp_path):
    """Training on a mix with HPSv3 runs `torchrun-hpsv3`: the doctor wants it beside
    srpo-hpsv3, and checks the HPSv3 reward's files."""
    folder = copy_workflow(tmp_path / "wf")
    mix = mix_training(folder)
    tools = tmp_path / "bin"
    tools.mkdir()
    for command in ("srpo", "srpo-hpsv3"):  # what envs/metric-env.sh wrote before torchrun-ENV
        (tools / command).symlink_to(Path(sys.executable).with_name("srpo"))
    result = srpo("doctor", f"--config={mix}", cwd=folder, PATH=f"{tools}:/usr/bin:/bin",
                  COLUMNS="300")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "fail: environment: hpsv3: torchrun-hpsv3 not on PATH: run `bash envs/metric-env.sh hpsv3`"
    ]
    rows = doctor_rows(result.stdout)
    assert rows["config/train-mix.yaml: reward.hpsv3_checkpoint"] == "ok"  # built by the run
    assert rows["main"] == "ok"


def test_doctor_bad_config_is_one_line(tmp_path):
    folder = copy_workflow(tmp_path / "wf")
    (folder / "bad.yaml").write_text("run: tiny\nsample: {steps: many}\n")
    result = srpo("doctor", "--config=bad.yaml", cwd=folder)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config: <top level>: 'encode' is a required property"
    ]
