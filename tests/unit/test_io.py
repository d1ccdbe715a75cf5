"""Atomic writes, hashing with its cache, prompt files."""

import hashlib
import os

import pytest

from srpo import io
from srpo.io import atomic_path, file_hashes, git_commit, sha256_file


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as staged:
        staged.write_text("half")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as staged:
        staged.write_text("whole")
    assert target.read_text() == "whole"


def test_atomic_path_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_large_file_hash_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv(io.HASH_CACHE_ENV, str(tmp_path / "cache.json"))
    monkeypatch.setattr(io, "CACHE_MIN_BYTES", 4)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abcdefgh")
    want = hashlib.sha256(b"abcdefgh").hexdigest()
    assert sha256_file(weights) == want
    assert (tmp_path / "cache.json").is_file()
    before = weights.stat().st_mtime_ns
    weights.write_bytes(b"abcdefgX")  # same size, new mtime → hashed again
    os.utime(weights, ns=(before + 10**9, before + 10**9))
    assert sha256_file(weights) == hashlib.sha256(b"abcdefgX").hexdigest()
    assert file_hashes(tmp_path)["w.bin"] == hashlib.sha256(b"abcdefgX").hexdigest()


def test_git_commit_outside_a_checkout_is_the_images(tmp_path, monkeypatch):
    monkeypatch.delenv("SRPO_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("SRPO_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"
