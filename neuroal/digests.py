"""Content digests: every artifact and cache is named by what it contains.

Hashing a 7B model's weights takes minutes, and every task of every cell asks for the digest of its
source model and checkpoint. So a file's digest is remembered, in this process and on disk under
the neuroal cache, keyed by the file's identity and state: device, inode, size and modification
time (in nanoseconds). A file that is rewritten, replaced, truncated or touched is hashed again; a
renamed one (a checkpoint moved into place) keeps its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from neuroal.paths import cache_dir

_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB weight files
# File timestamps advance in ticks of 1-10 ms. A file is hashed at least this long after its last
# write, so that any later write gives it a newer modification time and its cached digest is dropped.
_SETTLE_NS = 20_000_000
_KNOWN: dict[tuple[int, int, int, int], str] = {}  # this process's share of the digest cache


def file_digest(path: Path) -> str:
    """sha256 hex digest of one file, from the digest cache when the file has not changed since."""
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _KNOWN:
        _KNOWN[key] = _read_cached(key) or _hash_and_remember(path, key)
    return _KNOWN[key]


def _hash_file(path: Path) -> str:
    """sha256 hex digest of one file, read in full."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_entry(key: tuple[int, int, int, int]) -> Path:
    return cache_dir("digests") / f"{json_digest(list(key[:2]))[:32]}.json"


def _read_cached(key: tuple[int, int, int, int]) -> str | None:
    try:
        entry = json.loads(_cache_entry(key).read_text())
    except (OSError, ValueError):
        return None
    return entry.get("sha256") if entry.get("state") == list(key) else None


def _hash_and_remember(path: Path, key: tuple[int, int, int, int]) -> str:
    wait_ns = key[3] + _SETTLE_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9)
    digest = _hash_file(path)
    if os.stat(path).st_mtime_ns != key[3]:  # written to while it was read: remember nothing
        return digest
    entry = _cache_entry(key)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"path": str(Path(path).resolve()), "state": list(key), "sha256": digest}))
        os.replace(tmp, entry)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError:  # a read-only cache only costs the next process a re-hash
        tmp.unlink(missing_ok=True)
    return digest


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder, sorted by name."""
    return sorted(Path(folder).glob("*.safetensors"))


def pickle_weight_files(folder: Path) -> list[Path]:
    """The pickled (PyTorch ``.bin``) weight files of a model folder, sorted by name."""
    return sorted(Path(folder).glob("*.bin"))


def weights_digest(folder: Path) -> str:
    """One digest over the weight files a folder's model loads from (names and contents): its
    safetensors files, or its pickled ones when it has no safetensors."""
    return json_digest({p.name: file_digest(p) for p in weight_files(folder) or pickle_weight_files(folder)})


def json_digest(value) -> str:
    """sha256 hex digest of a JSON-serialisable value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()



def tensors_digest(tensors: dict) -> str:
    """sha256 over named tensors (names, dtypes, shapes and bytes), in name order."""
    import torch  # here, so that hashing files does not pay for importing torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
