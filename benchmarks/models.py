"""Benchmark models, built offline in the real on-disk formats and cached by their spec.

The real-width transformer has FLUX.1-dev's exact block shapes (hidden 3072 = 24 heads × 128,
joint dim 4096, pooled 768, RoPE axes 16/56/56) but only a few blocks; its text encoders have the
real output widths (T5 4096, CLIP 768) and one layer each, since only their outputs (cached once)
reach the step. Everything is seeded, so each folder is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from benchmarks.suites import ModelSpec
from srpo.encode import encode_prompts
from srpo.hpd import BUNDLED
from srpo.io import atomic_path, write_json
from srpo.rewards import hpsv2
from srpo.rewards.open_clip_io import create_model, save_deterministic
from srpo.text_tokenizers import build_clip_tokenizer, build_t5_tokenizer
from srpo.tiny import (
    flux_scheduler,
    seeded,
    tiny_clip_text_encoder,
    tiny_t5_encoder,
    tiny_vae,
    vae_of_flux_layout,
)

PROMPTS = [row["prompt"] for row in json.loads((BUNDLED / "train.json").read_text())][:8]
"""The first training prompts of the bundled HPD set."""
REAL_WIDTH = {
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
TINY_WIDTH = {
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}


@dataclass(frozen=True)
class BenchModels:
    flux: Path  # diffusers FLUX folder
    reward_checkpoint: Path  # HPS_v2.1_compressed.pt layout
    reward_config: Path | None  # open_clip config of a non-built-in architecture
    embeddings: Path  # `srpo encode` cache of PROMPTS
    eval_prompts: Path  # .txt, one prompt per line


def transformer_config(spec: ModelSpec) -> dict:
    widths = REAL_WIDTH if spec.real_width else TINY_WIDTH
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": spec.double_blocks,
        "num_single_layers": spec.single_blocks,
        "guidance_embeds": True,
        **widths,
    }


def flux_vae(seed: int) -> AutoencoderKL:
    """FLUX.1-dev's VAE architecture (diffusers config of black-forest-labs/FLUX.1-dev)."""
    return vae_of_flux_layout(seed, (128, 256, 512, 512), 2, 32, 1024)


def _text_encoders(real_width: bool, seed: int, clip_vocab: int, t5_vocab: int):
    if not real_width:
        return tiny_clip_text_encoder(seed, clip_vocab), tiny_t5_encoder(seed, t5_vocab)
    clip = CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=768, intermediate_size=256, projection_dim=768,
        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
        hidden_act="quick_gelu",
    )  # fmt: skip
    t5 = T5Config(
        vocab_size=t5_vocab, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    with seeded(seed):
        return CLIPTextModel(clip), T5EncoderModel(t5)


def build_flux(spec: ModelSpec, out_dir: Path, seed: int = 0) -> Path:
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    text_encoder, text_encoder_2 = _text_encoders(
        spec.real_width, seed, len(tokenizer), len(tokenizer_2)
    )
    with seeded(seed):
        transformer = FluxTransformer2DModel(**transformer_config(spec))
    pipeline = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=flux_vae(seed) if spec.vae == "flux" else tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    with atomic_path(out_dir) as staged:
        pipeline.save_pretrained(staged, safe_serialization=True)
    return out_dir


def build_reward(kind: str, out_dir: Path, seed: int = 0) -> tuple[Path, Path | None]:
    """An HPSv2.1 checkpoint: the tiny layout, or ViT-H-14 at full size with random weights."""
    if kind == "tiny":
        hpsv2.build_tiny(out_dir, seed)
        return out_dir / hpsv2.CHECKPOINT_NAME, out_dir / hpsv2.CONFIG_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model("ViT-H-14")
    save_deterministic(out_dir / hpsv2.CHECKPOINT_NAME, {"state_dict": model.state_dict()})
    return out_dir / hpsv2.CHECKPOINT_NAME, None


def spec_key(spec: ModelSpec) -> str:
    text = json.dumps({**asdict(spec), "prompts": PROMPTS}, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def ensure_models(spec: ModelSpec, root: Path) -> BenchModels:
    """Build (once) and return the folders of `spec` under `root`; a finished build is reused."""
    folder = Path(root) / spec_key(spec)
    models = BenchModels(
        flux=folder / "flux",
        reward_checkpoint=folder / "reward" / hpsv2.CHECKPOINT_NAME,
        reward_config=None if spec.reward == "vit-h-14" else folder / "reward" / hpsv2.CONFIG_NAME,
        embeddings=folder / "embeddings" / "index.json",
        eval_prompts=folder / "eval.txt",
    )
    done = folder / "done.json"
    if done.is_file():
        return models
    folder.mkdir(parents=True, exist_ok=True)
    build_flux(spec, models.flux)
    build_reward(spec.reward, folder / "reward")
    prompts = folder / "train.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    models.eval_prompts.write_text("\n".join(reversed(PROMPTS)) + "\n")
    encode_prompts(str(models.flux), prompts, folder / "embeddings", spec.text_tokens, 8)
    write_json(done, asdict(spec))
    return models
