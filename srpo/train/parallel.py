"""Process group and FSDP2 wrapping: the one code path for CPU (gloo) and GPU (NCCL).

Only the backend and the device differ between a laptop test and a 32-GPU run; the sharding,
mixed-precision policy and activation checkpointing are the same calls.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from srpo.train.attention import configure_attention

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class DistributedContext:
    """Rank, world size and device of this process, with a process group it owns.

    Without torchrun's environment a world of one is created on an in-memory store, so the
    same FSDP2 code runs in a plain `python -m srpo train` as under `torchrun`.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_environment(cls, timeout_minutes: int = 60) -> DistributedContext:
        """The context torchrun's variables describe (or a world of one)."""
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device, backend = torch.device("cuda", local_rank), "nccl"
            torch.cuda.set_device(device)
            configure_attention(device)
        else:
            device, backend = torch.device("cpu"), "gloo"
        owns = False
        if not dist.is_initialized():
            timeout = timedelta(minutes=timeout_minutes)
            # NCCL binds the group to this GPU at once (no guess at the first barrier).
            bound = {"device_id": device} if device.type == "cuda" else {}
            if "MASTER_ADDR" in os.environ:
                dist.init_process_group(backend, timeout=timeout, **bound)
            else:
                store = dist.HashStore()
                dist.init_process_group(
                    backend, store=store, rank=0, world_size=1, timeout=timeout, **bound
                )
            owns = True
        return cls(rank, world_size, local_rank, device, backend, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (e.g. a stop signal)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank: one decision where ranks could see different things
        (a shared file system shows another node's rename late)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def mesh(self) -> DeviceMesh:
        return init_device_mesh(self.device.type, (self.world_size,))

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


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
