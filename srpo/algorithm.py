"""The SRPO math of SPEC §3: sigma schedule, Euler rollout, Direct-Align branches, SRP loss.

Pure tensor code: no I/O, no models, no distributed calls. Models enter only as the three
callables `velocity`, `decode` and `reward`, so every formula here can be pinned by tests with
hand-computed values.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from srpo.runtime.callables import Decode, RewardFn, Velocity
from srpo.settings import MID_MARGIN, SRPOSettings


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """σ_i = s·t / (1 + (s − 1)·t) with t = 1 − i/N, i = 0..N (SD3 time shift), float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
    return shift * t / (1 + (shift - 1) * t)


def euler_rollout(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the flow from σ₀ to σ_N: x ← x + (σ_{i+1} − σ_i)·velocity(x, σ_i)."""
    x = noise
    for i in range(len(sigmas) - 1):
        step = (sigmas[i + 1] - sigmas[i]).to(x.dtype)
        x = x + step * velocity(x, float(sigmas[i]))
    return x


def training_sigmas(settings: SRPOSettings) -> torch.Tensor:
    """σ_l = linspace(σ⁽⁵⁰⁾[a], σ⁽⁵⁰⁾[b], T): the continuous range the branches are drawn from."""
    coarse = sigma_schedule(settings.schedule_steps, settings.shift)
    start, end = settings.train_timestep
    return torch.linspace(
        float(coarse[start]), float(coarse[end]), settings.timestep_length, dtype=torch.float32
    )


def draw_mid(rng: random.Random, settings: SRPOSettings) -> int:
    """The per-sample mid index m, uniform in [5, T − 5] (both ends included)."""
    return rng.randint(MID_MARGIN, settings.timestep_length - MID_MARGIN)


def groundtruth_span(mid: int, settings: SRPOSettings) -> int:
    """k = min(int((1 − ratio)·T) + 1, T − m, m), in floating point as written (100 for paper)."""
    length = settings.timestep_length
    return min(int((1 - settings.groundtruth_ratio) * length) + 1, length - mid, mid)


class Branch(NamedTuple):
    """One Direct-Align branch: inject ε at sigma_inject, one model step to sigma_target."""

    name: str
    mid: int
    t_start: int
    t_base: int
    sigma_inject: torch.Tensor
    sigma_target: torch.Tensor
    weight: float
    positive_first: bool


def plan_branches(mid: int, settings: SRPOSettings) -> tuple[Branch, Branch]:
    """The denoise branch (run first) and the inversion branch for one sample (SPEC §3 step 3)."""
    length = settings.timestep_length
    if not MID_MARGIN <= mid <= length - MID_MARGIN:
        raise ValueError(f"mid: expected {MID_MARGIN} <= mid <= {length - MID_MARGIN}, got {mid}")
    sigmas = training_sigmas(settings)
    k = groundtruth_span(mid, settings)
    pos_weights = torch.linspace(*settings.discount_pos, length, dtype=torch.float32)
    inv_weights = torch.linspace(*settings.discount_inv, length, dtype=torch.float32)

    t_base, t_start = length - mid, length - min(mid + k, length)
    denoise = Branch(
        "denoise", mid, t_start, t_base, sigmas[t_start], sigmas[t_base],
        float(pos_weights[mid]), positive_first=True,
    )  # fmt: skip
    inv_mid = max(mid - k, 1)
    t_base, t_start = length - inv_mid, length - min(inv_mid + k, length)
    inversion = Branch(
        "inversion", inv_mid, t_start, t_base, sigmas[t_base], sigmas[t_start],
        float(inv_weights[inv_mid]), positive_first=False,
    )  # fmt: skip
    return denoise, inversion


def direct_align(
    velocity: Velocity,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma_inject: torch.Tensor,
    sigma_target: torch.Tensor,
) -> torch.Tensor:
    """Inject the known noise, take one model step, recover x̂₀ in one shot.

    x = σ_in·ε + (1 − σ_in)·x₀;  x' = x + (σ_out − σ_in)·v(x, σ_in);
    x̂₀ = (x' − σ_out·ε) / (1 − σ_out).

    The sigmas are either scalars (every row of x₀ at the same levels) or one per row, so that
    several branches, each with its own levels, take their model step in one call: every row's
    arithmetic is the same as alone, only the model sees a larger batch. Per-row sigmas join
    x₀ on its device (a 0-dim tensor mixes with any device, a 1-D one does not).
    """
    if sigma_inject.dim() == 0:
        sigma = float(sigma_inject)
    else:
        sigma = [float(s) for s in sigma_inject]
        rows = (-1,) + (1,) * (x0.dim() - 1)
        sigma_inject = sigma_inject.to(x0.device).reshape(rows)
        sigma_target = sigma_target.to(x0.device).reshape(rows)
    x = sigma_inject * noise + (1 - sigma_inject) * x0
    x_next = x + (sigma_target - sigma_inject) * velocity(x, sigma)
    return (x_next - sigma_target * noise) / (1 - sigma_target)


def control_prompts(caption: str, step: int, settings: SRPOSettings) -> tuple[str, str]:
    """("<positive word>. caption", "<negative word>. caption") for the global step (from 1)."""
    positive = settings.positive_words[step % len(settings.positive_words)]
    negative = settings.negative_words[step % len(settings.negative_words)]
    return f"{positive}. {caption}", f"{negative}. {caption}"


class BranchOutput(NamedTuple):
    loss: torch.Tensor
    reward: torch.Tensor


def branch_reward_loss(
    branch: Branch,
    decode: Decode,
    reward: RewardFn,
    x0_hat: torch.Tensor,
    prompts: tuple[str, str],
    settings: SRPOSettings,
) -> BranchOutput:
    """relu(threshold − r) / 2 of a branch's recovered x̂₀; the inversion branch swaps the
    prompts' roles."""
    image = decode(x0_hat)
    positive, negative = prompts if branch.positive_first else prompts[::-1]
    rewards = reward(image, positive, negative, branch.weight)
    loss = torch.relu(settings.reward_threshold - rewards).mean() / 2
    return BranchOutput(loss, rewards)


def srpo_losses(
    velocity: Velocity,
    decode: Decode,
    reward: RewardFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    mid: int,
    step: int,
    caption: str,
    settings: SRPOSettings,
) -> dict[str, torch.Tensor]:
    """Both Direct-Align branches of one sample: {"denoise": loss, "inversion": loss}.

    Each loss is already divided by 2 (the two branches accumulate into one update). This is
    the reference computation, one branch after the other; the trainer computes the same
    losses with the model steps of several branches batched (`direct_align` per row).
    """
    prompts = control_prompts(caption, step, settings)
    losses = {}
    for branch in plan_branches(mid, settings):
        x0_hat = direct_align(velocity, x0, noise, branch.sigma_inject, branch.sigma_target)
        losses[branch.name] = branch_reward_loss(
            branch, decode, reward, x0_hat, prompts, settings
        ).loss
    return losses
