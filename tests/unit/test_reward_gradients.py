"""Gradients of every main-environment reward agree with finite differences of its value.

The trainer only sees `semantic_relative_reward`'s autograd gradient w.r.t. the decoded pixels:
here it is compared, along a few random directions of the image, with central differences of
the reward itself (float64 models and images, so rounding stays far below the tolerance). HPSv3's
check runs in its own environment (tests/metric_envs/test_hpsv3_reward.py).
"""

from pathlib import Path

import pytest
import torch
from support import directional_derivatives

from srpo.config import RewardConfig
from srpo.rewards import Reward, load_reward

POSITIVE, NEGATIVE, WEIGHT = "Detail. a red fox in the snow", "Painting. a red fox in the snow", 0.2
STEP = 1e-4
"""Central-difference step in [0,1] pixel units: truncation ~STEP², rounding ~1e-16 / STEP."""
RTOL = 1e-6


def reward_config(models: Path, kind: str) -> RewardConfig:
    mix = {"hpsv2": 1.0, "pickscore": 0.5} if kind == "mix" else None
    return RewardConfig(
        kind=kind,
        mix=mix,
        checkpoint=str(models / "hpsv2" / "HPS_v2.1_compressed.pt"),
        model_config_path=str(models / "hpsv2" / "open_clip_config.json"),
        model_path=str(models / "pickscore"),
    )


def load64(models: Path, kind: str) -> Reward:
    config = reward_config(models, kind)
    return load_reward(kind, **config.load_arguments()).to(torch.float64)


@pytest.mark.parametrize("kind", ["hpsv2", "pickscore", "mix"])
def test_gradient_matches_finite_differences(tiny_models: Path, kind: str) -> None:
    reward = load64(tiny_models, kind)
    images = torch.rand((2, 3, 64, 48), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.float64)

    def srp(pixels: torch.Tensor) -> torch.Tensor:
        return reward.semantic_relative_reward(pixels, POSITIVE, NEGATIVE, WEIGHT)

    analytic, numeric = directional_derivatives(srp, images, STEP, count=4)
    assert float(numeric.abs().min()) > 1e-6, f"{kind}: reward flat along {numeric}"
    torch.testing.assert_close(analytic, numeric, rtol=RTOL, atol=0.0)


def test_mix_is_the_weighted_sum_of_its_parts(tiny_models: Path) -> None:
    mix, hps, pick = (load64(tiny_models, kind) for kind in ("mix", "hpsv2", "pickscore"))
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(2))
    images = images.to(torch.float64)
    arguments = (images, POSITIVE, NEGATIVE, WEIGHT)
    expected = hps.semantic_relative_reward(*arguments) + 0.5 * pick.semantic_relative_reward(
        *arguments
    )
    torch.testing.assert_close(mix.semantic_relative_reward(*arguments), expected)
    prompts = [POSITIVE, NEGATIVE]
    expected = hps.score(images, prompts) + 0.5 * pick.score(images, prompts)
    torch.testing.assert_close(mix.score(images, prompts), expected)
    assert not any(p.requires_grad for p in mix.parameters())
