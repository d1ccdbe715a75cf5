"""Verified inputs: weight files checked against their sha256 and hub ids checked for reach,
before a stage computes anything, each failure one line that says what to do.

A truncated download or a swapped checkpoint otherwise surfaces as a deep unpickling error, or
worse as quietly different scores; the hash cache of `srpo.io.sha256_file` (path, size, mtime)
makes the check free after the first run.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from srpo.io import InputError, sha256_file

SHA256 = re.compile(r"^[0-9a-f]{64}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 5.0
"""How long the reachability probe of the hub waits before calling it unreachable."""


def parse_expected(values: list[str] | None, option: str = "--verify") -> dict[Path, str]:
    """`PATH=SHA256` options → {path: lower-case hex digest}."""
    expected = {}
    for value in values or []:
        path, separator, digest = value.rpartition("=")
        digest = digest.strip().lower()
        if not separator or not path or not SHA256.match(digest):
            raise InputError(f"{option}: expected PATH=SHA256 (64 hex digits), got {value!r}")
        expected[Path(path)] = digest
    return expected


def verify_files(expected: dict[Path, str]) -> None:
    """Every file has its expected sha256, or one line naming the file and both hashes."""
    for path, digest in expected.items():
        if not path.is_file():
            raise InputError(f"{path}: weight file not found (its sha256 should be {digest})")
        actual = sha256_file(path)
        if actual != digest:
            raise InputError(
                f"{path}: sha256 is {actual}, expected {digest}: the file is truncated, "
                "corrupt or another version; download it again"
            )


def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now (offline mode, or no connection), else None."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    host, port = _hub_endpoint()
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error.strerror or error})"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def require_pretrained(reference: str, what: str) -> None:
    """A folder here, a hub id in the local cache, or a hub id the hub can serve now; else one
    line: what to download, from where, and where to put it."""
    if Path(reference).exists():
        return
    if not HUB_ID.match(reference):
        raise InputError(f"{what}: {reference}: no such folder or file (nor a hub id owner/name)")
    if _in_hub_cache(reference):
        return
    reason = hub_unreachable()
    if reason is None:
        return
    from huggingface_hub.constants import HF_HUB_CACHE

    local = f"weights/{reference.split('/')[1]}"
    raise InputError(
        f"{what}: {reference} is not a folder here nor in the Hugging Face cache "
        f"({HF_HUB_CACHE}) and the hub cannot be used ({reason}): on a machine with network run "
        f"`hf download {reference} --local-dir {local}` (gated models: accept the licence at "
        f"https://huggingface.co/{reference} and `hf auth login` first), copy {local} here and "
        f"set {what} to it"
    )
