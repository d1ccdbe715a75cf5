"""srpo processes back large CPU tensors with huge pages, unless the environment says not to."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# The trainer's imports (diffusers among them) allocate tensors before `srpo train` builds
# anything, and PyTorch fixes its huge-page choice at the first allocation.
PROBE = """
import torch
import srpo.train.run  # what `srpo train` imports before it allocates anything
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, as a gathered FSDP block would be
huge_kib = sum(
    int(line.split()[1]) for line in open("/proc/self/smaps")
    if line.startswith("AnonHugePages:")
)
print(huge_kib)
"""


def _huge_kib(**env: str) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(
    not THP_MODE.is_file() or "[madvise]" not in THP_MODE.read_text(),
    reason="huge pages are not per allocation here (THP 'always' or 'never')",
)
def test_the_trainers_large_tensors_sit_on_huge_pages_unless_the_environment_says_no():
    assert _huge_kib() >= 32 * 1024
    assert _huge_kib(THP_MEM_ALLOC_ENABLE="0") == 0


def test_a_gpu_process_group_is_bound_to_its_device(monkeypatch):
    """NCCL is told its GPU when the group is made (`device_id`), not left to guess it."""
    import torch
    import torch.distributed as dist

    from srpo.runtime import distributed

    made = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "configure_attention", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: made.update(kwargs))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    ctx = distributed.DistributedContext.from_environment()
    assert ctx.device == torch.device("cuda", 3) and ctx.backend == "nccl"
    assert made["device_id"] == torch.device("cuda", 3)
