"""Deterministic train/test splits by a hash of each document's key (no order, no random state)."""

from __future__ import annotations

import hashlib

from neuroal.errors import UserError

SPLITS = ("train", "test")

# Share of documents that a per-document split sends to test: the usual 90/10 held-out split.
TEST_PERCENT = 10


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def in_test_split(key: str) -> bool:
    """Assign a document to test by a hash of its key: deterministic and independent of order."""
    return _key_hash(key) % 100 < TEST_PERCENT


def split_documents(documents: list[str], split: str, corpus: str) -> list[str]:
    """One split of user documents, each assigned by a hash of its text (``in_test_split``).

    Small corpora can hash every document to one side; then the document with the lowest hash
    goes to test (or the highest to train), so both splits are non-empty. Documents keep their
    order; equal texts share a split, so train and test never hold the same text.

    Args:
        documents: Every document of the corpus, in a fixed order.
        split: ``"train"`` or ``"test"``.
        corpus: The corpus name, for the error message.

    Raises:
        UserError: Fewer than two distinct documents (train and test cannot both be filled).
    """
    distinct = set(documents)
    if len(distinct) < 2:
        raise UserError(f"corpus {corpus!r} has {len(distinct)} distinct document(s); a train/test split "
                        "needs at least 2 (more files, JSONL lines or blank-line-separated paragraphs)")
    test = {doc for doc in distinct if in_test_split(doc)}
    if not test:
        test = {min(distinct, key=_key_hash)}
    elif test == distinct:
        test = distinct - {max(distinct, key=_key_hash)}
    want_test = split == "test"
    return [doc for doc in documents if (doc in test) == want_test]
