"""Held-out evaluation during training, and the guard against reward hacking.

Every `evaluation.every` steps the trainer samples a fixed set of held-out prompts (each with
the same noise every time, so the curve follows the model, not the draw), rank-sharded, and
scores the images with metrics the run does not train on — the very `srpo score` metrics — and
with the training reward itself. The means go to TensorBoard (`eval/…`) and `eval.csv`.

Reward hacking has a signature: the training reward keeps rising while an independent judge of
the same images falls. `collapse_reason` names it when a watched metric has dropped more than its
margin below its best evaluation so far while the held-out training reward stands above its value
at that evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from diffusers.image_processor import VaeImageProcessor

from srpo.algorithm import euler_rollout, sigma_schedule
from srpo.config import EvaluationConfig
from srpo.encode import EmbeddingCache
from srpo.flux import FrozenVAE, LatentGeometry, make_velocity
from srpo.io import InputError, atomic_path
from srpo.rewards.base import Reward
from srpo.rewards.metric import load_metric
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.precision import PrecisionPolicy, under_autocast
from srpo.runtime.seeds import derive_seed
from srpo.train.parallel import kept_gathered

EVAL_CSV = "eval.csv"
REWARD_COLUMN = "train_reward"
EXIT_COLLAPSED = 4
"""Exit status when the collapse guard stops a run (`evaluation.collapse.stop`)."""


class RewardHacking(RuntimeError):
    """The collapse guard stopped the run; the message says which metric fell and by how much."""


@dataclass(frozen=True)
class Evaluation:
    """Means over the held-out images at one step."""

    step: int
    reward: float
    metrics: dict[str, float]

    def row(self, images: int) -> dict[str, float | int]:
        """A line of eval.csv: figures only, no timing, so a re-run writes the same bytes."""
        return {"step": self.step, REWARD_COLUMN: self.reward, **self.metrics, "images": images}


def collapse_reason(history: Sequence[Evaluation], margins: dict[str, float]) -> str | None:
    """Why the newest evaluation looks like reward hacking, or None.

    For each watched metric: its best earlier evaluation b; collapse when the newest value is
    more than `margin` below b's while the held-out training reward is above b's.
    """
    if len(history) < 2:
        return None
    now = history[-1]
    for name, margin in sorted(margins.items()):
        best = max(history[:-1], key=lambda evaluation: evaluation.metrics[name])
        drop = best.metrics[name] - now.metrics[name]
        if drop > margin and now.reward > best.reward:
            return (
                f"{name} fell from {best.metrics[name]:.4g} (step {best.step}) to "
                f"{now.metrics[name]:.4g} (step {now.step}), more than its margin {margin:g}, "
                f"while the held-out training reward rose from {best.reward:.4g} to "
                f"{now.reward:.4g}"
            )
    return None


class EvalLog:
    """`eval.csv` of one run: rewritten whole (atomically) after each evaluation; on resume,
    rows after the resumed step are dropped, since those steps are trained again."""

    def __init__(self, path: Path, resumed_step: int, metrics: Sequence[str]) -> None:
        self.path = Path(path)
        self.metrics = list(metrics)
        self.rows: list[dict] = []
        if self.path.is_file():
            frame = pd.read_csv(self.path)
            missing = {"step", REWARD_COLUMN, *self.metrics} - set(frame.columns)
            if missing:
                raise InputError(
                    f"{self.path}: lacks column(s) {sorted(missing)} of evaluation.metrics; "
                    "move it away to start a new log"
                )
            if resumed_step > 0:  # a fresh run starts a fresh log
                self.rows = frame[frame["step"] <= resumed_step].to_dict("records")

    @property
    def history(self) -> list[Evaluation]:
        return [
            Evaluation(
                int(row["step"]),
                float(row[REWARD_COLUMN]),
                {name: float(row[name]) for name in self.metrics},
            )
            for row in self.rows
        ]

    def has(self, step: int) -> bool:
        return any(int(row["step"]) == step for row in self.rows)

    def append(self, row: dict, write: bool = True) -> None:
        """Every rank keeps the rows (the guard's verdict must agree); one writes the file."""
        self.rows.append(row)
        if write:
            with atomic_path(self.path) as staged:
                pd.DataFrame(self.rows).to_csv(staged, index=False)


class HeldOutEvaluator:
    """Samples the held-out prompts with the model being trained and scores them (collective:
    every rank calls it; rank r takes prompts r, r + W, …, padded so that every rank runs the
    same forwards)."""

    def __init__(
        self,
        config: EvaluationConfig,
        ctx: DistributedContext,
        reward: Reward,
        vae: FrozenVAE,
        geometry: LatentGeometry,
        precision: PrecisionPolicy,
        shift: float,
        guidance_embeds: bool,
    ) -> None:
        self.config, self.ctx, self.reward = config, ctx, reward
        self.vae, self.geometry, self.precision = vae, geometry, precision
        self.guidance_embeds = guidance_embeds
        self.cache = EmbeddingCache(Path(config.embeddings))
        total = len(self.cache)
        self.total = min(total, config.max_prompts or total)
        self.numbers = list(range(ctx.rank, self.total, ctx.world_size))
        slots = math.ceil(self.total / ctx.world_size)
        self.padded = self.numbers + [0] * (slots - len(self.numbers))
        self.sigmas = sigma_schedule(config.steps, shift)
        self.metrics = {
            name: load_metric(name, ctx.device, torch.float32, config.batch_size, **paths)
            for name, paths in sorted(config.metrics.items())
        }

    def _noise(self, numbers: Sequence[int]) -> torch.Tensor:
        """Held-out prompt i gets the same noise at every evaluation, on any world size and in
        any batch."""
        return torch.cat(
            [
                torch.randn(
                    self.geometry.token_shape(1),
                    generator=torch.Generator().manual_seed(
                        derive_seed(self.config.seed, "eval", number)
                    ),
                )
                for number in numbers
            ]
        ).to(self.ctx.device)

    def _chunks(self) -> list[slice]:
        """The rank's slots, `batch_size` at a time: as many chunks on every rank (padded slots
        included), since each sharded forward of the rollout is collective."""
        size = self.config.batch_size
        return [slice(start, start + size) for start in range(0, len(self.padded), size)]

    def _rollout(self, model: torch.nn.Module, numbers: Sequence[int]) -> torch.Tensor:
        """Final latents of the held-out prompts `numbers`, sampled as one batch."""
        device = self.ctx.device
        cond = self.cache.get(numbers).to(device, torch.float32)
        velocity = make_velocity(
            model,
            self.geometry,
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            cond.text_ids,
            self.config.guidance,
            self.guidance_embeds,
            self.precision.transformer_autocast,
        )
        return euler_rollout(velocity, self._noise(numbers), self.sigmas)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> tuple[Evaluation, float]:
        """The evaluation of `model` at `step` (same on every rank) and its seconds.

        Sampled, decoded and scored `batch_size` prompts at a time, so memory does not grow
        with the held-out set; the parameters stay gathered across all the rollouts (one
        all-gather), and only the latents, which are small, wait for the decode.
        """
        started = time.perf_counter()
        device = self.ctx.device
        chunks = self._chunks()
        with kept_gathered(model):
            latents = [self._rollout(model, self.padded[chunk]) for chunk in chunks]
        decode = under_autocast(self.vae.decode, self.precision.vae_autocast, device)
        rewards: list[torch.Tensor] = []
        scores: dict[str, list[float]] = {name: [] for name in self.metrics}
        for chunk, chunk_latents in zip(chunks, latents, strict=True):
            numbers = self.numbers[chunk]  # the chunk's prompts; the padding is not scored
            if not numbers:
                continue
            images = decode(chunk_latents[: len(numbers)]).float()
            captions = [self.cache.prompts[number] for number in numbers]
            rewards.append(self.reward.score(images, captions))
            pictures = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.cpu()))
            for name, metric in self.metrics.items():
                scores[name].extend(metric.score(pictures, captions))
        # each sum taken once over the rank's images in prompt order, as over one batch
        sums = [float(torch.cat(rewards).sum()) if rewards else 0.0]
        sums.extend(float(sum(scores[name])) for name in self.metrics)
        totals = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        means = [float(total) / self.total for total in totals]
        metrics = dict(zip(self.metrics, means[1:], strict=True))
        return Evaluation(step, means[0], metrics), time.perf_counter() - started
