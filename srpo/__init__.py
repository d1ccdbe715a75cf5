"""srpo-workflow: Direct-Align + Semantic Relative Preference Optimization for FLUX."""

import os
from importlib import metadata

# CPU tensors of 2 MiB and more sit on transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE),
# unless the environment says otherwise. FSDP2 frees its gathered parameters and unsharded
# gradients after each use and allocates them again, and each first touch of fresh memory
# faults: one fault per 2 MiB instead of per 4 KiB makes the benchmark's step faster (measured
# in benchmarks/README.md, "Huge pages for large CPU tensors"). PyTorch reads the variable at
# the process's first tensor allocation, and importing diffusers already allocates one, so it
# is set here, before any module of the package imports a model library. The GPU's caching
# allocator makes it moot there.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:
    __version__ = metadata.version("srpo-workflow")
except metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
