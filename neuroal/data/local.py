"""Corpora read from local files: the user's own text, and the sources of Python's standard library.

A user corpus is a path given to ``--calib`` or ``--ppl``:

- a ``.jsonl`` file: one document per line, its ``text`` field (blank lines are skipped);
- a folder: one document per file (every file below it whose name does not start with a dot,
  read as UTF-8, sorted by relative path);
- any other file: UTF-8 text cut into blank-line-separated paragraphs (into lines when it has no
  blank line). Each split joins its paragraphs back into one stream document, as Penn Treebank
  and WikiText-2 are, because paragraphs are far shorter than a calibration window.

Documents (paragraphs for a text file) are assigned to train or test by a hash of their text
(``neuroal.data.splits.split_documents``): deterministic, independent of order, disjoint.

Every user corpus has a content digest (``local_digest``): it names the files' bytes, so cache
keys that include it change when the text does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from neuroal.data.splits import split_documents
from neuroal.errors import UserError

# Bump when the reading or splitting rules change: digests (and every cache keyed by them) change.
_FORMAT_VERSION = 1

# Suffixes that mark a missing corpus argument as a path rather than a mistyped corpus name.
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".text", ".py")

_HASH_CHUNK = 1 << 20  # read files in 1 MiB pieces when hashing: large corpora need no big buffer

STDLIB = "python-stdlib"

# Folders of the standard library that are not its code: test suites, installed packages, and the
# build configuration (python-config.py and the _sysconfigdata module hold this machine's paths).
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_STDLIB_SKIP_PATTERNS = (re.compile(r"config-\d.*"), re.compile(r"_sysconfigdata.*\.py"))


def looks_like_path(name: str) -> bool:
    """Whether a corpus argument names a file (it exists, or it has a separator or a text suffix)."""
    return (Path(name).expanduser().exists() or "/" in name or "\\" in name
            or name.startswith(("~", ".")) or name.lower().endswith(_TEXT_SUFFIXES))


def check_path(name: str) -> Path:
    """The corpus path of ``name``, which must exist.

    Raises:
        UserError: Nothing exists at ``name``.
    """
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"corpus file or folder {name!r} does not exist")
    return path


def local_documents(name: str, split: str) -> list[str]:
    """One split of the user corpus at path ``name`` (see the module docstring for the forms).

    Raises:
        UserError: A missing path, an empty folder, a JSONL line that is not an object with a
            string ``text``, a file that is not UTF-8, or fewer than two distinct documents.
    """
    path = check_path(name)
    if path.is_dir():
        return split_documents(_folder_documents(path, name), split, name)
    if path.suffix.lower() == ".jsonl":
        return split_documents(_jsonl_documents(path, name), split, name)
    paragraphs = _paragraphs(_read_text(path, name))
    stream = "\n\n".join(split_documents(paragraphs, split, name))
    return [stream]


def local_digest(name: str) -> str:
    """``sha256:<hex>`` of a user corpus: its form, and each file's relative path and bytes.

    A single file's own name is left out (renaming it changes nothing that is read); a folder's
    relative paths are in (they order the documents, and calibration draws by position).
    """
    path = check_path(name)
    digest = hashlib.sha256(f"neuroal-corpus-v{_FORMAT_VERSION}\n".encode())
    if path.is_dir():
        digest.update(b"folder\n")
        for file in _folder_files(path, name):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            digest.update(_file_sha256(file).encode() + b"\n")
    else:
        digest.update(b"jsonl\n" if path.suffix.lower() == ".jsonl" else b"text\n")
        digest.update(_file_sha256(path).encode())
    return f"sha256:{digest.hexdigest()}"


def _folder_files(folder: Path, name: str) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted by relative path."""
    visible = (p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    files = sorted((p for p in visible if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise UserError(f"corpus folder {name!r} holds no files; put one text file per document in it")
    return files


def _folder_documents(folder: Path, name: str) -> list[str]:
    documents = [_read_text(file, name).strip() for file in _folder_files(folder, name)]
    return [doc for doc in documents if doc]


def _jsonl_documents(path: Path, name: str) -> list[str]:
    documents = []
    for number, line in enumerate(_read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"corpus {name!r}: line {number} is not JSON") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"corpus {name!r}: line {number} has no string field 'text' "
                            "(each JSONL line must be an object such as {\"text\": \"...\"})")
        if text.strip():
            documents.append(text.strip())
    return documents


def _paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs; the lines when there is at most one paragraph."""
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) >= 2:
        return paragraphs
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"corpus {name!r}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"corpus {name!r}: cannot read {path}: {exc.strerror}") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# python-stdlib: the .py sources of this interpreter's standard library


def stdlib_documents(split: str) -> list[str]:
    """One split of ``python-stdlib``: one document per ``.py`` file, split by content hash."""
    return split_documents(list(_stdlib_texts()), split, STDLIB)


def stdlib_digest() -> str:
    """``python-stdlib:<python version>:sha256:<hex>`` over each file's relative path and bytes."""
    return _stdlib_digest()


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (not a virtual environment's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files, sorted by relative path (see ``_STDLIB_SKIP_*``)."""
    root = stdlib_root()
    return sorted(_stdlib_walk(root), key=lambda p: p.relative_to(root).as_posix())


def _stdlib_walk(root: Path) -> Iterator[Path]:
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _STDLIB_SKIP_DIRS & set(parts[:-1]) or any(pattern.fullmatch(part) for part in parts
                                                      for pattern in _STDLIB_SKIP_PATTERNS):
            continue
        if path.is_file():
            yield path


@functools.lru_cache(maxsize=1)
def _stdlib_texts() -> tuple[str, ...]:
    """Non-empty file texts (~730 files, ~12 MB for CPython 3.11), read once per process."""
    texts = (path.read_text(encoding="utf-8", errors="replace").strip() for path in stdlib_files())
    return tuple(text for text in texts if text)


@functools.lru_cache(maxsize=1)
def _stdlib_digest() -> str:
    root = stdlib_root()
    digest = hashlib.sha256(f"neuroal-corpus-v{_FORMAT_VERSION}\n".encode())
    for path in stdlib_files():
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(_file_sha256(path).encode() + b"\n")
    version = ".".join(map(str, sys.version_info[:3]))
    return f"{STDLIB}:{version}:sha256:{digest.hexdigest()}"
