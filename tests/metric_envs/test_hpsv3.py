"""HPSv3 checked against the published hpsv3 package's own inferencer, on a tiny model.

Runs in its own environment: bash envs/metric-env.sh hpsv3, then
.venv-hpsv3/bin/python -m pytest tests/metric_envs/test_hpsv3.py (skipped elsewhere).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("hpsv3.inference", reason="run in .venv-hpsv3: bash envs/metric-env.sh hpsv3")

from hpsv3 import HPSv3RewardInferencer

from srpo.io import InputError, file_hashes
from srpo.rewards import hpsv3
from srpo.rewards.metric import Metric, load_metric

pytestmark = pytest.mark.filterwarnings(
    # hpsv3 runs its head under torch.autocast("cuda"), which warns and does nothing on CPU.
    "ignore:CUDA is not available:UserWarning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
)
PROMPTS = ["a cat", "a dog on a sofa", "a red fox in the snow"]


def pil_images() -> list[Image.Image]:
    """Noise pictures of three shapes (the processor resizes each to ~200k pixels its own way)."""
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (200, 300), (90, 70)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hpsv3.build_tiny(tmp_path_factory.mktemp("hpsv3"))


def paths(folder: Path) -> dict[str, Path]:
    return {"config": folder / hpsv3.CONFIG_NAME, "checkpoint": folder / hpsv3.CHECKPOINT_NAME}


def test_scores_equal_the_packages_inferencer(tiny: Path) -> None:
    """Ours (batches of 2) = μ of HPSv3RewardInferencer.reward, one image at a time."""
    images = pil_images()
    metric = load_metric("hpsv3", batch_size=2, **paths(tiny))
    reference = HPSv3RewardInferencer(
        str(paths(tiny)["config"]), str(paths(tiny)["checkpoint"]), device="cpu"
    )
    with torch.no_grad():
        expected = [
            reference.reward([image], [prompt])[0, 0].item()
            for image, prompt in zip(images, PROMPTS, strict=True)
        ]
    assert metric.score(images, PROMPTS) == pytest.approx(expected, abs=1e-5, rel=0)


def test_metric_interface(tiny: Path) -> None:
    metric = load_metric("hpsv3", **paths(tiny))
    assert isinstance(metric, Metric) and (metric.name, metric.version) == ("hpsv3", "HPSv3")
    checkpoint = paths(tiny)["checkpoint"]
    assert metric.checkpoint_sha256 == {
        str(checkpoint): hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    }
    scores = metric.score(pil_images()[:2], ["a cat", "a cat"])
    assert all(isinstance(score, float) for score in scores)
    assert abs(scores[0] - scores[1]) > 1e-3, "two different images scored alike"
    assert not any(p.requires_grad for p in metric.model.parameters())


BUILD = """
import sys
from srpo.rewards import hpsv3
hpsv3.build_tiny(sys.argv[1])
"""


def test_tiny_build_is_byte_identical_across_processes(tiny: Path, tmp_path: Path) -> None:
    """Every file equal; the yaml names its base folder by absolute path, so that line moves."""
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], check=True)
    ours, theirs = file_hashes(tiny), file_hashes(tmp_path)
    assert set(ours) == set(theirs) and hpsv3.CONFIG_NAME in ours
    assert {k: v for k, v in ours.items() if k != hpsv3.CONFIG_NAME} == {
        k: v for k, v in theirs.items() if k != hpsv3.CONFIG_NAME
    }
    moved = (tmp_path / hpsv3.CONFIG_NAME).read_text().replace(str(tmp_path), str(tiny))
    assert moved == (tiny / hpsv3.CONFIG_NAME).read_text()


@pytest.mark.parametrize("key", ["config", "checkpoint"])
def test_missing_file_is_one_line(tiny: Path, tmp_path: Path, key: str) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(InputError) as error:
        load_metric("hpsv3", **{**paths(tiny), key: missing})
    message = str(error.value)
    assert "\n" not in message and str(missing) in message and "not found" in message


def test_wrong_checkpoint_is_one_line(tiny: Path, tmp_path: Path) -> None:
    """A safetensors file of another model: strict loading lists every key; we give one line."""
    other = tmp_path / "other.safetensors"
    other.write_bytes((tiny / hpsv3.BASE_NAME / "model.safetensors").read_bytes())
    with pytest.raises(InputError) as error:
        load_metric("hpsv3", **{**paths(tiny), "checkpoint": other})
    message = str(error.value)
    assert "\n" not in message and str(other) in message and "does not match" in message
