"""The compact lineage form of a pruned checkpoint: what it takes, beside the dense source model,
to rebuild the checkpoint folder byte for byte.

Magnitude, Wanda, RIA, multiflow and DSnoT only zero weights, so a pruned matrix is the source's
matrix (in the checkpoint's dtype) times a mask; SparseGPT also changes the weights it keeps. A
lineage folder holds:

- ``lineage.json``: for every file of the checkpoint folder, its sha256 and how to get it back:
  ``copy`` (stored here under its name: ``neuroal.json``, ``config.json``, the plot), ``source``
  (the same bytes as the source folder's file of that name: the tokenizer), or ``weights`` (a
  safetensors file: its header, verbatim, and a recipe per tensor). Also the sha256 of each
  weight file of the source (``neuroal.json`` names the source and its digest) and of the two
  blobs, and the cell's form.
- ``masks.bin``: packed bits, 1 where a weight is kept, one run per pruned tensor.
- ``values.bin``: the kept values of tensors whose kept weights changed, and whole tensors that
  have no counterpart of the same shape in the source.

A tensor's recipe is ``source`` (the source's tensor, cast), ``mask`` (the source's, zero where
the mask says), ``values`` (mask and kept values) or ``whole``. The cell's form is ``mask`` when
no tensor stores values, else ``values``. Recipes are checked bit for bit when written, and a
rebuilt folder appears only after every file has matched its sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import shutil
import struct
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from neuroal.checkpoint import MANIFEST, Manifest, SourceRecord, read_manifest, read_record
from neuroal.digests import file_digest, weight_files
from neuroal.errors import UserError
from neuroal.files import SAFETENSORS_DTYPES, safetensors_header, staged_folder
from neuroal.models import ModelSource, resolve_model
from neuroal.pruning.masks import SAME_WIDTH_INT, kept_only

LINEAGE, MASKS, VALUES = "lineage.json", "masks.bin", "values.bin"
FORMAT = 1  # of lineage.json; a reader refuses a format it does not know
_CHUNK = 1 << 24  # 16 MiB reads when copying files: few calls, flat memory
_SCATTER_SLICE = 1 << 24  # weights per slice when kept values are scattered back: 128 MiB of indices at most


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorRecipe(_Record):
    """How one tensor of a weight file comes back; spans are ``(offset, bytes)`` in a blob."""

    form: Literal["source", "mask", "values", "whole"]
    mask: Optional[tuple[int, int]] = None  # in masks.bin
    values: Optional[tuple[int, int]] = None  # in values.bin


class FileRecipe(_Record):
    """How one file of the checkpoint folder comes back, and its sha256."""

    sha256: str
    kind: Literal["copy", "source", "weights"]
    header: Optional[str] = None  # a weight file's safetensors header, verbatim
    tensors: dict[str, TensorRecipe] = {}


class Lineage(_Record):
    """``lineage.json``."""

    format: int = FORMAT
    form: Literal["mask", "values"]
    source_files: dict[str, str]  # sha256 of each weight file of the source (its neuroal.json names it)
    files: dict[str, FileRecipe]
    blobs: dict[str, str]  # sha256 of masks.bin and values.bin


def is_lineage(folder: Path) -> bool:
    """Whether ``folder`` holds a lineage form (else it may be a full checkpoint folder)."""
    return (Path(folder) / LINEAGE).is_file()


def write_lineage(checkpoint: Path, source: ModelSource, out: Path) -> Lineage:
    """Write the lineage form of the checkpoint folder ``checkpoint``, pruned from ``source``, to
    the folder ``out`` (staged, then renamed into place; an existing ``out`` is replaced).

    Raises:
        UserError: The checkpoint does not verify, or was pruned from another model.
    """
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)  # every weight file checked against its digest
    if manifest.source.digest != source.digest:
        raise UserError(f"{checkpoint} was pruned from {manifest.source.spec} (sha256 {manifest.source.digest}), "
                        f"not from {source.spec} (sha256 {source.digest})")
    files = {}
    with staged_folder(out) as tmp:
        with _SourceTensors(source.folder) as dense, _HashedFile(tmp / MASKS) as masks, \
                _HashedFile(tmp / VALUES) as values:
            for path in _files_of(checkpoint):
                digest = file_digest(path)
                if path.suffix == ".safetensors":
                    files[path.name] = _weights_recipe(path, digest, dense, masks, values)
                elif path.name != MANIFEST and _same_file(source.folder / path.name, digest):
                    files[path.name] = FileRecipe(sha256=digest, kind="source")
                else:
                    shutil.copyfile(path, tmp / path.name)
                    files[path.name] = FileRecipe(sha256=digest, kind="copy")
        stores_values = any(t.values for f in files.values() for t in f.tensors.values())
        lineage = Lineage(form="values" if stores_values else "mask",
                          source_files={p.name: file_digest(p) for p in weight_files(source.folder)},
                          files=files, blobs={MASKS: masks.digest, VALUES: values.digest})
        (tmp / LINEAGE).write_text(lineage.model_dump_json(indent=1) + "\n")
    return lineage


def read_lineage(folder: Path) -> Lineage:
    """Read and check a lineage form: its recipe parses and its blobs match their sha256.

    Raises:
        UserError: One line naming what is missing or corrupt.
    """
    folder = Path(folder)
    lineage = read_record(Lineage, folder / LINEAGE, f"{folder} is not a readable lineage form")
    if lineage.format != FORMAT:
        raise UserError(f"lineage form {folder} has format {lineage.format}; this neuroal reads format {FORMAT}")
    for name, digest in {**lineage.blobs, **{n: f.sha256 for n, f in lineage.files.items() if f.kind == "copy"}}.items():
        if not (folder / name).is_file() or file_digest(folder / name) != digest:
            raise UserError(f"lineage form {folder} is corrupt: {name} is missing or does not match its recorded sha256")
    return lineage


def materialize(lineage_folder: Path, out: Path, source: ModelSource | str | None = None) -> Manifest:
    """Rebuild the full checkpoint folder of a lineage form into ``out``, which must not exist.

    ``source`` is the source model, resolved or as a spec resolved as a campaign resolves it
    (alias, hub id, ``.gguf`` file or local folder); by default the spec the checkpoint records.
    Its digest must be the recorded one. Every file is checked against its sha256 before ``out``
    appears.

    Returns:
        The checkpoint's manifest.

    Raises:
        UserError: ``out`` exists, the lineage form is corrupt, or the source is missing or another
            model (the line names the digest it needs). Nothing is written.
    """
    lineage_folder, out = Path(lineage_folder), Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out")
    lineage = read_lineage(lineage_folder)
    manifest = read_manifest(lineage_folder, verify=False)
    weights = {n: f.sha256 for n, f in lineage.files.items() if f.kind == "weights"}
    if weights != manifest.files:
        raise UserError(f"lineage form {lineage_folder} is corrupt: its recipe and {MANIFEST} name other weight files")
    if not isinstance(source, ModelSource):
        source = _resolve_source(manifest.source, lineage_folder, source)
    _check_source(lineage, manifest.source, lineage_folder, source)
    with staged_folder(out) as tmp, _SourceTensors(source.folder) as dense, _BlobReader(lineage_folder) as blobs, \
            _torch_threads(1):
        for name, recipe in lineage.files.items():
            if recipe.kind == "weights":
                digest = _write_weights(tmp / name, recipe, dense, blobs)
            else:
                digest = _copy((lineage_folder if recipe.kind == "copy" else source.folder) / name, tmp / name)
            if digest != recipe.sha256:
                raise UserError(f"rebuilding {name} from lineage form {lineage_folder} gave other bytes than the "
                                "checkpoint's (sha256 differs): its masks or values are corrupt")
    return manifest


def _resolve_source(needed: SourceRecord, folder: Path, spec: str | None) -> ModelSource:
    """``spec`` (default: the recorded source's) resolved as a campaign resolves it."""
    try:
        return resolve_model(spec or needed.spec)
    except UserError as exc:
        raise UserError(f"the source model of {folder} (sha256 {needed.digest}) is not available: {exc}; "
                        "pass --source with a copy of it") from None


def _check_source(lineage: Lineage, needed: SourceRecord, folder: Path, source: ModelSource) -> None:
    """Refuse a source other than the recorded one, or one whose weight files differ from those
    the lineage form was made against (a GGUF converted by another transformers version)."""
    if source.digest != needed.digest:
        raise UserError(f"{source.spec} is not the source model of {folder}: it has sha256 {source.digest}, the "
                        f"checkpoint needs sha256 {needed.digest} ({needed.spec})")
    for name, digest in lineage.source_files.items():
        path = source.folder / name
        if not path.is_file() or file_digest(path) != digest:
            raise UserError(f"{source.spec} (sha256 {needed.digest}) resolved to other weights here than where "
                            f"{folder} was made ({name} differs; another transformers version converted it?)")


@contextmanager
def _torch_threads(count: int):
    """Torch's intra-op threads set to ``count`` inside the block. Rebuilding is memory-bound, and
    idle torch threads spin on the cores that the writing and hashing threads need."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy(path: Path, out: Path) -> str:
    """Copy a file, returning the sha256 of what was written."""
    with open(path, "rb") as f, _HashedFile(out) as copy:
        while chunk := f.read(_CHUNK):
            copy.write(chunk)
    return copy.digest


def _files_of(checkpoint: Path) -> list[Path]:
    """The checkpoint's files; a checkpoint folder holds no folders."""
    entries = sorted(Path(checkpoint).iterdir())
    for entry in entries:
        if not entry.is_file():
            raise UserError(f"{entry} is not a file; a checkpoint folder holds only files")
    return entries


def _same_file(path: Path, digest: str) -> bool:
    return path.is_file() and file_digest(path) == digest


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view of the same width: bit-for-bit comparison (-0.0 is not 0.0, NaN equals itself)."""
    return tensor.contiguous().view(SAME_WIDTH_INT[tensor.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _weights_recipe(path: Path, digest: str, dense: "_SourceTensors", masks: "_HashedFile",
                    values: "_HashedFile") -> FileRecipe:
    header = safetensors_header(path)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for name in _tensor_order(json.loads(header)):
            tensors[name] = _tensor_recipe(f.get_tensor(name), dense.get(name), masks, values)
    return FileRecipe(sha256=digest, kind="weights", header=header, tensors=tensors)


def _tensor_recipe(written: torch.Tensor, source: torch.Tensor | None, masks: "_HashedFile",
                   values: "_HashedFile") -> TensorRecipe:
    """The cheapest recipe that gives ``written`` back bit for bit."""
    if source is None or source.shape != written.shape or not (written.is_floating_point() and source.is_floating_point()):
        return TensorRecipe(form="whole", values=values.write(written))
    source = source.to(written.dtype)
    if _same_bits(source, written):
        return TensorRecipe(form="source")
    kept = _bits(written) != 0
    mask = masks.write(torch.from_numpy(np.packbits(kept.reshape(-1).numpy())))
    if _same_bits(kept_only(source, kept), written):
        return TensorRecipe(form="mask", mask=mask)
    return TensorRecipe(form="values", mask=mask, values=values.write(written[kept]))


def _write_weights(path: Path, recipe: FileRecipe, dense: "_SourceTensors", blobs: "_BlobReader") -> str:
    """Write a weight file from its recipe: the recorded header, then every tensor's bytes in the
    header's order. Returns the sha256 of what was written."""
    header = recipe.header.encode("utf-8")
    layout = json.loads(header)
    with _HashedFile(path) as f:
        f.write(struct.pack("<Q", len(header)) + header)
        position = 0
        for name in _tensor_order(layout):
            info = layout[name]
            begin, end = info["data_offsets"]
            if name not in recipe.tensors or begin != position:
                raise UserError(f"lineage form {blobs.folder} is corrupt: the recipe of {path.name} does not cover {name}")
            tensor = _rebuild(name, recipe.tensors[name], getattr(torch, SAFETENSORS_DTYPES[info["dtype"]]), info["shape"], dense, blobs)
            if f.write(tensor)[1] != end - begin:
                raise UserError(f"lineage form {blobs.folder} is corrupt: {name} has the wrong size")
            position = end
    return f.digest


def _rebuild(name: str, recipe: TensorRecipe, dtype: torch.dtype, shape: list[int], dense: "_SourceTensors",
             blobs: "_BlobReader") -> torch.Tensor:
    if recipe.form == "whole":
        return blobs.tensor(recipe.values, dtype, name).reshape(shape)
    source = dense.get(name)
    if source is None or list(source.shape) != list(shape):
        raise UserError(f"the source model has no tensor {name} of shape {shape}; it is not this checkpoint's source")
    source = source.to(dtype)
    if recipe.form == "source":
        return source
    if recipe.form == "mask":
        return kept_only(source, blobs.mask(recipe.mask, source.shape, name))
    kept = blobs.mask(recipe.mask, source.shape, name)
    kept_values = blobs.tensor(recipe.values, dtype, name)
    if kept_values.numel() != (count := int(torch.count_nonzero(kept))):
        raise UserError(f"lineage form {blobs.folder} is corrupt: {name} keeps {count} weights "
                        f"but stores {kept_values.numel()} values")
    return _scattered(kept, kept_values)


def _scattered(kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``kept`` with ``values`` at its True entries in order: what
    ``masked_scatter_`` gives, 2.5x faster on the CPU, by index in slices that bound the memory of
    the int64 indices."""
    out, flags, taken = torch.zeros(kept.numel(), dtype=values.dtype), kept.reshape(-1).numpy(), 0
    for start in range(0, out.numel(), _SCATTER_SLICE):
        where = torch.from_numpy(np.flatnonzero(flags[start:start + _SCATTER_SLICE]))
        out[start:].index_copy_(0, where, values[taken:taken + where.numel()])
        taken += where.numel()
    return out.reshape(kept.shape)


def _tensor_order(layout: dict) -> list[str]:
    """Tensor names of a parsed safetensors header, in the order of their bytes in the file."""
    return sorted((n for n in layout if n != "__metadata__"), key=lambda n: layout[n]["data_offsets"][0])


class _SourceTensors:
    """The source folder's tensors by name, read lazily from its safetensors files."""

    def __init__(self, folder: Path):
        self.folder, self._stack, self._where = Path(folder), ExitStack(), {}

    def __enter__(self):
        for path in weight_files(self.folder):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            self._where.update(dict.fromkeys(handle.keys(), handle))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def get(self, name: str) -> torch.Tensor | None:
        handle = self._where.get(name)
        return handle.get_tensor(name) if handle is not None else None


class _HashedFile:
    """A new file written in appends and hashed on the way, each in a thread of its own (file
    writes and hashlib release the GIL), so writing, hashing and the work that produces the next
    bytes overlap: on two cores, a rebuild is bound by one sha256 pass and not by hash + write."""

    def __init__(self, path: Path):
        self._file, self._hash, self._size, self._error = open(path, "xb"), hashlib.sha256(), 0, None
        # Buffers handed over, not yet written / hashed: each thread takes every buffer in order.
        self._pending = (queue.Queue(maxsize=4), queue.Queue(maxsize=4))
        self._threads = [threading.Thread(target=self._drain, args=(pending, consume), daemon=True)
                         for pending, consume in zip(self._pending, (self._file.write, self._hash.update))]
        for thread in self._threads:
            thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, data) -> tuple[int, int]:
        """Append ``data`` (bytes, or a tensor's raw bytes); returns its span ``(offset, bytes)``."""
        if isinstance(data, torch.Tensor):
            data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._raise_error()
        for pending in self._pending:
            pending.put(data)
        size = memoryview(data).nbytes
        span, self._size = (self._size, size), self._size + size
        return span

    def close(self) -> None:
        """Wait for every write; raises what a write raised (a full disk)."""
        for pending, thread in zip(self._pending, self._threads):
            if thread.is_alive():
                pending.put(None)
                thread.join()
        self._file.close()
        self._raise_error()

    @property
    def digest(self) -> str:
        """The sha256 of everything written (after ``close``)."""
        return self._hash.hexdigest()

    def _drain(self, pending: queue.Queue, consume) -> None:
        while (data := pending.get()) is not None:
            if self._error is None:
                try:
                    consume(data)
                except OSError as exc:
                    self._error = exc  # raised in the producer's thread; keep taking its buffers

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _BlobReader:
    """Spans of a lineage form's blobs as tensors; a short read is corruption."""

    def __init__(self, folder: Path):
        self.folder, self._stack = Path(folder), ExitStack()

    def __enter__(self):
        self._files = {name: self._stack.enter_context(open(self.folder / name, "rb")) for name in (MASKS, VALUES)}
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _read(self, blob: str, span: tuple[int, int] | None, name: str) -> bytearray:
        offset, size = span or (0, -1)
        self._files[blob].seek(offset)
        data = bytearray(self._files[blob].read(size))
        if span is None or len(data) != size:
            raise UserError(f"lineage form {self.folder} is corrupt: {blob} is too short for {name}")
        return data

    def tensor(self, span, dtype: torch.dtype, name: str) -> torch.Tensor:
        data = self._read(VALUES, span, name)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)

    def mask(self, span, shape, name: str) -> torch.Tensor:
        """The kept weights of a tensor of ``shape``."""
        packed = np.frombuffer(self._read(MASKS, span, name), dtype=np.uint8)
        bits = np.unpackbits(packed, count=math.prod(shape))
        return torch.from_numpy(bits.view(bool)).reshape(shape)

