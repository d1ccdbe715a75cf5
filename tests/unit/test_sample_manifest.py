"""The sample manifests round-trip (shards written → gathered → read back), keep their byte
layout, and name a missing or changed image in one line, whoever reads them."""

import json
from pathlib import Path

import pytest

from srpo.io import InputError, sha256_file
from srpo.prompts import EvalPrompt
from srpo.sample_manifest import (
    gather_manifests,
    gathered_manifest,
    image_entry,
    make_spec,
    model_record,
    progress_manifest,
    read_sample_manifest,
    recorded_digests,
    shard_manifest,
    write_progress,
    write_shard,
)

PROMPTS = [EvalPrompt(4, "photo", "a fox"), EvalPrompt(1, "anime", "a car, at night")]
SPEC = make_spec(
    settings={"steps": 2},
    model={"base_model": "tiny/flux", "sha256": {}, "transformer": None},
    prompts={"count": 2, "sha256": "ab" * 32},
)
SHARD_BYTES = """{
  "images": [
    {
      "file": "images/00004.png",
      "prompt": "a fox",
      "prompt_id": 4,
      "seed": 104,
      "sha256": "%s",
      "style": "photo"
    }
  ],
  "model": {
    "base_model": "tiny/flux",
    "sha256": {},
    "transformer": null
  },
  "prompts": {
    "count": 2,
    "sha256": "%s"
  },
  "provenance": {
    "created": "then"
  },
  "settings": {
    "steps": 2
  },
  "shard": {
    "count": 2,
    "index": 0
  }
}
"""


def one_line_error(call, *args) -> str:
    with pytest.raises(InputError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def sampled(out: Path) -> list[dict]:
    """Two shards of one prompt each, their images written, their manifests finished."""
    entries = []
    for shard, prompt in enumerate(PROMPTS):
        entry = image_entry(prompt, 100 + prompt.prompt_id, "")
        image = out / entry["file"]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(f"pixels of {prompt.prompt}".encode())
        entry["sha256"] = sha256_file(image)
        write_shard(out, SPEC, shard, 2, [entry], {"created": "then"})
        entries.append(entry)
    return entries


def test_round_trip(tmp_path):
    entries = sampled(tmp_path)
    first = shard_manifest(tmp_path, 0, 2)
    assert first == tmp_path / "manifests" / "shard-000-of-002.json"
    assert first.read_text() == SHARD_BYTES % (entries[0]["sha256"], "ab" * 32)
    gathered = gather_manifests(tmp_path, 2)
    assert gathered == gathered_manifest(tmp_path) == tmp_path / "manifest.json"
    record = json.loads(gathered.read_text())
    assert [entry["prompt_id"] for entry in record["images"]] == [1, 4]
    assert record["provenance"][1] == {"manifest": "shard-001-of-002.json", "created": "then"}
    images = read_sample_manifest(tmp_path)
    assert [(image.prompt_id, image.style, image.prompt) for image in images] == [
        (1, "anime", "a car, at night"),
        (4, "photo", "a fox"),
    ]
    assert [image.path for image in images] == [
        tmp_path / "images/00001.png",
        tmp_path / "images/00004.png",
    ]
    assert [image.sha256 for image in images] == [entries[1]["sha256"], entries[0]["sha256"]]
    assert model_record(tmp_path) == SPEC["model"]
    assert model_record(tmp_path / "elsewhere") is None


def test_changed_or_missing_image_is_named_in_one_line(tmp_path):
    sampled(tmp_path)
    gather_manifests(tmp_path, 2)
    image = tmp_path / "images" / "00001.png"
    image.write_bytes(image.read_bytes()[:-1])  # half-written
    message = one_line_error(gather_manifests, tmp_path, 2)
    assert message == f"{image}: image differs from shard-001-of-002.json (run its shard again)"
    message = one_line_error(read_sample_manifest, tmp_path)
    assert message.startswith(f"{image}: expected the image with the sha256 recorded in ")
    assert str(gathered_manifest(tmp_path)) in message
    image.unlink()
    message = one_line_error(gather_manifests, tmp_path, 2)
    assert message == f"{image}: image of shard-001-of-002.json missing (run its shard again)"
    message = one_line_error(read_sample_manifest, tmp_path)
    assert message == f"{image}: image listed in {gathered_manifest(tmp_path)} is missing"


def test_only_manifests_of_the_same_spec_vouch_for_images(tmp_path):
    entries = sampled(tmp_path)
    progress = progress_manifest(tmp_path, 0, 4)
    assert progress.name == "shard-000-of-004.progress.json"
    other = image_entry(EvalPrompt(7, "photo", "a boat"), 107, "cd" * 32)
    write_progress(tmp_path, SPEC, 0, 4, [other])
    write_progress(tmp_path, {**SPEC, "settings": {"steps": 3}}, 1, 4, [{**other, "sha256": "x"}])
    assert json.loads(progress.read_text())["shard"] == {"index": 0, "count": 4}
    assert "provenance" not in json.loads(progress.read_text())
    assert recorded_digests(tmp_path, SPEC) == {
        entries[0]["file"]: {entries[0]["sha256"]},
        entries[1]["file"]: {entries[1]["sha256"]},
        "images/00007.png": {"cd" * 32},
    }
    assert recorded_digests(tmp_path, {**SPEC, "settings": {"steps": 4}}) == {}


def test_shards_of_another_spec_are_not_gathered(tmp_path):
    sampled(tmp_path)
    entry = json.loads(shard_manifest(tmp_path, 1, 2).read_text())["images"]
    write_shard(tmp_path, {**SPEC, "settings": {"steps": 3}}, 1, 2, entry, {"created": "now"})
    message = one_line_error(gather_manifests, tmp_path, 2)
    assert message.startswith(f"{shard_manifest(tmp_path, 1, 2)}: made differently from ")
    assert "settings.steps: 2 in shard-000-of-002.json, 3 here" in message
    assert not gathered_manifest(tmp_path).exists()
