"""Evaluation sampling: every sharding and every restart writes byte-identical PNGs, and a re-run
with other settings or another model replaces a shard's images instead of mixing them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from support import EVAL_CSV, REPO, run_env
from typer.testing import CliRunner

from srpo.cli import app
from srpo.io import InputError, sha256_file
from srpo.prompts import EvalPrompt, read_eval_prompts
from srpo.sample import (
    SampleSettings,
    generate,
    parse_shard,
    prompt_seed,
    sample_images,
    shard_batches,
)
from srpo.sample_manifest import gather_manifests

IDS = [7, 3, 12, 0, 5, 1, 9]
TINY = {"steps": 2, "height": 64, "width": 64, "max_sequence_length": 32, "dtype": "float32"}
TINY_ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "32"]


def settings(**overrides) -> SampleSettings:
    return SampleSettings(**{**TINY, **overrides})


def pngs(out_dir: Path) -> dict[int, bytes]:
    return {int(path.stem): path.read_bytes() for path in (out_dir / "images").glob("*.png")}


def sample_shard(flux: Path, prompts: Path, out_dir: Path, shard: tuple[int, int], **kwargs):
    options = {"settings": settings(), "device": "cpu", "progress": False, **kwargs}
    return sample_images(str(flux), prompts, out_dir, shard=shard, **options)


def sample(flux: Path, prompts: Path, out_dir: Path, shards: int = 1, **kwargs) -> list:
    """Run shards 0..n−1 one after another in this process, then gather."""
    results = [sample_shard(flux, prompts, out_dir, (i, shards), **kwargs) for i in range(shards)]
    gather_manifests(out_dir, shards)
    return results


def shard_ids(shard: int, shards: int) -> set[int]:
    """The prompt ids of a shard at batch size 1: every n-th prompt of the file."""
    return set(IDS[shard::shards])


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "eval.csv"
    path.write_text(EVAL_CSV)
    return path


@pytest.fixture(scope="module")
def whole(tiny_flux, prompts, tmp_path_factory) -> dict[int, Path]:
    """Unsharded reference runs by batch size."""
    runs = {}
    for batch_size in (1, 2):
        runs[batch_size] = tmp_path_factory.mktemp(f"whole-bs{batch_size}")
        sample(tiny_flux, prompts, runs[batch_size], settings=settings(batch_size=batch_size))
    return runs


def test_read_eval_prompts_csv_and_txt(prompts, tmp_path):
    assert read_eval_prompts(prompts)[1] == EvalPrompt(
        3, "photo", "a lighthouse on a cliff, at sunset"
    )
    txt = tmp_path / "p.txt"
    txt.write_text("a fox\na car\n")
    assert read_eval_prompts(txt) == [EvalPrompt(0, "", "a fox"), EvalPrompt(1, "", "a car")]


def test_batches_do_not_depend_on_sharding():
    prompts = [EvalPrompt(i, "", str(i)) for i in range(7)]
    whole = shard_batches(prompts, 2, 0, 1)
    shards = [shard_batches(prompts, 2, i, 3) for i in range(3)]
    assert sorted((b for s in shards for b in s), key=lambda b: b[0].prompt_id) == whole
    assert shards[0] == [whole[0], whole[3]]
    assert parse_shard("2/5") == (2, 5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_shards_write_the_same_bytes(tiny_flux, prompts, whole, tmp_path, batch_size):
    sharded = tmp_path / "sharded"
    sample(tiny_flux, prompts, sharded, shards=3, settings=settings(batch_size=batch_size))
    reference = pngs(whole[batch_size])
    assert sorted(reference) == sorted(IDS)
    assert pngs(sharded) == reference
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert [entry["prompt_id"] for entry in manifest["images"]] == sorted(IDS)
    for entry in manifest["images"]:
        assert entry["seed"] == prompt_seed(42, entry["prompt_id"])
        assert entry["sha256"] == sha256_file(sharded / entry["file"])
    assert manifest["images"][0]["style"] == "concept-art"
    assert manifest["settings"]["batch_size"] == batch_size
    assert len(manifest["provenance"]) == 3
    first_shard = json.loads((sharded / "manifests/shard-000-of-003.json").read_text())
    expected = [7, 3, 9] if batch_size == 2 else [7, 0, 9]
    assert [entry["prompt_id"] for entry in first_shard["images"]] == expected


def test_restart_regenerates_only_broken_images(tiny_flux, prompts, whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole[2], out)
    reference = pngs(out)
    (out / "images" / "00007.png").unlink()  # batch 0 = ids 7, 3
    truncated = out / "images" / "00012.png"  # batch 1 = ids 12, 0
    truncated.write_bytes(reference[12][:-1])  # PIL still decodes this one
    untouched = {i: (out / f"images/{i:05d}.png").stat().st_mtime_ns for i in (3, 0, 5, 1, 9)}
    [result] = sample(tiny_flux, prompts, out, settings=settings(batch_size=2))
    assert (result.generated, result.skipped, result.replaced) == (2, 5, 1)
    assert pngs(out) == reference
    assert {i: (out / f"images/{i:05d}.png").stat().st_mtime_ns for i in untouched} == untouched
    [again] = sample(tiny_flux, prompts, out, settings=settings(batch_size=2))
    assert (again.generated, again.skipped) == (0, 7)
    # Snakemake deletes a job's output before re-running it: the progress record still vouches
    (out / "manifests" / "shard-000-of-001.json").unlink()
    [rerun] = sample(tiny_flux, prompts, out, settings=settings(batch_size=2))
    assert (rerun.generated, rerun.skipped) == (0, 7)


def test_stopped_shard_resumes_after_its_last_batch(
    tiny_flux, prompts, whole, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    calls = []

    def stop_at_second_batch(pipe, batch, options):
        if calls:
            raise KeyboardInterrupt
        calls.append(batch)
        return generate(pipe, batch, options)

    monkeypatch.setattr("srpo.sample.generate", stop_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_shard(tiny_flux, prompts, out, (0, 1), settings=settings(batch_size=2))
    monkeypatch.undo()
    assert not (out / "manifests" / "shard-000-of-001.json").exists()
    [result] = sample(tiny_flux, prompts, out, settings=settings(batch_size=2))
    assert (result.generated, result.skipped) == (5, 2)  # batch 0 = ids 7, 3 was kept
    assert pngs(out) == pngs(whole[2])


def test_rerun_with_other_settings_replaces_the_shard(tiny_flux, prompts, whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole[1], out)
    old = pngs(out)
    fresh = tmp_path / "fresh-steps3"
    sample(tiny_flux, prompts, fresh, settings=settings(steps=3))
    new = pngs(fresh)
    # two shards at the old settings: every image is recorded already, nothing is made
    assert [sample_shard(tiny_flux, prompts, out, (i, 2)).generated for i in (0, 1)] == [0, 0]
    first = sample_shard(tiny_flux, prompts, out, (0, 2), settings=settings(steps=3))
    assert (first.generated, first.skipped, first.replaced) == (4, 0, 4)
    mine, other = shard_ids(0, 2), shard_ids(1, 2)
    now = pngs(out)
    assert all(now[i] == new[i] != old[i] for i in mine)
    assert all(now[i] == old[i] for i in other)
    assert not (out / "manifest.json").exists()  # outdated once the first image was replaced
    stale = out / "manifests" / "shard-001-of-002.json"
    message = one_line_error(gather_manifests, out, 2)
    assert message.startswith(f"{stale}: made differently from shard-000-of-002.json")
    assert "settings.steps: 3 in shard-000-of-002.json, 2 here" in message
    second = sample_shard(tiny_flux, prompts, out, (1, 2), settings=settings(steps=3))
    assert (second.generated, second.replaced) == (3, 3)
    gathered = json.loads(gather_manifests(out, 2).read_text())
    assert gathered["settings"]["steps"] == 3 and len(gathered["provenance"]) == 2
    assert pngs(out) == new
    # the old one-shard manifest now records images that are gone
    message = one_line_error(gather_manifests, out)
    assert message.startswith(f"{out / 'images'}/") and "(run its shard again)" in message


def test_trained_transformer_changes_images(tiny_flux, prompts, whole, tmp_path):
    state = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    files = {}
    for name, weights in {"same": state, "changed": changed}.items():
        files[name] = tmp_path / name / "diffusion_pytorch_model.safetensors"
        files[name].parent.mkdir()
        save_file(weights, files[name])
    sample(tiny_flux, prompts, tmp_path / "out-same", transformer=files["same"])
    out = tmp_path / "out-changed"  # was sampled with the base model's transformer
    shutil.copytree(whole[1], out)
    first = sample_shard(tiny_flux, prompts, out, (0, 2), transformer=files["changed"])
    assert (first.generated, first.replaced) == (4, 4)
    assert all(pngs(out)[i] == pngs(whole[1])[i] for i in shard_ids(1, 2))
    sample_shard(tiny_flux, prompts, out, (1, 2), transformer=files["changed"])
    gather_manifests(out, 2)
    folder = tmp_path / "changed-folder"
    model = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    model.load_state_dict(changed)
    model.save_pretrained(folder)
    sample(tiny_flux, prompts, tmp_path / "out-folder", transformer=folder)

    base = pngs(whole[1])
    assert pngs(tmp_path / "out-same") == base
    changed_pngs = pngs(tmp_path / "out-changed")
    assert all(changed_pngs[i] != base[i] for i in IDS)
    assert pngs(tmp_path / "out-folder") == changed_pngs
    model_record = json.loads((tmp_path / "out-changed" / "manifest.json").read_text())["model"]
    assert model_record["sha256"] == {files["changed"].name: sha256_file(files["changed"])}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("p.txt", "a fox\n\na car\n", ":2: empty line"),
        ("p.csv", "prompt_id,prompt\n0,a fox\n", ":1: missing column 'style'"),
        ("p.csv", "prompt_id,style,prompt\n1,photo,a\n1,anime,b\n", ":3: duplicate prompt_id 1"),
        ("p.csv", "prompt_id,style,prompt\nx,photo,a\n", ":2: column prompt_id: expected"),
        ("p.csv", "prompt_id,style,prompt\n1,photo,a\n\n2,photo,b\n", ":3: empty line"),
        ("p.csv", "prompt_id,style,prompt\n1,photo, \n", ":2: column prompt: empty prompt"),
        ("p.json", "[]", ": expected a .csv"),
    ],
)  # fmt: skip
def test_bad_prompt_files(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert one_line_error(read_eval_prompts, path).startswith(f"{path}{expected}")


def test_missing_inputs_name_the_file(tiny_flux, prompts, whole, tmp_path):
    missing = tmp_path / "none.csv"
    assert one_line_error(sample, tiny_flux, missing, tmp_path / "a").startswith(f"{missing}: ")
    absent = tmp_path / "model.safetensors"
    message = one_line_error(sample, tiny_flux, prompts, tmp_path / "b", transformer=absent)
    assert message.startswith(f"{absent}: transformer not found")
    out = tmp_path / "gather"
    shutil.copytree(whole[1], out)
    (out / "images" / "00012.png").unlink()
    assert one_line_error(gather_manifests, out).startswith(f"{out / 'images' / '00012.png'}: ")
    partly = tmp_path / "partly"
    shutil.copytree(whole[1], partly)
    for shard in (0, 1):  # every image is recorded already: only the manifests are written
        assert sample_shard(tiny_flux, prompts, partly, (shard, 3)).generated == 0
    missing = partly / "manifests" / "shard-002-of-003.json"
    message = one_line_error(gather_manifests, partly, 3)
    assert message.startswith(f"{missing}: shard manifest not found")
    assert "--shard 2/3" in message
    assert one_line_error(gather_manifests, partly, 0).startswith("--shards: ")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("steps", 0, "expected a positive integer, got 0"),
        ("height", 100, "expected a positive multiple of 16, got 100"),
        ("max_sequence_length", 513, "expected at most 512 (FLUX's T5 limit), got 513"),
        ("dtype", "float8", "expected one of ['bfloat16', 'float32'], got 'float8'"),
    ],
)
def test_bad_settings_name_the_field(field, value, expected):
    """The settings know their fields, not the CLI's flags (`srpo sample` maps one to another)."""
    assert one_line_error(settings(**{field: value}).validate) == f"{field}: {expected}"


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--shard", "3/2"], "error: --shard: "),
        (["--dtype", "float8"], "error: --dtype: "),
        (["--max-sequence-length", "513"], "error: --max-sequence-length: expected at most 512"),
        (["--batch-size", "0"], "error: --batch-size: expected a positive integer, got 0"),
    ],
)
def test_cli_bad_options_one_line(tiny_flux, prompts, tmp_path, option, expected):
    args = ["sample", "--base-model", str(tiny_flux), "--prompts", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path / "o"), *option])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(expected)


def test_cli_end_to_end(tiny_flux, prompts, whole, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "srpo", "sample", "--base-model", str(tiny_flux),
               "--prompts", str(prompts), "--out-dir", str(out), *TINY_ARGS,
               "--batch-size", "2", "--shard", "0/1"]  # fmt: skip
    env = run_env(CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("generated 7, skipped 0 existing")
    gathered = CliRunner().invoke(app, ["gather-samples", str(out), "--shards", "1"])
    assert gathered.exit_code == 0, gathered.output
    assert pngs(out) == pngs(whole[2])
    wrong = CliRunner().invoke(app, ["gather-samples", str(out), "--shards", "2"])
    assert wrong.exit_code == 2
    [line] = wrong.stderr.strip().splitlines()
    assert line.startswith(f"error: {out / 'manifests' / 'shard-000-of-002.json'}: ")

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_id,prompt\n0,a fox\n")
    command[command.index(str(prompts))] = str(bad)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:1: missing column 'style', expected a header prompt_id,style,prompt "
        "(got prompt_id,prompt)"
    ]
