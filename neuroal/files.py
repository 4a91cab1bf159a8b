"""Atomic file writes and self-checking JSON caches.

Every output is written to a temporary file beside its destination and renamed into place, so a
reader (or a process killed half-way) sees the old file, the new one, or none; never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neuroal.digests import json_digest

logger = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; renamed into place (replacing ``out``) when the
    block ends without an error, removed when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would stay on the folder after the rename; mkdir follows the umask
    try:
        yield tmp
        if out.exists():
            replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: Path, out: Path) -> None:
    """Swap a finished folder in for an existing one; the old one is removed after the swap."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, payload) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def write_checked_json(path: Path, payload) -> None:
    """Write a cache entry: the payload with its digest, so a corrupt entry is detected on read."""
    write_text_atomic(path, json.dumps({"sha256": json_digest(payload), "payload": payload}, ensure_ascii=False))


def read_checked_json(path: Path):
    """The payload of a cache entry, or None when it is absent, unreadable or fails its digest."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        payload = record["payload"]
        if record["sha256"] != json_digest(payload):
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring corrupt cache entry %s (%s); rebuilding it", path, exc)
        return None
    return payload


def write_tensors_atomic(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write named tensors to a safetensors file through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: Path):
    """``(tensors, metadata)`` of a safetensors file, or None when it is absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (OSError, ValueError, SafetensorError) as exc:
        logger.warning("ignoring unreadable file %s (%s)", path, exc)
        return None
