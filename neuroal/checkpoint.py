"""Pruned checkpoints: a Hugging Face model folder plus ``neuroal.json``, written atomically.

The folder is built under a temporary name beside the destination and renamed into place, so a
reader sees either no folder or a complete one; what a killed writer left is removed by the next
save to the same destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from neuroal.digests import file_digest, pickle_weight_files, weight_files
from neuroal.errors import UserError
from neuroal.files import staged_folder

MANIFEST = "neuroal.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceRecord(_Record):
    """The model a checkpoint was pruned from (``ModelSource.to_dict``)."""

    spec: str
    kind: Literal["alias", "gguf", "folder", "hub"]
    digest: str


class CalibrationRecord(_Record):
    """The calibration windows a checkpoint was pruned with (``CalibrationSpec`` and its digest)."""

    corpus: str
    nsamples: int
    seqlen: int
    seed: int
    bos_per_window: bool
    corpus_digest: Optional[str]
    digest: str


class Manifest(_Record):
    """``neuroal.json``: what a pruned checkpoint is and how it was made. Written and read only
    through this model, so every reader sees the same typed fields.

    Attributes:
        source: The dense model.
        method, top_up, structure: How it was pruned.
        target_sparsity, achieved_sparsity: Over every prunable weight (every linear's and every
            expert's of the decoder blocks); the achieved one counted from the weights.
        block_sparsity: Achieved sparsity of each decoder block, counted over all its weights.
        module_sparsity: Achieved sparsity per prunable matrix, by full name (an expert's:
            ``...mlp.experts.down_proj.<expert>``).
        unreached_experts: Experts that no calibration token reached, pruned by magnitude.
        summary: The allocator's decisive numbers (``Allocator.summary``: NeuroAl's
            ``block_lambda``/``row_lambda``, ATP's ``beta``, OWL's ``variant``); empty for others.
        allocation: What the allocator found (its own keys: OWL's ratios, NeuroAl's search, ...).
        calibration: The calibration windows (None when the cell read no data).
        seed, config: The seed and the whole cell config (``PruneConfig.model_dump``).
        device, device_kind, dtype, versions, results_version: Where (``cuda:0``, and the GPU model
            or ``cpu``), in what dtype and with what code it was computed.
        save_dtype: The dtype its weights are written in (None: ``dtype``, in checkpoints that
            predate the field).
        timings: Seconds per stage (load, calibration, allocate, prune).
        files: sha256 of each weight file, filled in by ``save_checkpoint``.
    """

    source: SourceRecord
    method: str
    top_up: str
    structure: str = "unstructured"
    target_sparsity: float
    achieved_sparsity: float
    block_sparsity: list[float] = []
    module_sparsity: dict[str, float]
    unreached_experts: list[str] = []
    summary: dict = {}
    allocation: dict = {}
    calibration: Optional[CalibrationRecord] = None
    seed: int
    config: dict
    device: str
    device_kind: str = ""
    dtype: str
    save_dtype: Optional[str] = None
    versions: dict[str, str]
    results_version: int
    timings: dict[str, float]
    files: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _before_summaries(cls, data):
        """Manifests written before allocators summarised themselves kept NeuroAl's ``mode`` and
        ``lambdas`` as fields of their own; they read as that summary."""
        if not isinstance(data, dict) or not {"mode", "lambdas"} & data.keys():
            return data
        data = dict(data)
        lambdas, mode = data.pop("lambdas", None) or {}, data.pop("mode", None)
        if lambdas:
            data.setdefault("summary", {"block_lambda": lambdas.get("block"), "row_lambda": lambdas.get("row"),
                                        "mode": mode})
        return data


def save_checkpoint(model, tokenizer, manifest: Manifest, out: Path, overwrite: bool = False, extras=None) -> Manifest:
    """Write ``model``, ``tokenizer`` and ``manifest`` (plus weight digests) to the folder ``out``.

    ``extras`` maps file names to writers ``f(path)`` (plots) run inside the folder before it is
    renamed into place. Returns the manifest as written. Refuses an existing ``out`` unless
    ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another --out or pass --overwrite")
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = manifest.model_copy(update={"files": {p.name: file_digest(p) for p in weight_files(tmp)}})
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        for name, write in (extras or {}).items():
            write(tmp / name)
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> Manifest:
    """Read a checkpoint's manifest; with ``verify``, refuse a checkpoint whose weight files are not
    exactly the recorded ones with their recorded digests."""
    manifest = read_record(Manifest, Path(folder) / MANIFEST, f"{folder} is not a readable neuroal checkpoint")
    if verify:
        _verify_weights(Path(folder), manifest)
    return manifest


def read_record(record: type[BaseModel], path: Path, problem: str) -> BaseModel:
    """The JSON file ``path`` as the typed ``record``; a missing, unreadable or invalid file is one
    ``UserError`` line: ``problem``, then the file and what is wrong with it."""
    try:
        return record.model_validate_json(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{problem} ({Path(path).name}: {exc})") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        raise UserError(f"{problem} ({Path(path).name}: {'.'.join(map(str, error['loc'])) or 'file'}: "
                        f"{error['msg']})") from None


def _verify_weights(folder: Path, manifest: Manifest) -> None:
    recorded = manifest.files
    if not recorded:
        raise UserError(f"checkpoint {folder} is corrupt: {MANIFEST} records no weight digests")
    present = {p.name for p in weight_files(folder) + pickle_weight_files(folder)}
    for name in sorted(present - set(recorded)):
        raise UserError(f"checkpoint {folder} is corrupt: {name} is not one of its recorded weight files")
    for name, digest in recorded.items():
        weights = folder / name
        if not weights.is_file() or file_digest(weights) != digest:
            raise UserError(f"checkpoint {folder} is corrupt: {name} does not match its recorded digest")
