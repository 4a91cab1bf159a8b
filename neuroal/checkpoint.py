"""Pruned checkpoints: a Hugging Face model folder plus ``neuroal.json``, written atomically.

The folder is built under a temporary name beside the destination and renamed into place, so a
reader sees either no folder or a complete one; what a killed writer left is removed by the next
save to the same destination.
"""

from __future__ import annotations

import json
from pathlib import Path

from neuroal.digests import file_digest, pickle_weight_files, weight_files
from neuroal.errors import UserError
from neuroal.files import staged_folder

MANIFEST = "neuroal.json"


def save_checkpoint(model, tokenizer, manifest: dict, out: Path, overwrite: bool = False, extras=None) -> dict:
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
        manifest = {**manifest, "files": {p.name: file_digest(p) for p in weight_files(tmp)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        for name, write in (extras or {}).items():
            write(tmp / name)
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """Read a checkpoint's manifest; with ``verify``, refuse a checkpoint whose weight files are not
    exactly the recorded ones with their recorded digests."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder} is not a readable neuroal checkpoint ({MANIFEST}: {exc})") from None
    if verify:
        _verify_weights(Path(folder), manifest)
    return manifest


def _verify_weights(folder: Path, manifest: dict) -> None:
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise UserError(f"checkpoint {folder} is corrupt: {MANIFEST} records no weight digests")
    present = {p.name for p in weight_files(folder) + pickle_weight_files(folder)}
    for name in sorted(present - set(recorded)):
        raise UserError(f"checkpoint {folder} is corrupt: {name} is not one of its recorded weight files")
    for name, digest in recorded.items():
        weights = folder / name
        if not weights.is_file() or file_digest(weights) != digest:
            raise UserError(f"checkpoint {folder} is corrupt: {name} does not match its recorded digest")
