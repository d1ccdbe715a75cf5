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
import srpo.train.loop  # what `srpo train` imports before it allocates anything
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
