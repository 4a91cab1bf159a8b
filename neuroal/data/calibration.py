"""Calibration sampling with the semantics of the authors' reference (wanda's ``get_c4``).

For each sample: draw a random train document until one is longer than ``seqlen`` tokens, then
draw a random offset and take the ``seqlen``-token window there. Stream corpora (one document)
skip the document draw, as the reference does for WikiText-2 and PTB. The random draws are
exactly the reference's, so the same seed gives the same windows; unlike the reference, each
document is tokenized at most once per call.

With a BOS per window (``neuroal.data.windows``: Gemma's families, or ``--bos-per-window on``)
documents are tokenized without special tokens, the draw takes ``seqlen - 1`` tokens with the
same random calls, and BOS is put in front: every window still has ``seqlen`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from neuroal.data.corpora import corpus_digest, get_corpus, load_documents
from neuroal.data.windows import window_bos_id
from neuroal.errors import UserError
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSpec:
    """What to draw: ``nsamples`` windows of ``seqlen`` tokens from ``corpus``'s train split.

    Attributes:
        corpus: A corpus name or the path of a user corpus.
        nsamples: How many windows.
        seqlen: Tokens per window, BOS included when ``bos_per_window``.
        seed: Seeds the draw.
        bos_per_window: Whether each window is BOS + ``seqlen - 1`` corpus tokens (resolved, not ``auto``).
        corpus_digest: ``corpus_digest(corpus)`` of the text drawn from; ``sample_calibration``
            records it (None in a spec not drawn yet).
    """

    corpus: str
    nsamples: int
    seqlen: int
    seed: int
    bos_per_window: bool = False
    corpus_digest: str | None = None

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
        spec: Corpus, sample count, window length, seed and whether windows start with BOS.

    Returns:
        The windows, deterministic for a given tokenizer and spec; its spec records the corpus
        digest of the text read.

    Raises:
        UserError: Bad counts, an unknown corpus, no BOS token where one is asked for, or no
            document longer than the window.
    """
    _check_spec(spec)
    spec = replace(spec, corpus_digest=corpus_digest(spec.corpus))
    tokens = _DocumentTokens(tokenizer, load_documents(spec.corpus, "train"), spec.bos_per_window)
    rng = random.Random(spec.seed)
    rows = [_draw_window(rng, tokens, spec) for _ in progress(range(spec.nsamples), desc="calibration")]
    input_ids = torch.stack(rows).to(torch.long)
    logger.info("drew %d x %d tokens from %s (BOS per window: %s)", spec.nsamples, spec.seqlen, spec.corpus,
                spec.bos_per_window)
    return CalibrationSet(spec=spec, input_ids=input_ids, digest=calibration_digest(input_ids, spec))


def check_calibration_documents(tokenizer, corpus: str, seqlen: int, bos_per_window: bool = False) -> None:
    """Fail early unless some train document can fill a window (what ``sample_calibration`` needs).

    Args:
        tokenizer: The model's tokenizer.
        corpus: A corpus name or user corpus path.
        seqlen: Tokens per window, BOS included when ``bos_per_window``.
        bos_per_window: Whether windows start with BOS (resolved).

    Raises:
        UserError: No train document is long enough, or BOS is asked for and there is none.
    """
    tokens = _DocumentTokens(tokenizer, load_documents(corpus, "train"), bos_per_window)
    need = _window_body(seqlen, bos_per_window)
    for index in range(len(tokens.documents)):
        if len(tokens.ids(index)) > need:
            return
    raise _no_long_document(tokens, corpus, seqlen)


def calibration_digest(input_ids: torch.Tensor, spec: CalibrationSpec) -> str:
    """Return sha256 hex over the ids as little-endian int64 bytes, then the spec as sorted JSON."""
    digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes())
    digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _check_spec(spec: CalibrationSpec) -> None:
    get_corpus(spec.corpus)  # an unknown name fails here, before any loading
    if spec.nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {spec.nsamples}")
    if spec.seqlen < 1 + spec.bos_per_window:
        raise UserError(f"--seqlen must be at least {1 + spec.bos_per_window}"
                        f"{' with a BOS per window' if spec.bos_per_window else ''}, got {spec.seqlen}")


def _window_body(seqlen: int, bos_per_window: bool) -> int:
    """Corpus tokens per window: all of them, or all but the BOS put in front."""
    return seqlen - 1 if bos_per_window else seqlen


class _DocumentTokens:
    """Token ids of documents, tokenized on first use; tracks which are too short to sample.

    With ``bos_per_window`` documents are tokenized without special tokens (the window's own BOS
    replaces the tokenizer's), and ``bos`` is the id put in front of each window.
    """

    def __init__(self, tokenizer, documents: list[str], bos_per_window: bool = False):
        self.tokenizer = tokenizer
        self.documents = documents
        self.bos = window_bos_id(tokenizer) if bos_per_window else None
        self.cache: dict[int, torch.Tensor] = {}
        self.too_short: set[int] = set()

    def ids(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            # The default call without BOS per window: exactly the reference's tokenization.
            extra = {"add_special_tokens": False} if self.bos is not None else {}
            self.cache[index] = self.tokenizer(self.documents[index], return_tensors="pt", **extra).input_ids[0]
        return self.cache[index]


def _draw_window(rng: random.Random, tokens: _DocumentTokens, spec: CalibrationSpec) -> torch.Tensor:
    """One reference draw: a document longer than the window body (redrawn until found), then an
    offset; BOS in front when the spec asks for it."""
    count = len(tokens.documents)
    if count == 0:
        raise UserError(f"corpus {spec.corpus!r} has no train documents; choose another corpus")
    body = _window_body(spec.seqlen, spec.bos_per_window)
    while True:
        # A single-document (stream) corpus skips the document draw, as the reference does.
        index = 0 if count == 1 else rng.randint(0, count - 1)
        ids = tokens.ids(index)
        if len(ids) > body:
            break
        tokens.too_short.add(index)
        if len(tokens.too_short) == count:  # every document is now known too short: stop, don't spin
            raise _no_long_document(tokens, spec.corpus, spec.seqlen)
    offset = rng.randint(0, len(ids) - body - 1)
    window = ids[offset : offset + body]
    if tokens.bos is not None:
        window = torch.cat([window.new_tensor([tokens.bos]), window])
    return window


def _no_long_document(tokens: _DocumentTokens, corpus: str, seqlen: int) -> UserError:
    longest = max((len(ids) for ids in tokens.cache.values()), default=0)
    if tokens.bos is None:
        need = f"--seqlen {seqlen} tokens"
    else:
        need = f"{seqlen - 1} tokens (--seqlen {seqlen} less the BOS put in front of each window)"
    return UserError(f"no {corpus!r} train document is longer than {need} (the longest has {longest}); "
                     "use a smaller --seqlen or another corpus")


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
