"""The baseline: one SRPO step as the authors' published FLUX script runs it, written by us.

What it does the way their recipe does (github.com/Tencent-Hunyuan/SRPO, fastvideo/SRPO.py and
utils/fsdp_util.py), and ours does not:
- FSDP1 `FullyShardedDataParallel`, FULL_SHARD, one wrap per FLUX block, fp32 parameters and
  `torch.autocast(bf16)` around every transformer and VAE call (no autocast on the CPU, where bf16
  is slower), fp16 autocast around the reward;
- non-reentrant `checkpoint_wrapper` on every block;
- `torch.autograd.set_detect_anomaly(True)` for the whole run (switchable, for variant (c));
- the VAE is not frozen (its weight gradients are computed, never used) and decodes whole;
- one rollout per sample (their `batch_size = 1` chunks), `transformer.eval()` / `.train()`
  around it;
- the reward's two control prompts are tokenised and encoded again in every branch.
Text conditioning comes precomputed from the same cache as ours (their data loader reads
precomputed T5/CLIP embeddings too). The prompts, noise, mid indices and formulas are the same
as ours, so both compute the same loss (tests/unit/test_bench.py checks it).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torchvision import transforms

from srpo.algorithm import sigma_schedule
from srpo.config import TrainConfig
from srpo.encode import EmbeddingCache
from srpo.flux import LatentGeometry, load_transformer, load_vae, vae_scale_factor
from srpo.rewards import load_reward
from srpo.rewards.base import CLIP_MEAN, CLIP_STD
from srpo.runtime.attention import DISABLE_ENV, FUSED, configure_attention
from srpo.runtime.distributed import DistributedContext
from srpo.train.data import batch_prompt_numbers, sample_mid, step_noise
from srpo.train.step import StepStats
from srpo.train.timing import PhaseTimer

BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)


class LiteralTrainer:
    """The authors' step on our inputs; `train_step` returns the same keys as ours."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext, anomaly: bool) -> None:
        torch.autograd.set_detect_anomaly(anomaly)
        if DISABLE_ENV not in os.environ:
            # On an H200 with torch 2.11 this recipe's first step died with an illegal memory
            # access, and ran with the unfused attention kernel (benchmarks/README.md).
            configure_attention(ctx.device, {DISABLE_ENV: ",".join(FUSED)})
        self.config, self.ctx = config, ctx
        self.local_batch = config.batch_size // ctx.world_size
        self.cache = EmbeddingCache(config.embeddings)
        self.pool = list(range(len(self.cache)))
        self.settings = config.settings()
        device = ctx.device
        self.autocast = config.precision != "fp32"
        self.vae = load_vae(config.base_model).to(device)  # not frozen, as theirs
        self.geometry = LatentGeometry(config.height, config.width, vae_scale_factor(self.vae))
        reward = load_reward(config.reward.kind, **config.reward.load_arguments()).to(device)
        self.clip, self.tokenizer = reward.model, reward.tokenizer
        self.preprocess = transforms.Compose(
            [
                transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(224),
                transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            ]
        )
        transformer = load_transformer(config.base_model).to(device)
        self.model = FullyShardedDataParallel(
            transformer,
            auto_wrap_policy=ModuleWrapPolicy(set(BLOCKS)),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=device,
            limit_all_gathers=True,
        )
        if config.activation_checkpointing:
            wrapper = functools.partial(
                checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
            )
            apply_activation_checkpointing(
                self.model,
                checkpoint_wrapper_fn=wrapper,
                check_fn=lambda module: isinstance(module, BLOCKS),
            )
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=optim.learning_rate,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            eps=optim.eps,
        )
        self.timer = PhaseTimer(device)
        self.step = 0

    def _cast(self, dtype: torch.dtype):
        if not self.autocast:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def _transformer(self, latents, sigma, guidance, embeds, pooled, text_ids, image_ids):
        timestep = torch.full([embeds.shape[0]], int(sigma * 1000), device=latents.device)
        with self._cast(torch.bfloat16):
            return self.model(
                hidden_states=latents,
                encoder_hidden_states=embeds,
                timestep=timestep / 1000,
                guidance=torch.tensor([guidance], device=latents.device),
                txt_ids=text_ids,
                pooled_projections=pooled,
                img_ids=image_ids,
                return_dict=False,
            )[0].float()

    def _reward(self, prompt: str, negative: str, image: torch.Tensor, weight) -> torch.Tensor:
        """Their `SRP_cfg`: image and both texts encoded, (1 + w)·p − n, under fp16 autocast."""
        pixels = self.preprocess(image.squeeze(0)).unsqueeze(0)
        device = pixels.device
        with self._cast(torch.float16):
            image_features = self.clip.encode_image(pixels, normalize=True)
            text = self.clip.encode_text(self.tokenizer([prompt]).to(device), normalize=True)
            neg = self.clip.encode_text(self.tokenizer([negative]).to(device), normalize=True)
            logits = image_features @ ((1 + weight) * text.T - neg.T)
        return torch.diagonal(logits)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._cast(torch.bfloat16):
            latents = self.geometry.unpack(latents) / 0.3611 + 0.1159
            image = self.vae.decode(latents, return_dict=False)[0]
            return (image.float() / 2 + 0.5).clamp(0, 1)

    def _sample(self, row, cond, noise, image_ids, stats) -> None:
        config, settings, timer = self.config, self.settings, self.timer
        length = settings.timestep_length
        embeds = cond.prompt_embeds[row : row + 1]
        pooled = cond.pooled_prompt_embeds[row : row + 1]
        rollout_sigmas = sigma_schedule(config.rollout_steps, settings.shift)
        self.model.eval()
        with torch.no_grad(), timer.phase("rollout"):
            latent_start = noise
            for i in range(config.rollout_steps):
                pred = self._transformer(
                    latent_start, float(rollout_sigmas[i]), config.rollout_guidance,
                    embeds, pooled, cond.text_ids, image_ids,
                )  # fmt: skip
                latent_start = latent_start + (rollout_sigmas[i + 1] - rollout_sigmas[i]) * pred
        sample = self.ctx.rank * self.local_batch + row
        mid = sample_mid(config.seed, self.step, sample, settings)
        caption = cond.captions[row]
        positive, negative = settings.positive_words, settings.negative_words
        pos_caption = f"{positive[self.step % len(positive)]}. {caption}"
        neg_caption = f"{negative[self.step % len(negative)]}. {caption}"
        discount = torch.linspace(*settings.discount_pos, length)
        discount_inversion = torch.linspace(*settings.discount_inv, length)
        coarse = sigma_schedule(settings.schedule_steps, settings.shift)
        sigmas_l = torch.linspace(
            float(coarse[settings.train_timestep[0]]),
            float(coarse[settings.train_timestep[1]]),
            length,
        )
        k = int((1 - settings.groundtruth_ratio) * length) + 1
        k = min(min(length - mid, k), mid)
        for inversion in (1, 0):  # their reversed(range(2)): the denoise branch first
            mid_timestep = mid if inversion else max(mid - k, 1)
            t_base = length - mid_timestep
            t_start = length - min(mid_timestep + k, length)
            if inversion:
                sigma, sigma_target = sigmas_l[t_start], sigmas_l[t_base]
            else:
                sigma, sigma_target = sigmas_l[t_base], sigmas_l[t_start]
            latents = (sigma * noise + (1.0 - sigma) * latent_start).detach()
            self.model.train()
            with timer.phase("branch_forward"):
                pred = self._transformer(
                    latents, float(sigma), config.train_guidance,
                    embeds, pooled, cond.text_ids, image_ids,
                )  # fmt: skip
            latents = latents + (sigma_target - sigma) * pred
            latents = (latents - sigma_target * noise) / (1 - sigma_target)
            with timer.phase("vae_decode"):
                image = self._decode(latents)
            with timer.phase("reward"):
                if inversion:
                    reward = self._reward(pos_caption, neg_caption, image, discount[mid_timestep])
                else:
                    weight = discount_inversion[mid_timestep]
                    reward = self._reward(neg_caption, pos_caption, image, weight)
            loss = (torch.relu(settings.reward_threshold - reward) / 2).mean()
            with timer.phase("backward"):
                (loss / self.local_batch).backward()
            name = "denoise" if inversion else "inversion"
            stats.add(f"loss/{name}", float(loss.detach()))
            stats.add(f"reward/{name}", float(reward.detach().mean()))

    def train_step(self) -> dict[str, float]:
        self.step += 1
        config, device = self.config, self.ctx.device
        first = self.ctx.rank * self.local_batch
        numbers = batch_prompt_numbers(config.seed, self.step, config.batch_size, self.pool)
        cond = self.cache.get(numbers[first : first + self.local_batch]).to(device, torch.float32)
        noise = step_noise(config.seed, self.step, self.geometry.token_shape(1)).to(device)
        image_ids = self.geometry.image_ids(device, torch.float32)
        stats = StepStats()
        for row in range(self.local_batch):
            self._sample(row, cond, noise, image_ids, stats)
        with self.timer.phase("optimizer"):
            grad_norm = self.model.clip_grad_norm_(config.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        means = stats.reduce(config.batch_size, device)
        means["grad_norm"] = float(grad_norm)
        means.update({f"time/{name}_s": seconds for name, seconds in self.timer.take().items()})
        return means
