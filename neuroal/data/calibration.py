"""Calibration sampling with the semantics of the authors' reference (wanda's ``get_c4``).

For each sample: draw a random train document until one is longer than ``seqlen`` tokens, then
draw a random offset and take the ``seqlen``-token window there. Stream corpora (one document)
skip the document draw, as the reference does for WikiText-2 and PTB. The random draws are
exactly the reference's, so the same seed gives the same windows; unlike the reference, each
document is tokenized at most once per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neuroal.data.corpora import get_corpus, load_documents
from neuroal.errors import UserError
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSpec:
    """What to draw: ``nsamples`` windows of ``seqlen`` tokens from ``corpus``'s train split."""

    corpus: str
    nsamples: int
    seqlen: int
    seed: int

    def to_dict(self) -> dict:
        """Return the spec as a JSON-ready dict (for manifests and digests)."""
        return asdict(self)


@dataclass
class CalibrationSet:
    """A drawn calibration set.

    Attributes:
        spec: The spec it was drawn with.
        input_ids: ``[nsamples, seqlen]`` int64 token ids.
        digest: sha256 hex of the ids (little-endian int64, row-major) and the spec.
    """

    spec: CalibrationSpec
    input_ids: torch.LongTensor
    digest: str

    def search_set(self, search_nsamples: int) -> torch.LongTensor:
        """Return the first ``search_nsamples`` rows: a subset of the same draw.

        Args:
            search_nsamples: How many rows, between 1 and ``spec.nsamples``.

        Raises:
            UserError: ``search_nsamples`` is out of range.
        """
        if not 1 <= search_nsamples <= self.spec.nsamples:
            raise UserError(
                f"--search-nsamples {search_nsamples} must be between 1 and --nsamples {self.spec.nsamples}; "
                "lower --search-nsamples or raise --nsamples"
            )
        return self.input_ids[:search_nsamples].clone()


def sample_calibration(tokenizer, spec: CalibrationSpec) -> CalibrationSet:
    """Draw calibration windows from the train split of ``spec.corpus``.

    Args:
        tokenizer: A Hugging Face tokenizer; ``tokenizer(text, return_tensors="pt").input_ids``.
        spec: Corpus, sample count, window length and seed.

    Returns:
        The windows, deterministic for a given tokenizer and spec.

    Raises:
        UserError: Bad counts, an unknown corpus, or no document longer than ``seqlen`` tokens.
    """
    _check_spec(spec)
    documents = load_documents(spec.corpus, "train")
    tokens = _DocumentTokens(tokenizer, documents)
    rng = random.Random(spec.seed)
    rows = [_draw_window(rng, tokens, spec) for _ in progress(range(spec.nsamples), desc="calibration")]
    input_ids = torch.stack(rows).to(torch.long)
    logger.info("drew %d x %d tokens from %s", spec.nsamples, spec.seqlen, spec.corpus)
    return CalibrationSet(spec=spec, input_ids=input_ids, digest=calibration_digest(input_ids, spec))


def calibration_digest(input_ids: torch.Tensor, spec: CalibrationSpec) -> str:
    """Return sha256 hex over the ids as little-endian int64 bytes, then the spec as sorted JSON."""
    digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes())
    digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _check_spec(spec: CalibrationSpec) -> None:
    get_corpus(spec.corpus)  # an unknown name fails here, before any loading
    if spec.nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {spec.nsamples}")
    if spec.seqlen < 1:
        raise UserError(f"--seqlen must be at least 1, got {spec.seqlen}")


class _DocumentTokens:
    """Token ids of documents, tokenized on first use; tracks which are too short to sample."""

    def __init__(self, tokenizer, documents: list[str]):
        self.tokenizer = tokenizer
        self.documents = documents
        self.cache: dict[int, torch.Tensor] = {}
        self.too_short: set[int] = set()

    def ids(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            self.cache[index] = self.tokenizer(self.documents[index], return_tensors="pt").input_ids[0]
        return self.cache[index]


def _draw_window(rng: random.Random, tokens: _DocumentTokens, spec: CalibrationSpec) -> torch.Tensor:
    """One reference draw: a document longer than seqlen (redrawn until found), then an offset."""
    count = len(tokens.documents)
    if count == 0:
        raise UserError(f"corpus {spec.corpus!r} has no train documents; choose another corpus")
    while True:
        # A single-document (stream) corpus skips the document draw, as the reference does.
        index = 0 if count == 1 else rng.randint(0, count - 1)
        ids = tokens.ids(index)
        if len(ids) > spec.seqlen:
            break
        tokens.too_short.add(index)
        if len(tokens.too_short) == count:  # every document is now known too short: stop, don't spin
            raise _no_long_document(tokens, spec)
    offset = rng.randint(0, len(ids) - spec.seqlen - 1)
    return ids[offset : offset + spec.seqlen]


def _no_long_document(tokens: _DocumentTokens, spec: CalibrationSpec) -> UserError:
    longest = max(len(ids) for ids in tokens.cache.values())
    return UserError(
        f"no {spec.corpus!r} train document is longer than --seqlen {spec.seqlen} tokens "
        f"(the longest has {longest}); use a smaller --seqlen or another corpus"
    )


def save_calibration(calibration: CalibrationSet, path: Path) -> None:
    """Write a calibration set to a safetensors file (atomically), its spec and digest as metadata."""
    metadata = {"spec": json.dumps(calibration.spec.to_dict()), "digest": calibration.digest}
    write_tensors_atomic(path, {"input_ids": calibration.input_ids.contiguous()}, metadata)


def load_calibration(path: Path) -> CalibrationSet | None:
    """A calibration set written by ``save_calibration``; None when absent, unreadable or its ids
    no longer match the recorded digest (the caller draws it again)."""
    loaded = read_tensors(path)
    if loaded is None:
        return None
    tensors, metadata = loaded
    try:
        spec = CalibrationSpec(**json.loads(metadata["spec"]))
        input_ids = tensors["input_ids"]
    except (KeyError, TypeError, ValueError):
        return None
    if calibration_digest(input_ids, spec) != metadata.get("digest"):
        logger.warning("calibration file %s does not match its digest; drawing it again", path)
        return None
    return CalibrationSet(spec, input_ids, metadata["digest"])
