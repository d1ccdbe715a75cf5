"""The HPSv3 training reward: the package's differentiable path, its SRP formula, its gradients.

Runs in its own environment: bash envs/metric-env.sh hpsv3, then
.venv-hpsv3/bin/python -m pytest tests/metric_envs/test_hpsv3_reward.py (skipped elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import directional_derivatives

pytest.importorskip("hpsv3.inference", reason="run in .venv-hpsv3: bash envs/metric-env.sh hpsv3")

from srpo.config import HPSV3_SCALE
from srpo.rewards import hpsv3, load_reward
from srpo.rewards.metric import load_metric

pytestmark = pytest.mark.filterwarnings(
    # hpsv3 runs its head under torch.autocast("cuda"), which warns and does nothing on CPU.
    "ignore:CUDA is not available:UserWarning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
)
POSITIVE, NEGATIVE, WEIGHT = "Detail. a red fox in the snow", "Painting. a red fox in the snow", 0.2
SMART = 448
"""The side the inferencer resizes a square image to: 256·28·28 pixels, a multiple of 28."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hpsv3.build_tiny(tmp_path_factory.mktemp("hpsv3"))


def paths(folder: Path) -> dict[str, Path]:
    return {"checkpoint": folder / hpsv3.CHECKPOINT_NAME, "config": folder / hpsv3.CONFIG_NAME}


@pytest.fixture(scope="module")
def reward(tiny: Path) -> hpsv3.HPSv3Reward:
    return load_reward("hpsv3", **paths(tiny), scale=HPSV3_SCALE)


@pytest.fixture(scope="module")
def metric(tiny: Path) -> hpsv3.HPSv3Metric:
    return load_metric("hpsv3", **paths(tiny))


def noise(height: int, width: int, seed: int) -> tuple[Image.Image, torch.Tensor]:
    """The same picture as a PIL image and as a [3,H,W] tensor in [0,1]."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32) / 255
    return Image.fromarray(array), tensor


def test_preprocessing_equals_the_processors_where_nothing_is_resized(reward, metric) -> None:
    """At the smart size the torch path (ours) and the PIL path (the metric's) give the same
    `pixel_values` and `image_grid_thw`, up to float32 rounding of the rescale."""
    image, tensor = noise(SMART, SMART, 0)
    ours = reward.inferencer.prepare_batch([tensor * hpsv3.PIXEL_RANGE], [POSITIVE])
    theirs = metric.inferencer.prepare_batch([image], [POSITIVE])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)


def test_preprocessing_resizes_like_the_processor(reward, metric) -> None:
    """Other sizes: the same grid (smart size); pixels differ only by the resampler (torchvision
    bicubic on floats vs PIL bicubic on uint8), a few grey levels in normalised units."""
    image, tensor = noise(64, 48, 1)
    ours = reward.inferencer.prepare_batch([tensor * hpsv3.PIXEL_RANGE], [POSITIVE])
    theirs = metric.inferencer.prepare_batch([image], [POSITIVE])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    difference = (ours["pixel_values"] - theirs["pixel_values"]).abs()
    assert float(difference.mean()) < 0.02, float(difference.mean())  # 0.006 measured


def test_mu_is_the_metrics_score(reward, metric) -> None:
    images = [noise(SMART, SMART, seed) for seed in (2, 3)]
    expected = metric.score([image for image, _ in images], [POSITIVE, NEGATIVE])
    with torch.no_grad():
        mu = reward.score(torch.stack([tensor for _, tensor in images]), [POSITIVE, NEGATIVE])
    assert mu.tolist() == pytest.approx(expected, abs=1e-5, rel=0)


def test_semantic_relative_reward_formula(reward) -> None:
    """scale·((1 + w)·μ(x, p) − μ(x, n)), each μ computed on its own (no batch padding)."""
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = reward.semantic_relative_reward(images, POSITIVE, NEGATIVE, WEIGHT)
        positive = torch.cat([reward.score(image[None], [POSITIVE]) for image in images])
        negative = torch.cat([reward.score(image[None], [NEGATIVE]) for image in images])
    expected = HPSV3_SCALE * ((1 + WEIGHT) * positive - negative)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("what", "tolerance"),
    # The SRP gradient is scale·((1 + w)·∇μ(p) − ∇μ(n)) with ∇μ(p) ≈ ∇μ(n): the difference
    # magnifies μ's finite-difference noise (measured: 0.02% of the largest for μ, 0.7% for SRP).
    [("mu", 0.005), ("srp", 0.03)],
)
def test_gradient_matches_finite_differences(reward, what: str, tolerance: float) -> None:
    """float32, step 0.1 along unit directions (~1e-3 per pixel): transformers 4.45 computes
    Qwen2-VL's RMSNorm and rotary embeddings in float32 whatever the model's dtype, so float64
    does not lower the noise floor.
    The tolerance is a fraction of the largest derivative: a detached or mis-scaled path is off
    by 100% or more."""
    images = torch.rand((1, 3, 64, 48), generator=torch.Generator().manual_seed(6))

    def mu(pixels: torch.Tensor) -> torch.Tensor:
        return reward.score(torch.cat([pixels, pixels]), [POSITIVE, NEGATIVE])

    def srp(pixels: torch.Tensor) -> torch.Tensor:
        return reward.semantic_relative_reward(pixels, POSITIVE, NEGATIVE, WEIGHT)

    analytic, numeric = directional_derivatives(
        mu if what == "mu" else srp, images, step=0.1, seed=5
    )
    largest = float(numeric.abs().max())
    assert largest > 0, what
    assert float((analytic - numeric).abs().max()) < tolerance * largest, (analytic, numeric)


def test_gradient_reaches_the_pixels_only(reward) -> None:
    images = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(7))
    pixels = images.requires_grad_(True)
    reward.semantic_relative_reward(pixels, POSITIVE, NEGATIVE, WEIGHT).sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in reward.parameters())
