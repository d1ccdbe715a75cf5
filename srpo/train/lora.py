"""LoRA through diffusers' own PEFT integration: adapters on the FLUX transformer, and their
two exports (diffusers' LoRA file, and the adapters merged into the base weights).

The adapters are ordinary parameters of the transformer, so FSDP2, DCP and the exact resume
treat them as they treat the full model; only the frozen base is left out of checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from srpo.config import LoraConfig
from srpo.io import InputError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""diffusers' default file name: `pipe.load_lora_weights(folder)` finds it without options."""


def add_lora(transformer: torch.nn.Module, lora: LoraConfig, seed: int) -> None:
    """Freeze `transformer` and inject `lora`'s adapters, their initial A drawn from `seed`.

    One seed for every rank: FSDP2 keeps each rank's slice of its own copy, so the copies must
    be equal for the sharded whole to be the same adapter at any world size. The draw is on the
    CPU generator (call this before moving the model) and leaves the global RNG as it was.
    Dropout stays 0: a random mask per rank would tie the update to the world size.
    """
    import peft

    names = [name for name, _ in transformer.named_modules()]
    for target in lora.target_modules:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise InputError(f"lora.target_modules: {target!r} names no module of the transformer")
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        transformer.add_adapter(config)


def save_lora_weights(transformer: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """`out_dir/pytorch_lora_weights.safetensors` in diffusers' format, with the adapter config
    as metadata so that `load_lora_weights` restores alpha (the file alone only gives the rank)."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer)
    FluxPipeline.save_lora_weights(
        str(out_dir),
        transformer_lora_layers={name: t.to(dtype).contiguous() for name, t in layers.items()},
        weight_name=LORA_WEIGHTS,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def merge_lora(transformer: torch.nn.Module) -> None:
    """Fold the adapters into the base weights (W + alpha/r·B·A) and drop them, leaving the
    plain transformer with its plain parameter names."""
    transformer.fuse_lora()
    transformer.unload_lora()
