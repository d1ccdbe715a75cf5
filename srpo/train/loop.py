"""The SRPO trainer: one step = shared-noise rollout + two Direct-Align branches + AdamW.

The global batch of B prompts is the unit. Rank r of W handles samples r·B/W … (r+1)·B/W − 1;
each local loss is divided by B/W and FSDP2 averages gradients over the W ranks, so the update
is the mean over the B samples whatever W is (SPEC §3, "Batch 32 means 32 samples").
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NamedTuple

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from torch.distributed.tensor import DTensor

from srpo.algorithm import (
    Branch,
    branch_reward_loss,
    control_prompts,
    direct_align,
    euler_rollout,
    plan_branches,
    sigma_schedule,
)
from srpo.config import TrainConfig, resume_mismatch
from srpo.encode import Conditioning, EmbeddingCache
from srpo.flux import FrozenVAE, LatentGeometry, load_transformer, load_vae, make_velocity
from srpo.flux import vae_scale_factor as scale_of
from srpo.io import InputError, provenance
from srpo.rewards import load_reward
from srpo.train.checkpoint import Checkpointer, TrainingState, ensure_export, step_of
from srpo.train.data import (
    batch_prompt_numbers,
    derive_seed,
    load_image,
    offline_images,
    sample_mid,
    step_noise,
)
from srpo.train.evaluate import HeldOutEvaluator, HeldOutWatch, RewardHacking
from srpo.train.lora import add_lora
from srpo.train.parallel import (
    DTYPES,
    DistributedContext,
    kept_gathered,
    load_full_state,
    shard_transformer,
)
from srpo.train.precision import POLICIES, under_autocast
from srpo.train.timing import PhaseTimer

EXIT_PREEMPTED = 75
"""Exit status after a SIGTERM / SIGUSR1 stop: the step finished and a checkpoint was written
if it fitted in `stop_grace_s`; run the same command again to resume (EX_TEMPFAIL)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_DIVERGED = 3
"""Exit status after `max_bad_steps` updates in a row were skipped for a NaN/Inf."""
FORCE_NONFINITE_ENV = "SRPO_FORCE_NONFINITE"
"""Test hook: `STEP[@RANK],…` makes the loss NaN at those steps (on RANK only, if given), so
the tests can drive the numerical guard through the real step."""


class TrainingDiverged(RuntimeError):
    """Too many updates in a row had a NaN/Inf loss or gradient; nothing after them was saved."""


def forced_nonfinite_steps(rank: int, spec: str | None = None) -> frozenset[int]:
    """The steps at which FORCE_NONFINITE_ENV poisons this rank's loss."""
    spec = os.environ.get(FORCE_NONFINITE_ENV, "") if spec is None else spec
    steps = set()
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        step, _, only_rank = entry.partition("@")
        if not only_rank or int(only_rank) == rank:
            steps.add(int(step))
    return frozenset(steps)


class StopRequested:
    """Remembers a stop signal; the loop acts on it only between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.received_at: float | None = None
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal = number
        if self.received_at is None:
            self.received_at = time.monotonic()

    def seconds_left(self, grace: float) -> float:
        """Of the `grace` seconds the launcher waits after the signal before SIGKILL."""
        if self.received_at is None:
            return grace
        return grace - (time.monotonic() - self.received_at)


class BranchCall(NamedTuple):
    """Branches of local sample `row` that take their model step in one transformer call."""

    row: int
    branches: Sequence[Branch]
    prompts: tuple[str, str]


@dataclass
class StepStats:
    """Sums over this rank's samples; `reduce` turns them into global means."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values[name] = self.values.get(name, 0.0) + value

    def reduce(self, samples: int, device: torch.device) -> dict[str, float]:
        names = sorted(self.values)
        totals = torch.tensor([self.values[n] for n in names], device=device, dtype=torch.float64)
        dist.all_reduce(totals)
        return {name: float(total) / samples for name, total in zip(names, totals, strict=True)}


def sharded_transformer(
    config: TrainConfig, ctx: DistributedContext, param_dtype: torch.dtype | None
) -> FluxTransformer2DModel:
    """The FSDP2-sharded transformer (with `lora` adapters), built on the meta device and
    filled from rank 0's fp32 copy: a rank holds its shards only, and only rank 0 the host copy.
    """
    seed = derive_seed(config.seed, "lora")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(config.base_model, subfolder="transformer")
        )
    if config.lora is not None:
        add_lora(model, config.lora, seed)
    full_state = None
    if ctx.is_main:
        source = load_transformer(config.base_model)
        if config.lora is not None:
            add_lora(source, config.lora, seed)
        full_state = source.state_dict()
    shard_transformer(model, ctx.mesh(), param_dtype, config.activation_checkpointing)
    load_full_state(model, full_state, ctx.device)
    return model


class Trainer:
    """Builds models, optimizer and checkpointer for one run and trains it to `max_steps`."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext) -> None:
        if config.batch_size % ctx.world_size:
            raise InputError(
                f"batch_size: {config.batch_size} prompts cannot be split evenly over "
                f"{ctx.world_size} processes"
            )
        self.config = config
        self.ctx = ctx
        self.settings = config.settings()
        self.local_batch = config.batch_size // ctx.world_size
        self.output_dir = Path(config.output_dir)
        self.cache = EmbeddingCache(Path(config.embeddings))
        self.pool = list(range(len(self.cache)))
        self.images: dict[int, Path] = {}
        if config.mode == "offline":
            if not config.offline_images:
                raise InputError("offline_images: required when mode is 'offline'")
            self.images = offline_images(Path(config.offline_images), len(self.cache))
            self.pool = sorted(self.images)

        self.precision = POLICIES[config.precision]
        device = ctx.device
        vae = load_vae(config.base_model, dtype=self.precision.vae_dtype).to(device)
        self.geometry = LatentGeometry(config.height, config.width, scale_of(vae))
        self.vae = FrozenVAE(vae, self.geometry)
        self.vae.configure_memory(config.vae_tiling, config.vae_slicing)
        self.reward = load_reward(config.reward.kind, **config.reward.load_arguments()).to(device)
        self.model = sharded_transformer(config, ctx, self.precision.fsdp_param_dtype)
        self.guidance_embeds = bool(self.model.config.guidance_embeds)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=optim.learning_rate,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            eps=optim.eps,
            fused=optim.fused,
        )
        self.state = TrainingState(self.model, self.optimizer)
        self.checkpointer = Checkpointer(
            self.output_dir / "checkpoints", config.keep_last, ctx.rank
        )
        self.timer = PhaseTimer(device)
        self.step = 0
        self.bad_in_row = 0
        self.last_save_s: float | None = None
        self.poisoned_steps = forced_nonfinite_steps(ctx.rank)
        self._provenance: dict | None = None

    # ----------------------------------------------------------------- state
    def train_state(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.step * self.config.batch_size,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "world_size": self.ctx.world_size,
            "bad_in_row": self.bad_in_row,
            "lora": self.config.lora.model_dump(mode="json") if self.config.lora else None,
        }

    def resume(self, checkpoint: Path | None = None) -> Path | None:
        """Load `checkpoint`, or the newest complete one of this run; None if there is none."""
        path = checkpoint or self.ctx.from_main(self.checkpointer.latest())
        if path is None:
            return None
        saved, current = self.checkpointer.train_state(path), self.train_state()
        mismatch = next(
            ((key, saved.get(key), current[key]) for key in ("batch_size", "seed", "lora")
             if saved.get(key) != current[key]),
            resume_mismatch(self.checkpointer.run_config(path), self.config.to_dict()),
        )  # fmt: skip
        if mismatch is not None:
            key, was, now = mismatch
            raise InputError(
                f"{path}: checkpoint was written with {key}={was}, the config says {now}; resume"
                f" needs the same value (to train afresh, remove {self.checkpointer.root})"
            )
        saved = self.checkpointer.load(path, self.state)
        self.step = int(saved["step"])
        self.bad_in_row = int(saved.get("bad_in_row", 0))
        return path

    def provenance(self) -> dict:
        if self._provenance is None:
            base = Path(self.config.base_model)
            weights = {"embeddings": Path(self.config.embeddings)}
            if (base / "transformer").is_dir():
                weights["transformer"] = base / "transformer"
            for name, value in self.config.reward.weight_paths().items():
                if Path(value).exists():  # a hub id is named by the config itself
                    weights[f"reward_{name}"] = Path(value)
            self._provenance = provenance(self.config.to_dict(), weights)
        return self._provenance

    def save(self) -> Path:
        started = time.monotonic()
        path = self.checkpointer.save(
            self.step, self.state, self.train_state(), self.provenance() if self.ctx.is_main else {}
        )
        self.last_save_s = time.monotonic() - started
        return path

    def stop_save_fits(self, seconds_left: float) -> bool:
        """Whether a checkpoint written now would end before the launcher's SIGKILL, judged by
        the last save of this run (unknown before the first: then it is tried; a save cut
        short leaves the previous checkpoint the newest). The same verdict on every rank."""
        fits = self.last_save_s is None or self.last_save_s <= seconds_left
        return not self.ctx.any(not fits)

    # ------------------------------------------------------------------ step
    def _x0(
        self, samples: range, numbers: list[int], cond: Conditioning, noise: torch.Tensor
    ) -> torch.Tensor:
        """Clean latents the branches start from: rollout (online) or real images (offline).

        Offline, each sample is encoded on its own, its VAE posterior drawn from its own
        generator seeded by (step, sample) like its mid: x₀ does not depend on how many
        processes share the batch (a batched encode differs in the last bits)."""
        if self.config.mode == "offline":
            size = (self.config.height, self.config.width)
            x0 = [
                self.vae.encode(
                    load_image(self.images[number], *size)[None].to(self.ctx.device),
                    torch.Generator(self.ctx.device).manual_seed(
                        derive_seed(self.config.seed, "vae", self.step, sample)
                    ),
                )
                for sample, number in zip(samples, numbers, strict=True)
            ]
            return torch.cat(x0)
        velocity = make_velocity(
            self.model,
            self.geometry,
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            cond.text_ids,
            self.config.rollout_guidance,
            self.guidance_embeds,
        )
        velocity = under_autocast(velocity, self.precision.transformer_autocast, self.ctx.device)
        with torch.no_grad(), self.timer.phase("rollout"):
            sigmas = sigma_schedule(self.config.rollout_steps, self.settings.shift)
            return euler_rollout(velocity, noise.expand(len(numbers), -1, -1), sigmas)

    def _branches(
        self, samples: range, numbers: list[int], cond: Conditioning, noise: torch.Tensor
    ) -> StepStats:
        """Rollout of the local samples, then both branches of each, gradients accumulated.

        With `fuse_branches` the two branches of a sample take their model step in one
        transformer call of batch 2 (per sample, so that the arithmetic of a sample does not
        depend on how many share a rank); otherwise one call per branch. Either way each
        branch's decode and reward run alone and are backpropagated at once to its x̂₀ (the
        frozen VAE and reward hold no gradients), then one transformer backward takes the
        call's x̂₀ gradients: the memory of one branch's decode, the all-gathers of one forward
        and one backward per call.

        The parameters gathered for the rollout also serve the first call's forward under
        `gather_params: rollout` (freed before its decode: no gradient exists yet, so nothing
        is added to the rollout's peak) and, under `first_call`, its backward too, each block
        freed after its own backward: with one sample per rank, one all-gather per block for
        the whole step."""
        calls = []
        for row, sample in enumerate(samples):
            branches = plan_branches(
                sample_mid(self.config.seed, self.step, sample, self.settings), self.settings
            )
            prompts = control_prompts(cond.captions[row], self.step, self.settings)
            fused = [branches] if self.config.fuse_branches else [[b] for b in branches]
            calls.extend(BranchCall(row, call, prompts) for call in fused)
        stats = StepStats()
        scope = self.config.gather_params
        with ExitStack() as gathered:
            gathered.enter_context(kept_gathered(self.model, scope in ("rollout", "first_call")))
            x0 = self._x0(samples, numbers, cond, noise)
            first = self._branch_forward(calls[0], x0, cond, noise)
            if scope != "first_call":
                gathered.close()  # free the gathered parameters before the decode
            self._branch_backward(calls[0], first, stats)
        for call in calls[1:]:
            self._branch_backward(call, self._branch_forward(call, x0, cond, noise), stats)
        return stats

    def _branch_forward(
        self, call: BranchCall, x0: torch.Tensor, cond: Conditioning, noise: torch.Tensor
    ) -> torch.Tensor:
        """x̂₀ of each branch of `call` (a row each), from one transformer call."""
        rows = [call.row] * len(call.branches)
        velocity = make_velocity(
            self.model,
            self.geometry,
            cond.prompt_embeds[rows],
            cond.pooled_prompt_embeds[rows],
            cond.text_ids,
            self.config.train_guidance,
            self.guidance_embeds,
        )
        velocity = under_autocast(velocity, self.precision.transformer_autocast, self.ctx.device)
        inject = torch.stack([branch.sigma_inject for branch in call.branches])
        target = torch.stack([branch.sigma_target for branch in call.branches])
        with self.timer.phase("branch_forward"):
            return direct_align(velocity, x0[rows], noise, inject, target)

    def _branch_backward(self, call: BranchCall, x0_hat: torch.Tensor, stats: StepStats) -> None:
        """Each branch's loss and its backward to x̂₀, then the transformer's backward."""
        timer, precision, device = self.timer, self.precision, self.ctx.device
        decode = under_autocast(self.vae.decode, precision.vae_autocast, device)
        reward = under_autocast(
            self.reward.semantic_relative_reward, precision.reward_autocast, device
        )
        recovered = x0_hat.detach().requires_grad_()
        for index, branch in enumerate(call.branches):
            output = branch_reward_loss(
                branch,
                timer.wrap("vae_decode", decode),
                timer.wrap("reward", reward),
                recovered[index : index + 1],
                call.prompts,
                self.settings,
            )
            loss = output.loss
            if self.step in self.poisoned_steps:
                loss = loss * float("nan")
            with timer.phase("backward"):
                (loss / self.local_batch).backward()
            stats.add(f"loss/{branch.name}", float(loss.detach()))
            stats.add(f"reward/{branch.name}", float(output.reward.detach().mean()))
        with timer.phase("backward"):
            x0_hat.backward(recovered.grad)

    def train_step(self) -> dict[str, float]:
        """Advance self.step by one optimizer update; returns global means for logging (and
        this rank's seconds per phase under `time/`)."""
        self.step += 1
        config, device, timer = self.config, self.ctx.device, self.timer
        first = self.ctx.rank * self.local_batch
        samples = range(first, first + self.local_batch)
        batch = batch_prompt_numbers(config.seed, self.step, config.batch_size, self.pool)
        numbers = batch[first : first + self.local_batch]
        cond = self.cache.get(numbers).to(device, torch.float32)
        noise = step_noise(config.seed, self.step, self.geometry.token_shape(1)).to(device)
        step_wide = config.gather_params == "step"
        with kept_gathered(self.model, step_wide, through_backward=True):
            stats = self._branches(samples, numbers, cond, noise)
        means = stats.reduce(config.batch_size, device)
        with timer.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.optim.max_grad_norm)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            means["grad_norm"] = float(grad_norm)
            finite = all(math.isfinite(value) for value in means.values())
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        means["skipped"] = 0.0 if finite else 1.0
        self._guard(finite, batch, means)
        means.update({f"time/{name}_s": seconds for name, seconds in timer.take().items()})
        return means

    def _guard(self, finite: bool, batch: list[int], means: dict[str, float]) -> None:
        """After a NaN/Inf (the same verdict on every rank: `means` and the clipped norm are
        all-reduced), log the step and its prompts; stop after `max_bad_steps` in a row."""
        if finite:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        limit = self.config.max_bad_steps
        if self.ctx.is_main:
            values = ", ".join(f"{name}={value:.4g}" for name, value in sorted(means.items()))
            print(
                f"step {self.step}: non-finite loss or gradient ({values}); update skipped, "
                f"{self.bad_in_row} of max_bad_steps={limit} in a row; prompt numbers {batch}",
                file=sys.stderr,
                flush=True,
            )
        if self.bad_in_row >= limit:
            latest = self.checkpointer.latest()
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint exists"
            raise TrainingDiverged(
                f"training: steps {self.step - limit + 1}-{self.step} all had a non-finite loss "
                f"or gradient (max_bad_steps={limit}); stopped without saving, {kept}; lower "
                "optim.learning_rate or use precision: fp32, then resume"
            )


# ---------------------------------------------------------------------- entry
def held_out_watch(trainer: Trainer) -> HeldOutWatch:
    """The held-out evaluation of this run, with the trainer's own models and precision."""
    evaluator = HeldOutEvaluator(
        trainer.config.evaluation,
        trainer.ctx,
        trainer.reward,
        trainer.vae,
        trainer.geometry,
        trainer.precision,
        trainer.settings.shift,
        trainer.guidance_embeds,
    )
    return HeldOutWatch(evaluator, trainer.output_dir, trainer.step, trainer.config.max_steps)


def _stop_for_collapse(trainer: Trainer, reason: str) -> None:
    """`evaluation.collapse.stop`: checkpoint this step (unless just saved), then stop."""
    latest = trainer.checkpointer.latest()
    if trainer.ctx.from_main(latest is None or step_of(latest) != trainer.step):
        latest = trainer.save()
    raise RewardHacking(
        f"training: reward hacking suspected at step {trainer.step}: {reason}; stopped after "
        f"saving {latest} (evaluation.collapse.stop); inspect eval.csv and the samples, then "
        "resume with a smaller learning rate or another reward"
    )


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    export: Path | None
    stopped_by_signal: int | None


def _progress(enabled: bool, total: int, completed: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]SRPO"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    task = progress.add_task("train", total=total, completed=completed, metrics="")
    return progress, task


def train(config: TrainConfig, resume: bool = True, resume_from: Path | None = None) -> TrainResult:
    """Train to `config.max_steps`, resuming by itself; stop cleanly on SIGTERM / SIGUSR1."""
    stop = StopRequested()
    with DistributedContext.from_environment() as ctx:
        torch.manual_seed(derive_seed(config.seed, "init", ctx.rank))
        trainer = Trainer(config, ctx)
        resumed = trainer.resume(resume_from) if (resume or resume_from) else None
        if ctx.is_main and resumed is not None:
            print(f"resumed from {resumed} at step {trainer.step}", flush=True)
        writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(trainer.output_dir / "tensorboard"))
        watch = held_out_watch(trainer) if config.evaluation.every else None
        if watch is not None and watch.due(trainer.step):
            watch(trainer.model, trainer.step, writer)
        progress, task = _progress(ctx.is_main, config.max_steps, trainer.step)
        stopped: int | None = None
        with progress:
            while trainer.step < config.max_steps:
                started = time.perf_counter()
                metrics = trainer.train_step()
                elapsed = time.perf_counter() - started
                metrics["time/step_s"] = elapsed
                metrics["throughput/samples_per_s"] = config.batch_size / elapsed
                if writer is not None and trainer.step % config.log_every == 0:
                    for name, value in metrics.items():
                        writer.add_scalar(name, value, trainer.step)
                    writer.flush()
                summary = " ".join(
                    f"{name.split('/')[-1]}={metrics[name]:.4f}"
                    for name in ("reward/denoise", "reward/inversion", "grad_norm")
                )
                progress.update(task, completed=trainer.step, metrics=summary)
                if ctx.is_main and not progress.console.is_terminal:
                    line = f"step {trainer.step}/{config.max_steps} {summary} {elapsed:.2f}s"
                    print(line, flush=True)
                stop_now = ctx.any(stop.signal is not None)
                periodic = (
                    trainer.step % config.checkpoint_every == 0 or trainer.step == config.max_steps
                )
                if periodic or (
                    stop_now and trainer.stop_save_fits(stop.seconds_left(config.stop_grace_s))
                ):
                    trainer.save()
                elif stop_now and ctx.is_main:
                    print(
                        f"no checkpoint of step {trainer.step}: the last save took "
                        f"{trainer.last_save_s:.0f} s, more than is left of stop_grace_s="
                        f"{config.stop_grace_s:g}; resume from {trainer.checkpointer.latest()}",
                        file=sys.stderr,
                        flush=True,
                    )
                if stop_now:
                    stopped = stop.signal or signal.SIGTERM
                    break
                if watch is not None and watch.due(trainer.step):
                    reason = watch(trainer.model, trainer.step, writer)
                    if reason is not None and config.evaluation.collapse.stop:
                        _stop_for_collapse(trainer, reason)
        if writer is not None:
            writer.close()
        checkpoint = trainer.checkpointer.latest()
        ctx.barrier()
    export = None
    if stopped is None and checkpoint is not None and ctx.is_main:
        export = ensure_export(
            checkpoint,
            config.base_model,
            Path(config.output_dir) / "model",
            DTYPES[config.export_dtype],
        )
    return TrainResult(trainer.step, checkpoint, export, stopped)
