"""FSDP2 wrapping of the transformer: sharding, mixed precision, activation checkpointing.

The same calls on CPU (gloo) and GPU (NCCL); the process group is the runtime's
(`srpo.runtime.distributed`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_transformer(
    transformer: torch.nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    activation_checkpointing: bool,
) -> torch.nn.Module:
    """FSDP2: `fully_shard` each FLUX block, then the root; fp32 master weights and reductions.

    `param_dtype` None (fp32 master weights computed as they are) asks FSDP2 for no cast of
    parameters or inputs. Blocks keep the compute dtype between them; only the root casts its
    output back to fp32, so the Euler and Direct-Align arithmetic outside the model stays fp32.

    Activation checkpointing wraps each block in `checkpoint_wrapper` and shards the wrapper,
    as torchtitan composes them: the recompute then runs inside the FSDP2 unit, after its
    input cast (diffusers' own switch checkpoints the sharded block from outside, and torch
    before 2.13 skips that cast in the recompute). The wrapper's prefix is not part of
    state-dict keys, so checkpoints and exports keep the plain model's names.

    Works on a model built on the meta device too: shard it, then `load_full_state`.
    """
    # diffusers' blocks return views that no code modifies in place; the gradients equal plain
    # autograd (tests/distributed/test_learning.py), so FSDP2's caution is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if activation_checkpointing:
        checkpoint_blocks(transformer)
    for block in _flux_blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    root_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32
    )
    fully_shard(transformer, mesh=mesh, mp_policy=root_policy)
    return transformer


def checkpoint_blocks(transformer: torch.nn.Module) -> None:
    """Each FLUX block replaced by itself in a non-reentrant `checkpoint_wrapper`: its
    activations are recomputed in the backward instead of kept."""
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def load_full_state(
    model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device
) -> None:
    """Fill a sharded model built on the meta device from rank 0's `full_state` (None on the
    other ranks): each tensor is broadcast and every rank keeps its shard, so no rank but 0
    ever holds the whole model, and no GPU more than its shards."""
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state or {}, options=options)


def _flux_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


@contextmanager
def _blocks_kept_gathered(blocks: list[FSDPModule], through_backward: bool) -> Iterator[None]:
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
        if through_backward:
            block.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.reshard()
            block.set_reshard_after_forward(True, recurse=False)
            block.set_reshard_after_backward(True, recurse=False)


def kept_gathered(
    transformer: torch.nn.Module, enabled: bool = True, through_backward: bool = False
):
    """Within it, each FSDP2 block all-gathers its parameters once and keeps them for every
    later forward (and, `through_backward`, every backward) instead of gathering them again for
    each: one all-gather per block for the 25-step rollout rather than 25. Gradients are still
    reduce-scattered after each backward.

    Same values, so the same bits; the cost is the full compute-dtype parameters on every rank
    until the context ends. A no-op when disabled or when `transformer` is not sharded.
    """
    blocks = [block for block in _flux_blocks(transformer) if isinstance(block, FSDPModule)]
    if not enabled or not blocks:
        return nullcontext()
    return _blocks_kept_gathered(blocks, through_backward)
