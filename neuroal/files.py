"""Atomic file writes and self-checking JSON caches.

Every output is written to a temporary file beside its destination and renamed into place, so a
reader (or a process killed half-way) sees the old file, the new one, or none; never half of one.
Temporary names carry the writer's host and process id: what a killed writer left behind is
removed by the next write to the same destination.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neuroal.digests import json_digest

logger = logging.getLogger(__name__)

# In temporary names: a file system shared between machines must not take another host's live
# writer for a dead one. Dashes become dots so that the name splits back unambiguously.
_HOST = re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname()) or "host"


def temporary_path(out: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``out`` for a file or folder that becomes ``out`` (``kind`` tmp) or holds
    the one it replaces (``old``); see :func:`remove_stale_temporaries`."""
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files and folders of ``out`` whose writer died (``kill -9``, a crash):
    those named by :func:`temporary_path` on this host for a process that no longer runs.

    Returns what was removed. Writers on other hosts (a shared file system) are left alone.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-{re.escape(_HOST)}-(\d+)-[0-9a-f]{{12}}")
    removed = []
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _running(int(match.group(1))):
            logger.warning("removing %s, left by an interrupted write of %s", entry, out)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; renamed into place (replacing ``out``) when the
    block ends without an error, removed when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary_path(out)
    tmp.mkdir()  # not mkdtemp: its 0700 would stay on the folder after the rename; mkdir follows the umask
    try:
        yield tmp
        if out.exists():
            _replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Swap a finished folder in for an existing one; the old one is removed after the swap."""
    old = temporary_path(out, "old")
    old.mkdir()
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this host (a pid reused since only keeps a leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


# safetensors dtype names (as its headers write them) and the torch dtypes they hold.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_header(path: Path) -> str:
    """The JSON header of a safetensors file, exactly as stored (its padding included)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(size).decode("utf-8")
