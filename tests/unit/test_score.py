"""`srpo score` on a sample folder: one row per image, and one-line errors for bad inputs."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from support import run_env

from srpo.io import InputError
from srpo.score import SCORE_COLUMNS, score_folders


def sample_folder(tmp_path, name="base", count=3):
    folder = tmp_path / name
    (folder / "images").mkdir(parents=True)
    entries = []
    for prompt_id in range(count):
        file = f"images/{prompt_id:05d}.png"
        Image.new("RGB", (64, 64), (40 * prompt_id, 90, 200)).save(folder / file)
        entries.append(
            {
                "prompt_id": prompt_id,
                "style": "photo",
                "prompt": f"a photo {prompt_id}",
                "file": file,
            }
        )
    (folder / "manifest.json").write_text(json.dumps({"images": entries}))
    return folder


def hpsv2_weights(models):
    return {
        "checkpoint": str(models / "hpsv2" / "HPS_v2.1_compressed.pt"),
        "model_config": str(models / "hpsv2" / "open_clip_config.json"),
    }


def test_scores_every_image_of_every_model(tiny_models, tmp_path):
    samples = {"A": sample_folder(tmp_path, "a"), "B": sample_folder(tmp_path, "b", 2)}
    out = tmp_path / "scores" / "hpsv2.parquet"
    frame = score_folders(samples, "hpsv2", out, hpsv2_weights(tiny_models), batch_size=2)
    assert list(frame.columns) == list(SCORE_COLUMNS)
    assert frame.groupby("model").size().to_dict() == {"A": 3, "B": 2}
    assert set(frame["metric_version"]) == {"HPSv2.1"}
    written = pd.read_parquet(out)
    pd.testing.assert_frame_equal(written, frame)
    assert pd.read_csv(out.with_suffix(".csv"))["score"].round(6).tolist() == (
        frame["score"].round(6).tolist()
    )
    checkpoint = hpsv2_weights(tiny_models)["checkpoint"]
    want = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert json.loads(frame["checkpoint_sha256"][0]) == {checkpoint: want}


def test_unreadable_png_is_one_line_and_writes_nothing(tiny_models, tmp_path):
    folder = sample_folder(tmp_path)
    (folder / "images" / "00001.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "hpsv2.parquet"
    with pytest.raises(InputError, match=r"00001\.png: unreadable image"):
        score_folders({"A": folder}, "hpsv2", out, hpsv2_weights(tiny_models))
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_missing_image_and_manifest(tmp_path):
    folder = sample_folder(tmp_path)
    (folder / "images" / "00002.png").unlink()
    with pytest.raises(InputError, match=r"00002\.png: image listed in .* is missing"):
        score_folders({"A": folder}, "hpsv2", tmp_path / "x.parquet", {})
    with pytest.raises(InputError, match="sample manifest not found"):
        score_folders({"A": tmp_path / "nowhere"}, "hpsv2", tmp_path / "x.parquet", {})


def test_cli_unknown_metric_is_one_line(tmp_path):
    folder = sample_folder(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "srpo", "score", "--metric", "clipscore", f"--samples=A={folder}",
         "--out", str(tmp_path / "x.parquet")],
        env=run_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "clipscore" in lines[0]
