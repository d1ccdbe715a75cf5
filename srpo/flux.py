"""Everything FLUX-specific: latent normalisation, 2×2 packing, ids, timestep quantisation.

The SRPO math in `srpo.algorithm` sees only packed latent tokens [B, (H/16)·(W/16), 64] and the
two closures built here: `velocity(x, sigma)` over the transformer and `decode(latents)` over the
frozen VAE. Packing and ids reuse diffusers' own `FluxPipeline` helpers so they stay in step with
the pipeline users sample with.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from packaging.version import Version

from srpo.runtime.callables import Velocity
from srpo.runtime.precision import under_autocast

LATENT_CHANNELS = 16
PACKED_CHANNELS = LATENT_CHANNELS * 4
HALVING_HELPERS = Version(diffusers.__version__) < Version("0.32")
"""diffusers 0.31 (the hpsv3 environment's: transformers 4.45 holds huggingface_hub below the 1.x
that later diffusers need) halves the latent size inside `_prepare_latent_image_ids` and takes
the VAE factor of a 2×2-packed latent in `_unpack_latents`; 0.32 moved both to the caller."""


def quantise_timestep(sigma: float) -> float:
    """The transformer's timestep input int(σ·1000)/1000 (SPEC §3.3); step sizes stay exact."""
    return int(sigma * 1000) / 1000


@dataclass(frozen=True)
class LatentGeometry:
    """Pixel size ↔ packed-token layout for a VAE with spatial scale factor `vae_scale`."""

    height: int
    width: int
    vae_scale: int = 8

    def __post_init__(self) -> None:
        multiple = self.vae_scale * 2
        if self.height % multiple or self.width % multiple:
            raise ValueError(
                f"height/width: expected multiples of {multiple}, got {self.height}x{self.width}"
            )

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def num_tokens(self) -> int:
        latent_h, latent_w = self.latent_size
        return (latent_h // 2) * (latent_w // 2)

    def token_shape(self, batch_size: int) -> tuple[int, int, int]:
        return batch_size, self.num_tokens, PACKED_CHANNELS

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, h, w] → [B, (h/2)(w/2), 64]."""
        batch, channels, latent_h, latent_w = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, latent_h, latent_w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, (h/2)(w/2), 64] → [B, 16, h, w]."""
        scale = self.vae_scale * 2 if HALVING_HELPERS else self.vae_scale
        return FluxPipeline._unpack_latents(tokens, self.height, self.width, scale)

    def image_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[(h/2)(w/2), 3] rotary position ids of the image tokens."""
        halve = 1 if HALVING_HELPERS else 2
        latent_h, latent_w = self.latent_size
        return FluxPipeline._prepare_latent_image_ids(
            1, latent_h // halve, latent_w // halve, device, dtype
        )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def make_velocity(
    transformer: torch.nn.Module,
    geometry: LatentGeometry,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    guidance: float,
    guidance_embeds: bool,
    autocast: torch.dtype | None = None,
) -> Velocity:
    """velocity(x, σ) for a batch of prompts: x [B, N, 64] → v [B, N, 64] in x's dtype; σ is
    one level for the batch or a list of one per row.

    σ enters the transformer quantised to 1/1000 (diffusers scales timestep and guidance by 1000
    internally, exactly as FluxPipeline calls it); `transformer` may be an FSDP2 module. With
    `autocast` (a precision policy's transformer dtype) every call runs under torch.autocast.
    """
    batch = prompt_embeds.shape[0]
    device = prompt_embeds.device
    image_ids = geometry.image_ids(device, prompt_embeds.dtype)
    guidance_tensor = (
        torch.full((batch,), guidance, device=device, dtype=torch.float32)
        if guidance_embeds
        else None
    )

    def velocity(x: torch.Tensor, sigma: float | list[float]) -> torch.Tensor:
        levels = [sigma] * batch if isinstance(sigma, float | int) else sigma
        timestep = torch.tensor(
            [quantise_timestep(level) for level in levels], device=device, dtype=x.dtype
        )
        prediction = transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance_tensor,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return prediction.to(x.dtype)

    return under_autocast(velocity, autocast, device)


class FrozenVAE:
    """The FLUX VAE, frozen: decode with gradient to the latents, encode for offline mode."""

    def __init__(self, vae: AutoencoderKL, geometry: LatentGeometry) -> None:
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.geometry = geometry
        self.shift = float(vae.config.shift_factor)
        self.scale = float(vae.config.scaling_factor)

    def configure_memory(self, tiling: bool, slicing: bool) -> None:
        """Tiled / sliced decoding trades speed for memory at 720 px and above."""
        if tiling:
            self.vae.enable_tiling()
        if slicing:
            self.vae.enable_slicing()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed normalised latents → image in [0, 1], differentiable w.r.t. `tokens`."""
        latents = self.geometry.unpack(tokens) / self.scale + self.shift
        latents = latents.to(self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] → packed normalised latents (offline mode's x₀)."""
        pixels = (images * 2 - 1).to(self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return self.geometry.pack((latents.float() - self.shift) * self.scale)


def load_transformer(base_model: str, dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(
        base_model, subfolder="transformer", torch_dtype=dtype
    )


def load_vae(base_model: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=dtype)
