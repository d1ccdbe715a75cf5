"""One SRPO optimizer update: shared-noise rollout, two Direct-Align branches per sample, AdamW.

The global batch of B prompts is the unit. Rank r of W handles samples r·B/W … (r+1)·B/W − 1;
each local loss is divided by B/W and FSDP2 averages gradients over the W ranks, so the update
is the mean over the B samples whatever W is (SPEC §3, "Batch 32 means 32 samples").

When to step, save, evaluate and stop is the run driver's business (`srpo.train.run`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
from srpo.runtime.callables import Velocity
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.precision import POLICIES, under_autocast
from srpo.runtime.seeds import derive_seed
from srpo.train.checkpoint import Checkpointer, ModelOptimizerState
from srpo.train.data import (
    batch_prompt_numbers,
    load_image,
    offline_images,
    sample_mid,
    step_noise,
)
from srpo.train.lora import add_lora
from srpo.train.parallel import kept_gathered, load_full_state, shard_transformer
from srpo.train.timing import PhaseTimer


class BranchCall(NamedTuple):
    """Branches of local sample `row` that take their model step in one transformer call."""

    row: int
    branches: Sequence[Branch]
    prompts: tuple[str, str]


class StepBatch(NamedTuple):
    """What this rank trains on at one step."""

    samples: range
    """Positions of this rank's samples in the global batch."""
    numbers: list[int]
    """Their prompt numbers in the embedding cache."""
    cond: Conditioning
    noise: torch.Tensor
    """The step's shared rollout noise ε (one sample's shape)."""


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


class GatherScopes:
    """`gather_params`, in one place: how long each FSDP2 block keeps its all-gathered
    parameters within a step, instead of gathering them again for every forward and backward.

    - `step`: through every forward and backward of the step.
    - `first_call`: through the no-grad rollout and the first branch call's forward and
      backward, each block freed after its own backward: with one sample per rank, one
      all-gather per block for the whole step.
    - `rollout`: through the rollout and the first call's forward, freed before its decode (no
      gradient exists yet, so nothing is added to the rollout's peak).
    - `forward`: FSDP2's default, a gather per forward and per backward.
    """

    def __init__(self, model: torch.nn.Module, scope: str) -> None:
        self.model = model
        self.scope = scope

    def whole_step(self):
        """Around the whole step, forwards and backwards: a no-op unless the scope is `step`."""
        return kept_gathered(self.model, self.scope == "step", through_backward=True)

    @contextmanager
    def opening(self) -> Iterator[Callable[[], None]]:
        """Around the rollout and the first call; yields what to call before that call's
        backward (it frees the parameters unless they are kept through it)."""
        with ExitStack() as kept:
            kept.enter_context(kept_gathered(self.model, self.scope in ("rollout", "first_call")))
            yield kept.close if self.scope != "first_call" else (lambda: None)


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
    """The models, optimizer and checkpointer of one run, and its train step."""

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
        self._load_models()
        self.gather = GatherScopes(self.model, config.gather_params)
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
        self.state = ModelOptimizerState(self.model, self.optimizer)
        self.checkpointer = Checkpointer(
            self.output_dir / "checkpoints", config.keep_last, ctx.rank
        )
        self.timer = PhaseTimer(ctx.device)
        self.step = 0
        self.bad_in_row = 0
        self.prompt_numbers: list[int] = []
        self.last_save_s: float | None = None
        self._provenance: dict | None = None

    def _load_models(self) -> None:
        """The frozen VAE and reward on this rank's device, the sharded transformer."""
        config, device = self.config, self.ctx.device
        vae = load_vae(config.base_model, dtype=self.precision.vae_dtype).to(device)
        self.geometry = LatentGeometry(config.height, config.width, scale_of(vae))
        self.vae = FrozenVAE(vae, self.geometry)
        self.vae.configure_memory(config.vae_tiling, config.vae_slicing)
        self.reward = load_reward(config.reward.kind, **config.reward.load_arguments()).to(device)
        self.model = sharded_transformer(config, self.ctx, self.precision.fsdp_param_dtype)
        self.guidance_embeds = bool(self.model.config.guidance_embeds)

    # ----------------------------------------------------------------- state
    def run_counters(self) -> dict:
        """The counters a checkpoint stores beside the model and optimizer (train_state.json)."""
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
        saved, current = self.checkpointer.train_state(path), self.run_counters()
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
            self.step,
            self.state,
            self.run_counters(),
            self.provenance() if self.ctx.is_main else {},
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
    def train_step(self) -> dict[str, float]:
        """Advance self.step by one optimizer update; returns global means for logging (and
        this rank's seconds per phase under `time/`). A NaN/Inf loss or gradient skips the
        update: `skipped` is 1 and `bad_in_row` counts it."""
        self.step += 1
        batch = self._batch()
        with self.gather.whole_step():
            stats = self._branches(batch)
        means = stats.reduce(self.config.batch_size, self.ctx.device)
        with self.timer.phase("optimizer"):
            means["grad_norm"] = self._clipped_grad_norm()
            finite = all(math.isfinite(value) for value in means.values())
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        means["skipped"] = 0.0 if finite else 1.0
        self.bad_in_row = 0 if finite else self.bad_in_row + 1
        means.update({f"time/{name}_s": seconds for name, seconds in self.timer.take().items()})
        return means

    def _batch(self) -> StepBatch:
        """This rank's share of the step's global batch, on its device (the whole batch's
        prompt numbers stay in `prompt_numbers`)."""
        config, device = self.config, self.ctx.device
        first = self.ctx.rank * self.local_batch
        self.prompt_numbers = batch_prompt_numbers(
            config.seed, self.step, config.batch_size, self.pool
        )
        numbers = self.prompt_numbers[first : first + self.local_batch]
        return StepBatch(
            range(first, first + self.local_batch),
            numbers,
            self.cache.get(numbers).to(device, torch.float32),
            step_noise(config.seed, self.step, self.geometry.token_shape(1)).to(device),
        )

    def _clipped_grad_norm(self) -> float:
        """The global gradient norm before clipping; the same on every rank (all-reduced, so a
        NaN on one rank is everyone's)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.optim.max_grad_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        return float(grad_norm)

    def _calls(self, batch: StepBatch) -> list[BranchCall]:
        """The transformer calls of the branches: with `fuse_branches` the two branches of a
        sample take their model step in one call of batch 2 (per sample, so that a sample's
        arithmetic does not depend on how many share a rank); otherwise one call per branch."""
        calls = []
        for row, sample in enumerate(batch.samples):
            branches = plan_branches(
                sample_mid(self.config.seed, self.step, sample, self.settings), self.settings
            )
            prompts = control_prompts(batch.cond.captions[row], self.step, self.settings)
            fused = [branches] if self.config.fuse_branches else [[b] for b in branches]
            calls.extend(BranchCall(row, call, prompts) for call in fused)
        return calls

    def _branches(self, batch: StepBatch) -> StepStats:
        """Rollout of the local samples, then both branches of each, gradients accumulated.

        Each branch's decode and reward run alone and are backpropagated at once to its x̂₀
        (the frozen VAE and reward hold no gradients), then one transformer backward takes the
        call's x̂₀ gradients: the memory of one branch's decode, the all-gathers of one forward
        and one backward per call (fewer under `gather_params`, see GatherScopes)."""
        calls = self._calls(batch)
        stats = StepStats()
        with self.gather.opening() as before_first_backward:
            x0 = self._x0(batch)
            first = self._branch_forward(calls[0], x0, batch)
            before_first_backward()
            self._branch_backward(calls[0], first, stats)
        for call in calls[1:]:
            self._branch_backward(call, self._branch_forward(call, x0, batch), stats)
        return stats

    def _x0(self, batch: StepBatch) -> torch.Tensor:
        """Clean latents the branches start from: rollout (online) or real images (offline).

        Offline, each sample is encoded on its own, its VAE posterior drawn from its own
        generator seeded by (step, sample) like its mid: x₀ does not depend on how many
        processes share the batch (a batched encode differs in the last bits)."""
        config, device = self.config, self.ctx.device
        if config.mode == "offline":
            size = (config.height, config.width)
            x0 = [
                self.vae.encode(
                    load_image(self.images[number], *size)[None].to(device),
                    torch.Generator(device).manual_seed(
                        derive_seed(config.seed, "vae", self.step, sample)
                    ),
                )
                for sample, number in zip(batch.samples, batch.numbers, strict=True)
            ]
            return torch.cat(x0)
        velocity = self._velocity(batch.cond, config.rollout_guidance)
        with torch.no_grad(), self.timer.phase("rollout"):
            sigmas = sigma_schedule(config.rollout_steps, self.settings.shift)
            return euler_rollout(velocity, batch.noise.expand(len(batch.numbers), -1, -1), sigmas)

    def _velocity(
        self, cond: Conditioning, guidance: float, rows: list[int] | None = None
    ) -> Velocity:
        """The transformer as velocity(x, σ) for `cond` (its `rows`), under the policy."""
        embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
        if rows is not None:
            embeds, pooled = embeds[rows], pooled[rows]
        return make_velocity(
            self.model,
            self.geometry,
            embeds,
            pooled,
            cond.text_ids,
            guidance,
            self.guidance_embeds,
            self.precision.transformer_autocast,
        )

    def _branch_forward(self, call: BranchCall, x0: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x̂₀ of each branch of `call` (a row each), from one transformer call."""
        rows = [call.row] * len(call.branches)
        velocity = self._velocity(batch.cond, self.config.train_guidance, rows)
        inject = torch.stack([branch.sigma_inject for branch in call.branches])
        target = torch.stack([branch.sigma_target for branch in call.branches])
        with self.timer.phase("branch_forward"):
            return direct_align(velocity, x0[rows], batch.noise, inject, target)

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
            with timer.phase("backward"):
                (output.loss / self.local_batch).backward()
            stats.add(f"loss/{branch.name}", float(output.loss.detach()))
            stats.add(f"reward/{branch.name}", float(output.reward.detach().mean()))
        with timer.phase("backward"):
            x0_hat.backward(recovered.grad)
