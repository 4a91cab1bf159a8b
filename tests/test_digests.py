"""The digest cache: a file is hashed once while it stays as it is (same inode, size and
modification time), by this process or any other, and again as soon as it changes."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import neuroal.digests as digests
from neuroal.checkpoint import read_manifest
from neuroal.cli import main
from neuroal.models import resolve_model


@pytest.fixture
def hashes(monkeypatch, tmp_path):
    """Files read in full, in order, with a fresh on-disk cache and an empty in-process one."""
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "_KNOWN", {})
    read = []
    hash_file = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda path: read.append(os.path.basename(path)) or hash_file(path))
    return read


def test_an_unchanged_file_is_hashed_once_across_processes(hashes, tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = digests.file_digest(path)
    assert digests.file_digest(path) == first and hashes == ["w.bin"]
    digests._KNOWN.clear()  # a new process: the entry on disk serves it
    assert digests.file_digest(path) == first and hashes == ["w.bin"]
    moved = tmp_path / "moved.bin"
    os.replace(path, moved)  # a checkpoint renamed into place keeps its digest
    assert digests.file_digest(moved) == first and hashes == ["w.bin"]


def test_a_changed_file_is_hashed_again_even_right_after_it_was_hashed(hashes, tmp_path):
    path = tmp_path / "w.bin"
    for content in (b"a" * 1000, b"b" * 1000, b"b" * 999):  # same size in place, then truncated
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.write(content)
            f.truncate()
        assert digests.file_digest(path) == hashlib.sha256(content).hexdigest()
    assert hashes == ["w.bin"] * 3
    copy = tmp_path / "copy.bin"
    shutil.copy2(path, copy)  # same size and mtime, another inode: its own entry
    assert digests.file_digest(copy) == digests.file_digest(path) and hashes == ["w.bin"] * 3 + ["copy.bin"]


def test_a_source_model_and_its_checkpoint_are_hashed_once_per_cell(hashes, tiny_llama, tmp_path):
    """Resolving the source in every task and verifying the checkpoint in prune, evaluate and
    versioning read each weight file once: the source on first sight, the checkpoint when written."""
    out = tmp_path / "pruned"
    for _task in range(3):
        resolve_model(str(tiny_llama))
    assert main(["prune", "--model", str(tiny_llama), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out)]) == 0
    for _task in range(3):
        read_manifest(out)
        resolve_model(str(out))
    assert sorted(hashes) == ["model.safetensors", "model.safetensors"]  # the source's, the checkpoint's
