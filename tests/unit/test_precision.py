"""The precision policies: which dtype each model computes in, and where autocast applies."""

import torch

from srpo.runtime.precision import POLICIES, under_autocast


def test_policies_follow_the_recipes():
    fsdp, autocast, fp32 = POLICIES["fsdp-bf16"], POLICIES["autocast-bf16"], POLICIES["fp32"]
    # Ours: bf16 parameters through FSDP2 and a bf16 VAE, no autocast anywhere.
    assert (fsdp.transformer_dtype, fsdp.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    assert (fsdp.transformer_autocast, fsdp.vae_autocast, fsdp.reward_autocast) == (None,) * 3
    # The authors': fp32 parameters, bf16 autocast for transformer and VAE, fp16 for the reward.
    assert (autocast.transformer_dtype, autocast.vae_dtype) == (torch.float32, torch.float32)
    assert (autocast.transformer_autocast, autocast.vae_autocast) == (torch.bfloat16,) * 2
    assert autocast.reward_autocast == torch.float16
    assert (fp32.transformer_dtype, fp32.vae_dtype, fp32.transformer_autocast) == (
        torch.float32,
        torch.float32,
        None,
    )


def test_under_autocast_runs_the_call_in_that_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    assert under_autocast(layer, torch.bfloat16, cpu)(x).dtype == torch.bfloat16
    assert under_autocast(layer, torch.float16, cpu)(x).dtype == torch.float16
    assert under_autocast(layer, None, cpu) is layer
    assert layer(x).dtype == torch.float32  # nothing leaks out of the call


def test_fsdp2_casts_only_under_fsdp_bf16():
    """fp32 master weights computed as they are ask FSDP2 for no cast: a cast to fp32 would
    also cast each block's inputs (the autocast policy's bf16 activations up to fp32)."""
    assert POLICIES["fsdp-bf16"].fsdp_param_dtype == torch.bfloat16
    assert POLICIES["fp32"].fsdp_param_dtype is None
    assert POLICIES["autocast-bf16"].fsdp_param_dtype is None


def test_autocast_keeps_no_weight_cache():
    """Autocast's cache would hold a low-precision copy of every weight for the whole call: the
    whole gathered model under a kept gather."""
    seen = []

    def call():
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))

    under_autocast(call, torch.bfloat16, torch.device("cpu"))()
    assert seen == [(True, False)]
