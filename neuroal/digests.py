"""Content digests: every artifact and cache is named by what it contains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB weight files


def file_digest(path: Path) -> str:
    """sha256 hex digest of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
