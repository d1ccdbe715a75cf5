"""ImageReward checked against the published image-reward package's own loader and score.

Runs in its own environment: bash envs/metric-env.sh imagereward, then
.venv-imagereward/bin/python -m pytest tests/metric_envs/test_imagereward.py (skipped elsewhere).
The tiny model keeps the package's hard-coded ViT-L (1.3 GB on disk), so models are loaded once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RM = pytest.importorskip(
    "ImageReward", reason="run in .venv-imagereward: bash envs/metric-env.sh imagereward"
)

from srpo.io import InputError, file_hashes  # noqa: E402
from srpo.rewards import imagereward  # noqa: E402
from srpo.rewards.metric import Metric, load_metric  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
PROMPTS = ["a cat", "a dog on a sofa", "a red fox in the snow"]


def pil_images() -> list[Image.Image]:
    """Noise pictures: portrait, landscape, and a greyscale one (the package converts to RGB)."""
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (200, 300), (90, 70)]
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pictures[-1] = pictures[-1].convert("L")
    return pictures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imagereward.build_tiny(tmp_path_factory.mktemp("imagereward"))


def paths(folder: Path) -> dict[str, Path]:
    return {
        "checkpoint": folder / imagereward.CHECKPOINT_NAME,
        "med_config": folder / imagereward.MED_CONFIG_NAME,
        "tokenizer": folder / imagereward.TOKENIZER_NAME,
    }


@pytest.fixture(scope="module")
def metric(tiny: Path) -> Metric:
    return load_metric("imagereward", batch_size=2, **paths(tiny))


def test_scores_equal_the_packages_score(
    tiny: Path, metric: Metric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours = ImageReward.load(…).score(prompt, image), the package's README call.

    The package finds `bert-base-uncased` as a folder in the working directory: the tiny one.
    """
    monkeypatch.chdir(tiny)
    reference = RM.load(imagereward.CHECKPOINT_NAME, "cpu", med_config=imagereward.MED_CONFIG_NAME)
    images = pil_images()
    with torch.no_grad():
        expected = [
            reference.score(prompt, image) for image, prompt in zip(images, PROMPTS, strict=True)
        ]
    assert metric.score(images, PROMPTS) == pytest.approx(expected, abs=1e-5, rel=0)


def test_metric_interface(tiny: Path, metric: Metric) -> None:
    assert isinstance(metric, Metric)
    assert (metric.name, metric.version) == ("imagereward", "ImageReward-v1.0")
    checkpoint = paths(tiny)["checkpoint"]
    assert metric.checkpoint_sha256 == {
        str(checkpoint): hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    }
    scores = metric.score(pil_images()[:2], ["a cat", "a cat"])
    assert all(isinstance(score, float) for score in scores)
    assert abs(scores[0] - scores[1]) > 1e-3, "two different images scored alike"
    assert not any(p.requires_grad for p in metric.model.parameters())
    with pytest.raises(InputError, match="float32"):
        metric.to("cpu", torch.bfloat16)


BUILD = """
import sys
from srpo.rewards import imagereward
imagereward.build_tiny(sys.argv[1])
"""


def test_tiny_build_is_byte_identical_across_processes(tiny: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], check=True)
    assert file_hashes(tmp_path) == file_hashes(tiny)
    assert set(file_hashes(tiny)) == {
        imagereward.CHECKPOINT_NAME,
        imagereward.MED_CONFIG_NAME,
        f"{imagereward.TOKENIZER_NAME}/vocab.txt",
        f"{imagereward.TOKENIZER_NAME}/tokenizer_config.json",
    }


def one_line_error(*needles: object, **arguments: object) -> None:
    with pytest.raises(InputError) as error:
        load_metric("imagereward", **arguments)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


@pytest.mark.parametrize("key", ["checkpoint", "med_config", "tokenizer"])
def test_missing_file_is_one_line(tiny: Path, tmp_path: Path, key: str) -> None:
    missing = tmp_path / "absent"
    expected = "no vocab.txt" if key == "tokenizer" else "not found"
    one_line_error(missing, expected, **{**paths(tiny), key: missing})


def test_checkpoint_missing_tensors_is_one_line(tiny: Path, tmp_path: Path) -> None:
    """The package loads with strict=False; a file lacking the model's tensors is refused."""
    partial = tmp_path / "partial.pt"
    torch.save({"mlp.layers.0.bias": torch.zeros(1024)}, partial)
    one_line_error(partial, "missing", **{**paths(tiny), "checkpoint": partial})


TOKENIZER_FROM_CACHE = """
import sys
from srpo.io import InputError
from srpo.rewards.metric import load_metric
try:
    load_metric("imagereward", checkpoint=sys.argv[1], med_config=sys.argv[2])
except InputError as error:
    print(error)
"""


def test_tokenizer_not_in_an_offline_cache_is_one_line(tiny: Path, tmp_path: Path) -> None:
    """Without `tokenizer`, `bert-base-uncased` comes from the (here empty) Hugging Face cache."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    arguments = [str(paths(tiny)["checkpoint"]), str(paths(tiny)["med_config"])]
    run = subprocess.run(
        [sys.executable, "-c", TOKENIZER_FROM_CACHE, *arguments],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.count("\n") == 1 and "'bert-base-uncased'" in run.stdout, run.stdout
    assert "pass tokenizer=" in run.stdout
