"""Tiny random models in the real layouts, built offline and byte-identical on every run.

Tests and the smoke workflow need a FLUX.1-dev folder (and reward models) that load through the
same code paths as the real ones, but no model hub is reachable: everything here is built from
code, seeded, and saved as safetensors, so a manifest of file hashes pins it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from srpo.io import InputError, atomic_path, file_hashes, package_versions, write_json
from srpo.scorers import MAIN, SCORERS, resolve
from srpo.text_tokenizers import build_clip_tokenizer, build_t5_tokenizer

HIDDEN = 32
"""Width of both text encoders, hence the transformer's joint and pooled projection sizes."""
MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "open_clip_torch")
"""Distributions whose versions decide the bytes written, recorded beside the hashes."""


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for one component without disturbing the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_transformer(seed: int) -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer at minimal width: one double and one single block, guidance on."""
    with seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=HIDDEN,
            pooled_projection_dim=HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )


def vae_of_flux_layout(
    seed: int, channels: tuple[int, ...], layers: int, groups: int, sample_size: int
) -> AutoencoderKL:
    """FLUX's 16-channel VAE layout (4 blocks: scale factor 8, FLUX's shift/scale, no quant
    convs) at any width."""
    with seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels,
            layers_per_block=layers,
            latent_channels=16,
            norm_num_groups=groups,
            sample_size=sample_size,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


def tiny_vae(seed: int) -> AutoencoderKL:
    """FLUX's VAE layout at width 8."""
    return vae_of_flux_layout(seed, (8, 8, 8, 8), 1, 4, 64)


def tiny_clip_text_encoder(seed: int, vocab_size: int) -> CLIPTextModel:
    """CLIP-L's text tower at width 32; its pooled output feeds the transformer's pooled input."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        projection_dim=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    with seeded(seed):
        return CLIPTextModel(config)


def tiny_t5_encoder(seed: int, vocab_size: int) -> T5EncoderModel:
    """T5 v1.1's encoder (gated GELU) at width 32; its sequence output is the joint context."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with seeded(seed):
        return T5EncoderModel(config)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config exactly (resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """All FLUX.1-dev components, tiny; each seeded on its own so one change leaves the rest."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed, len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(seed, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=tiny_transformer(seed),
    )


def build_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1-dev-layout folder that `FluxPipeline.from_pretrained` loads.

    The folder is written beside `out_dir` and renamed into place, replacing an older one whole.
    """
    pipeline = tiny_flux_pipeline(seed)
    with atomic_path(Path(out_dir)) as staged:
        pipeline.save_pretrained(staged, safe_serialization=True)
    return Path(out_dir)


MAIN_PARTS = ("flux", "hpsv2", "pickscore", "aesthetic")
"""What `srpo make-tiny` builds by default: FLUX and every scorer of the main environment, in
the order of the manifests already built (tests/unit/test_rewards.py checks it covers them)."""
METRIC_ENV_PARTS = tuple(
    sorted(name for name, scorer in SCORERS.items() if scorer.environment != MAIN)
)
"""Scorers built inside their own environments (.venv-NAME), one part at a time; by name."""


def _builder(part: str) -> Callable[[Path, int], Path]:
    return build_tiny_flux if part == "flux" else resolve(SCORERS[part].tiny)


def manifest_name(parts: tuple[str, ...]) -> str:
    """`manifest.json` for the default set, `manifest-<parts>.json` for any other."""
    return "manifest.json" if parts == MAIN_PARTS else f"manifest-{'+'.join(parts)}.json"


def make_tiny(out_dir: Path, seed: int = 0, parts: tuple[str, ...] = MAIN_PARTS) -> dict[str, str]:
    """Build the tiny models `parts` under `out_dir/<part>` and pin them in a manifest.

    The manifest is written last, so its presence means the whole set is complete.
    """
    unknown = sorted(set(parts) - set(MAIN_PARTS) - set(METRIC_ENV_PARTS))
    if unknown or not parts:
        known = ", ".join(MAIN_PARTS + METRIC_ENV_PARTS)
        raise InputError(f"--part: unknown tiny model(s) {unknown}; expected some of {known}")
    out_dir = Path(out_dir)
    hashes: dict[str, str] = {}
    for name in parts:
        _builder(name)(out_dir / name, seed)
        hashes.update(
            (f"{name}/{path}", digest) for path, digest in file_hashes(out_dir / name).items()
        )
    hashes = dict(sorted(hashes.items()))
    manifest = {
        "seed": seed,
        "parts": list(parts),
        "packages": package_versions(MANIFEST_PACKAGES),
        "files": hashes,
    }
    write_json(out_dir / manifest_name(tuple(parts)), manifest)
    return hashes
