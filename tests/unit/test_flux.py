"""The FLUX adapter: packing, ids, timestep quantisation, velocity and VAE closures."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from srpo.flux import (
    FrozenVAE,
    LatentGeometry,
    load_vae,
    make_velocity,
    quantise_timestep,
    vae_scale_factor,
)


def test_quantise_timestep_truncates_to_thousandths():
    assert quantise_timestep(0.96428571) == 0.964
    assert quantise_timestep(0.7509) == 0.75
    assert quantise_timestep(1.0) == 1.0


def test_geometry_shapes_and_round_trip():
    geometry = LatentGeometry(720, 720)
    assert geometry.latent_size == (90, 90)
    assert geometry.num_tokens == 45 * 45
    assert geometry.token_shape(2) == (2, 2025, 64)
    latents = torch.randn(2, 16, 90, 90)
    tokens = geometry.pack(latents)
    assert tokens.shape == (2, 2025, 64)
    torch.testing.assert_close(geometry.unpack(tokens), latents, rtol=0, atol=0)
    # token 0 holds the 2×2 patch at the top-left corner, channel-major
    torch.testing.assert_close(tokens[0, 0, :4], latents[0, 0, :2, :2].reshape(4))
    ids = geometry.image_ids(torch.device("cpu"), torch.float32)
    assert ids.shape == (2025, 3)  # diffusers ≥ 0.32: no batch dimension
    assert ids[46].tolist() == [0.0, 1.0, 1.0]


def test_geometry_rejects_odd_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        LatentGeometry(100, 64)


def test_velocity_passes_quantised_timestep_and_guidance(tiny_flux):
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_flux), subfolder="transformer")
    seen = {}

    def spy(module, args, kwargs):
        seen.update(timestep=kwargs["timestep"], guidance=kwargs["guidance"])

    transformer.register_forward_pre_hook(spy, with_kwargs=True)
    geometry = LatentGeometry(64, 64)
    velocity = make_velocity(
        transformer, geometry, torch.randn(2, 8, 32), torch.randn(2, 32), torch.zeros(8, 3),
        guidance=3.5, guidance_embeds=True,
    )  # fmt: skip
    out = velocity(torch.randn(geometry.token_shape(2)), 0.96428571)
    assert out.shape == (2, 16, 64) and out.dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.full((2,), 0.964), rtol=0, atol=0)
    assert seen["guidance"].tolist() == [3.5, 3.5]


def test_decode_is_differentiable_and_vae_frozen(tiny_flux):
    vae = load_vae(str(tiny_flux))
    geometry = LatentGeometry(64, 64, vae_scale_factor(vae))
    decoder = FrozenVAE(vae, geometry)
    assert (decoder.shift, decoder.scale) == (0.1159, 0.3611)
    tokens = torch.randn(geometry.token_shape(1), requires_grad=True)
    image = decoder.decode(tokens)
    assert image.shape == (1, 3, 64, 64)
    assert float(image.detach().min()) >= 0 and float(image.detach().max()) <= 1
    image.mean().backward()
    assert tokens.grad is not None and float(tokens.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())


def test_decode_undoes_flux_latent_normalisation(tiny_flux):
    """decode(z) = VAE(z / 0.3611 + 0.1159), exactly as FluxPipeline decodes."""
    vae = load_vae(str(tiny_flux))
    geometry = LatentGeometry(64, 64, vae_scale_factor(vae))
    tokens = torch.randn(geometry.token_shape(1))
    expected = vae.decode(geometry.unpack(tokens) / 0.3611 + 0.1159).sample
    got = FrozenVAE(vae, geometry).decode(tokens)
    torch.testing.assert_close(got, (expected / 2 + 0.5).clamp(0, 1))
