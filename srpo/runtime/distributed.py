"""Rank, world size, device and process group: one code path for CPU (gloo) and GPU (NCCL).

Only the backend and the device differ between a laptop test and a 32-GPU run. Every stage that
runs on several processes (encoding, training, sampling, scoring) opens one of these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from srpo.runtime.attention import configure_attention

T = TypeVar("T")


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
