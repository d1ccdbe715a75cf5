"""Atomic writes, hashing and provenance: every output appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")
"""Where a result was computed: the GPUs a job was given and its Slurm job."""
PROVENANCE_PACKAGES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "safetensors",
    "snakemake",
    "srpo-workflow",
)


class InputError(ValueError):
    """A user-facing problem with an input file or value; the CLI prints it as one line."""


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; rename it onto `target` only if the block succeeds.

    Works for files and folders: the caller writes whatever it likes at the yielded path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STAGING = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")
"""What `atomic_path` stages a target NAME in: a hidden `.NAME.<random>.tmp` folder beside it."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line, so an error stays one line on the CLI."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clear_staging(targets: Iterable[Path]) -> None:
    """Remove the staging folders a killed run's `atomic_path` left beside `targets`.

    Only a job's own outputs are named, so the staging of a job running beside it (another
    shard writing into the same images/) is never touched; each folder is listed once.
    """
    names: dict[Path, set[str]] = {}
    for target in map(Path, targets):
        names.setdefault(target.parent, set()).add(target.name)
    for folder, owned in names.items():
        for leftover in folder.glob(".*.tmp") if folder.is_dir() else []:
            match = STAGING.fullmatch(leftover.name)
            if match is not None and match["name"] in owned:
                shutil.rmtree(leftover, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, keys sorted, so identical content gives identical bytes."""
    with atomic_path(Path(path)) as staged:
        staged.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


HASH_CACHE_ENV = "SRPO_HASH_CACHE"
"""Where sha256 results of large files are remembered (default ~/.cache/srpo/sha256.json)."""
CACHE_MIN_BYTES = 64 << 20
"""Files smaller than this are always hashed afresh: cheaper than a cache lookup is wrong."""


def _hash_cache_path() -> Path:
    default = Path.home() / ".cache" / "srpo" / "sha256.json"
    return Path(os.environ.get(HASH_CACHE_ENV, default))


def _hash_bytes(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file; for large files (real FLUX weights: 24 GB) the result is cached by
    (absolute path, size, mtime), so provenance does not re-read the weights on every run."""
    path = Path(path)
    status = path.stat()
    if status.st_size < CACHE_MIN_BYTES:
        return _hash_bytes(path)
    key = f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = _hash_bytes(path)
        with contextlib.suppress(OSError):
            write_json(cache_file, cache)
    return cache[key]


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path → sha256 for every file under `folder` (sorted, hidden temp files skipped)."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: sha256_file(folder)}
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def git_commit(start: Path | None = None) -> str:
    """The commit of the checkout this code runs from; outside a git checkout the one the image
    was built from (SRPO_GIT_COMMIT, set by containers/Dockerfile), else "unknown"."""
    where = start or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SRPO_GIT_COMMIT", "unknown")
    return result.stdout.strip()


def package_versions(names: tuple[str, ...] = PROVENANCE_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(config: Any, weights: dict[str, Path] | None = None) -> dict[str, Any]:
    """What made a result: config, code commit, package versions, host, time, weight hashes.

    `created` is SOURCE_DATE_EPOCH when set (the reproducible-builds convention), so a re-run
    after a kill can write the same bytes as an uninterrupted run.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch and not (epoch.isascii() and epoch.isdigit()):
        raise InputError(f"SOURCE_DATE_EPOCH: expected whole seconds since 1970, got {epoch!r}")
    created = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return {
        "config": config,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "host": socket.gethostname(),
        "environment": {name: os.environ.get(name) for name in PROVENANCE_ENVIRONMENT},
        "created": created.isoformat(timespec="seconds"),
        "weights": {name: file_hashes(path) for name, path in (weights or {}).items()},
    }


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; an empty line is an error (it would silently shift every index)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: expected UTF-8 text, {error.reason} at byte {error.start}"
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}:{number}: empty line, expected one prompt per line")
    if not lines:
        raise InputError(f"{path}: no prompts, expected one prompt per line")
    return [line.strip() for line in lines]
