"""Helpers for metrics whose reference implementation is a published package in its own venv.

hpsv3 1.0.0 and image-reward 1.5 pin transformers 4 (image-reward also timm 0.6), so they are not
importable in the main environment; each runs in its layered `.venv-NAME` (envs/metric-env.sh).
Their modules import the package lazily, through `import_package`, so that the main environment
can import `srpo.rewards.metric` and still get a one-line answer naming the environment to use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from srpo.io import InputError


def first_line(error: BaseException) -> str:
    """The first line of an error: torch's and transformers' messages run to pages of advice."""
    return str(error).strip().split("\n")[0] or type(error).__name__


def import_package(module: str, environment: str, command: str | None = None) -> ModuleType:
    """Import a metric package's `module`, or say in one line which environment has it and
    which `command` runs there (default: its `srpo-ENV`)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(
            f"{module} cannot be imported here ({first_line(error)}); "
            f"run with {command or f'srpo-{environment}'} after bash envs/metric-env.sh "
            f"{environment}"
        ) from None


def require_file(path: Path, what: str) -> Path:
    """`path` as a Path if it is a file; otherwise a one-line error saying what was expected."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return path
