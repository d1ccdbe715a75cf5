"""SPEC §3 formulas pinned against values computed by hand (not by the code under test)."""

import random

import pytest
import torch

from srpo.algorithm import (
    SRPOSettings,
    control_prompts,
    direct_align,
    draw_mid,
    euler_rollout,
    groundtruth_span,
    plan_branches,
    sigma_schedule,
    srpo_losses,
    training_sigmas,
)

# σ⁽⁵⁰⁾[5]: t = 0.9 → 3·0.9 / (1 + 2·0.9) = 2.7 / 2.8; σ⁽⁵⁰⁾[25]: t = 0.5 → 1.5 / 2 = 0.75.
SIGMA_5 = 2.7 / 2.8
SIGMA_25 = 0.75


def sigma_l(index: int) -> float:
    """σ_l[i] = linspace(σ⁽⁵⁰⁾[5], σ⁽⁵⁰⁾[25], 1000)[i], by hand."""
    return SIGMA_5 + index * (SIGMA_25 - SIGMA_5) / 999


def test_paper_defaults():
    settings = SRPOSettings()
    assert settings.timestep_length == 1000
    assert settings.train_timestep == (5, 25)
    assert settings.schedule_steps == 50
    assert settings.shift == 3.0
    assert settings.groundtruth_ratio == 0.9
    assert settings.discount_pos == (0.1, 0.25)
    assert settings.discount_inv == (0.3, 0.01)
    assert settings.reward_threshold == 0.7
    assert settings.positive_words == ["Natural-lighting", "Detail", "Detailed", "Real"]
    assert settings.negative_words == ["Concept art", "Painting", "Anime", "Flat", "Oil"]


def test_sigma_schedule_by_hand():
    # t = 1, .75, .5, .25, 0 → 3t/(1+2t) = 1, 2.25/2.5, 1.5/2, .75/1.5, 0
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    sigmas = sigma_schedule(4, 3.0)
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-7)
    unshifted = sigma_schedule(4, 1.0)
    torch.testing.assert_close(unshifted, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    paper = sigma_schedule(50, 3.0)
    assert len(paper) == 51 and paper[0] == 1.0 and paper[-1] == 0.0
    assert float(paper[5]) == pytest.approx(SIGMA_5, abs=1e-7)
    assert float(paper[25]) == pytest.approx(SIGMA_25, abs=1e-7)


def test_training_sigmas_range():
    sigmas = training_sigmas(SRPOSettings())
    assert sigmas.shape == (1000,)
    for index in (0, 1, 400, 500, 999):
        assert float(sigmas[index]) == pytest.approx(sigma_l(index), abs=1e-6)


def test_euler_rollout_multiplicative_flow():
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return x

    # x_{i+1} = x_i (1 + Δσ_i) with σ = 1, .9, .75, .5, 0 → 0.9 · 0.85 · 0.75 · 0.5
    out = euler_rollout(velocity, torch.full((2, 3), 2.0), sigma_schedule(4, 3.0))
    torch.testing.assert_close(out, torch.full((2, 3), 2.0 * 0.286875))
    assert seen == pytest.approx([1.0, 0.9, 0.75, 0.5])


def test_euler_rollout_exact_velocity_reaches_x0():
    x0, noise = torch.tensor([0.3, -1.2]), torch.tensor([1.5, 0.25])
    out = euler_rollout(lambda x, s: noise - x0, noise, sigma_schedule(25, 3.0))
    torch.testing.assert_close(out, x0)


def test_groundtruth_span_is_100_for_paper():
    settings = SRPOSettings()
    # int((1 − 0.9)·1000) + 1 = int(99.99999999999997) + 1 = 100, not 101
    assert groundtruth_span(500, settings) == 100
    assert groundtruth_span(50, settings) == 50  # limited by m
    assert groundtruth_span(990, settings) == 10  # limited by T − m


def test_branch_plan_by_hand():
    denoise, inversion = plan_branches(500, SRPOSettings())
    # denoise: t_base = 1000 − 500, t_start = 1000 − (500 + 100)
    assert (denoise.t_base, denoise.t_start) == (500, 400)
    assert float(denoise.sigma_inject) == pytest.approx(sigma_l(400), abs=1e-6)
    assert float(denoise.sigma_target) == pytest.approx(sigma_l(500), abs=1e-6)
    assert denoise.sigma_inject > denoise.sigma_target  # toward less noise
    assert denoise.weight == pytest.approx(0.1 + 500 * 0.15 / 999, abs=1e-6)
    # inversion: m = 500 − 100 = 400; t_base = 600, t_start = 1000 − 500
    assert inversion.mid == 400
    assert (inversion.t_base, inversion.t_start) == (600, 500)
    assert float(inversion.sigma_inject) == pytest.approx(sigma_l(600), abs=1e-6)
    assert float(inversion.sigma_target) == pytest.approx(sigma_l(500), abs=1e-6)
    assert inversion.sigma_target > inversion.sigma_inject  # toward more noise
    assert inversion.weight == pytest.approx(0.3 + 400 * (0.01 - 0.3) / 999, abs=1e-6)


def test_inversion_mid_floor_is_one():
    settings = SRPOSettings(timestep_length=20, groundtruth_ratio=0.5)
    # k = min(int(0.5·20) + 1, 20 − 5, 5) = 5 → m ← max(5 − 5, 1) = 1
    _, inversion = plan_branches(5, settings)
    assert inversion.mid == 1
    assert (inversion.t_base, inversion.t_start) == (19, 14)


def test_direct_align_exact_velocity_recovers_x0():
    x0, noise = torch.tensor([0.7, -0.2, 1.1]), torch.tensor([-1.0, 0.5, 2.0])
    for branch in plan_branches(321, SRPOSettings()):
        x0_hat = direct_align(
            lambda x, s: noise - x0, x0, noise, branch.sigma_inject, branch.sigma_target
        )
        torch.testing.assert_close(x0_hat, x0)


def test_direct_align_by_hand():
    s, t = torch.tensor(0.8), torch.tensor(0.6)
    x0, noise = torch.tensor([1.0]), torch.tensor([2.0])
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return torch.full_like(x, 0.5)

    # x = .8·2 + .2·1 = 1.8; x' = 1.8 + (.6 − .8)·.5 = 1.7; x̂₀ = (1.7 − .6·2) / .4 = 1.25
    out = direct_align(velocity, x0, noise, s, t)
    torch.testing.assert_close(out, torch.tensor([1.25]))
    assert seen == [pytest.approx(0.8)]


def test_direct_align_per_row_levels_by_hand():
    """Two branches in one model call: each row at its own levels, the model called once with
    one σ per row."""
    x0 = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    noise = torch.tensor([[2.0, 2.0]])  # shared by the rows, as the rollout's ε is
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return torch.full_like(x, 0.5)

    inject, target = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.75])
    out = direct_align(velocity, x0, noise, inject, target)
    # row 0 as in test_direct_align_by_hand: 1.25
    # row 1: x = .5·2 + .5·(0, 2) = (1, 2); x' = x + .25·.5 = (1.125, 2.125);
    #        x̂₀ = (x' − .75·2) / .25 = (−1.5, 2.5)
    torch.testing.assert_close(out, torch.tensor([[1.25, 1.25], [-1.5, 2.5]]))
    assert seen == [[pytest.approx(0.8), pytest.approx(0.5)]]


def test_direct_align_rows_equal_one_branch_at_a_time():
    """Batching the branches changes nothing in a row's arithmetic (a row-wise model)."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=generator), torch.randn(1, 3, 4, generator=generator)
    weight = torch.randn(4, 4, generator=generator)

    def velocity(x, sigma):
        levels = torch.tensor(sigma if isinstance(sigma, list) else [sigma] * len(x))
        return x @ weight * levels.reshape(-1, 1, 1)

    branches = plan_branches(400, SRPOSettings())
    together = direct_align(
        velocity,
        x0,
        noise,
        torch.stack([b.sigma_inject for b in branches]),
        torch.stack([b.sigma_target for b in branches]),
    )
    for row, branch in enumerate(branches):
        alone = direct_align(
            velocity, x0[row : row + 1], noise, branch.sigma_inject, branch.sigma_target
        )
        torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-6, atol=1e-7)


def test_control_prompts_cycle_with_step():
    settings = SRPOSettings()
    assert control_prompts("a cat", 1, settings) == ("Detail. a cat", "Painting. a cat")
    assert control_prompts("a cat", 0, settings) == (
        "Natural-lighting. a cat",
        "Concept art. a cat",
    )
    assert control_prompts("x", 5, settings) == ("Detail. x", "Concept art. x")
    assert control_prompts("x", 7, settings) == ("Real. x", "Anime. x")


def test_srpo_losses_threshold_prompts_and_weights():
    settings = SRPOSettings()
    calls = []

    def reward(image, positive, negative, weight):
        calls.append((positive, negative, weight))
        return torch.tensor([0.5, 0.9]) if len(calls) == 1 else torch.tensor([0.2, 0.4])

    x0 = torch.zeros(2, 4)
    losses = srpo_losses(
        lambda x, s: torch.zeros_like(x),
        lambda latents: latents,
        reward,
        x0,
        torch.ones(2, 4),
        mid=500,
        step=1,
        caption="a cat",
        settings=settings,
    )
    # denoise: mean(relu(.7 − .5), relu(.7 − .9)) / 2 = (.2 + 0) / 2 / 2 = 0.05
    assert float(losses["denoise"]) == pytest.approx(0.05)
    # inversion: mean(.5, .3) / 2 = 0.2
    assert float(losses["inversion"]) == pytest.approx(0.2)
    assert set(losses) == {"denoise", "inversion"}
    assert calls[0][:2] == ("Detail. a cat", "Painting. a cat")
    assert calls[1][:2] == ("Painting. a cat", "Detail. a cat")  # roles swap
    assert calls[0][2] == pytest.approx(0.1 + 500 * 0.15 / 999, abs=1e-6)
    assert calls[1][2] == pytest.approx(0.3 + 400 * (0.01 - 0.3) / 999, abs=1e-6)


def test_srpo_losses_are_differentiable_in_the_model():
    scale = torch.tensor(0.3, requires_grad=True)
    x0, noise = torch.full((1, 4), 0.2), torch.full((1, 4), -0.4)
    losses = srpo_losses(
        lambda x, s: scale * x,
        torch.sigmoid,
        lambda image, p, n, w: image.mean(dim=1) * (1 + w) - 1.0,
        x0,
        noise,
        mid=250,
        step=3,
        caption="c",
        settings=SRPOSettings(),
    )
    (grad,) = torch.autograd.grad(losses["denoise"] + losses["inversion"], scale)
    assert torch.isfinite(grad) and grad != 0


def test_draw_mid_range():
    settings = SRPOSettings(timestep_length=12)
    rng = random.Random(0)
    draws = {draw_mid(rng, settings) for _ in range(500)}
    assert draws == {5, 6, 7}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestep_length", 0),
        ("timestep_length", 10),
        ("train_timestep", (25, 5)),
        ("train_timestep", (5, 50)),
        ("train_timestep", (5,)),
        ("schedule_steps", -1),
        ("shift", 0.0),
        ("groundtruth_ratio", 1.5),
        ("discount_pos", "ab"),
        ("reward_threshold", "high"),
        ("positive_words", []),
        ("negative_words", ["ok", ""]),
    ],
)
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SRPOSettings\.{field}"):
        SRPOSettings(**{field: value})


def test_settings_accept_lists_from_yaml():
    settings = SRPOSettings(train_timestep=[5, 30], discount_pos=[0.1, 0.5])
    assert settings.train_timestep == (5, 30)
    assert settings.discount_pos == (0.1, 0.5)
