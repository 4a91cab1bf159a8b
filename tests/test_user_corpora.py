"""User corpora (a text file, a folder, a JSONL file), the python-stdlib code corpus, corpus
digests in cache keys, and `neuroal prune --calib FILE` / `neuroal eval --ppl FILE`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from neuroal.checkpoint import read_manifest
from neuroal.cli import main
from neuroal.config import EvalConfig, PruneConfig
from neuroal.data import (
    CalibrationSpec,
    corpus_digest,
    get_corpus,
    load_documents,
    load_text,
    sample_calibration,
)
from neuroal.data import local
from neuroal.errors import UserError


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """Real English text to write into user corpora: 40 Lee news stories."""
    return load_documents("lee", "train")[:40]


@pytest.fixture
def text_file(tmp_path, stories) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(stories) + "\n")
    return path


@pytest.fixture
def folder(tmp_path, stories) -> Path:
    root = tmp_path / "docs"
    for i, story in enumerate(stories):
        file = root / f"part{i % 3}" / f"{i:02d}.txt"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(story)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("never read")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    return root


@pytest.fixture
def jsonl(tmp_path, stories) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": story}) for i, story in enumerate(stories)]
    path.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")  # a blank line is skipped
    return path


def both_splits(name) -> tuple[list[str], list[str]]:
    return load_documents(str(name), "train"), load_documents(str(name), "test")


def assert_split_is_disjoint_and_deterministic(name) -> None:
    train, test = both_splits(name)
    assert train and test and not set(train) & set(test)
    assert both_splits(name) == (train, test)


# ------------------------------------------------------------------------------------------
# the three forms


def test_text_file_splits_paragraphs_into_two_streams(text_file, stories):
    assert_split_is_disjoint_and_deterministic(text_file)
    (train,), (test,) = both_splits(text_file)  # one stream document per split
    train_paragraphs, test_paragraphs = train.split("\n\n"), test.split("\n\n")
    assert not set(train_paragraphs) & set(test_paragraphs)
    assert sorted(train_paragraphs + test_paragraphs) == sorted(stories)
    assert [p for p in stories if p in train_paragraphs] == train_paragraphs  # file order kept


def test_text_file_without_blank_lines_splits_lines(tmp_path, stories):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(stories))
    (train,), (test,) = both_splits(path)
    assert sorted(train.split("\n\n") + test.split("\n\n")) == sorted(stories)


def test_folder_is_one_document_per_file(folder, stories):
    assert_split_is_disjoint_and_deterministic(folder)
    train, test = both_splits(folder)
    assert sorted(train + test) == sorted(stories)  # hidden files and folders are not read
    files = sorted(folder.rglob("??.txt"), key=lambda p: p.relative_to(folder).as_posix())
    in_order = [f.read_text() for f in files]
    assert train == [doc for doc in in_order if doc in train]


def test_jsonl_is_one_document_per_line(jsonl, stories):
    assert_split_is_disjoint_and_deterministic(jsonl)
    train, test = both_splits(jsonl)
    assert sorted(train + test) == sorted(stories)
    assert 1 <= len(test) <= 10  # about a tenth held out


def test_split_is_by_content_not_position(folder, tmp_path, stories):
    """Another folder holding the same texts under other names splits them the same way."""
    other = tmp_path / "shuffled"
    other.mkdir()
    for i, story in enumerate(reversed(stories)):
        (other / f"doc{i:02d}.md").write_text(story)
    assert set(load_documents(str(other), "test")) == set(load_documents(str(folder), "test"))


def test_tiny_corpus_still_fills_both_splits(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    train, test = both_splits(path)
    assert len(train) == 1 and len(test) == 1 and train != test


def test_named_corpus_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("lee").write_text("a\n\nb\n")
    assert get_corpus("lee").identity is None and corpus_digest("lee") == "lee"
    assert sorted(load_documents("./lee", "train") + load_documents("./lee", "test")) == ["a", "b"]


# ------------------------------------------------------------------------------------------
# digests


def test_digest_follows_content(text_file, tmp_path):
    first = corpus_digest(str(text_file))
    assert first.startswith("sha256:") and corpus_digest(str(text_file)) == first
    renamed = tmp_path / "elsewhere.txt"
    shutil.copy(text_file, renamed)
    assert corpus_digest(str(renamed)) == first  # the bytes, not the name
    text_file.write_text(text_file.read_text().replace("the", "a", 1))
    assert corpus_digest(str(text_file)) != first


def test_folder_digest_follows_any_file_and_its_name(folder):
    first = corpus_digest(str(folder))
    (folder / "part1" / "01.txt").write_text("changed text")
    second = corpus_digest(str(folder))
    assert second != first
    (folder / "part1" / "01.txt").rename(folder / "part1" / "99.txt")
    assert corpus_digest(str(folder)) != second
    (folder / ".hidden" / "skip.txt").write_text("still never read")
    assert corpus_digest(str(folder)) == corpus_digest(str(folder))


def test_named_corpora_have_stable_identities():
    assert [corpus_digest(n) for n in ("wikipedia", "treebank", "lee", "c4")] == ["wikipedia", "treebank", "lee", "c4"]


def test_calibration_records_the_corpus_digest(tokenizer, jsonl):
    drawn = sample_calibration(tokenizer, CalibrationSpec(str(jsonl), 4, 16, 0))
    assert drawn.spec.corpus_digest == corpus_digest(str(jsonl))
    jsonl.write_text(jsonl.read_text().replace("the", "a"))
    again = sample_calibration(tokenizer, CalibrationSpec(str(jsonl), 4, 16, 0))
    assert again.spec.corpus_digest != drawn.spec.corpus_digest and again.digest != drawn.digest


def test_task_cache_keys_change_with_the_corpus_content(tiny_llama, jsonl, tmp_path):
    """The campaign's calibration file and metrics key are named by the corpus content."""
    from neuroal.pipeline import Plan
    from tasks.cells import calibration, evaluate

    config = PruneConfig(model=str(tiny_llama), method="wanda", sparsity=0.5, calib=str(jsonl), nsamples=2, seqlen=16)
    settings = EvalConfig(ppl=[str(jsonl)], limit=1, seqlen=16)
    cache = tmp_path / "cache"
    first = calibration.fn(Plan.of(config), cache)
    measured = evaluate.fn(str(tiny_llama), settings, tmp_path / "m.json", "tiny", "weights")
    assert calibration.fn(Plan.of(config), cache) == first  # unchanged: served from its file
    jsonl.write_text(jsonl.read_text().replace("the", "a"))
    second = calibration.fn(Plan.of(config), cache)
    assert second.path != first.path and second.digest != first.digest
    again = evaluate.fn(str(tiny_llama), settings, tmp_path / "m.json", "tiny", "weights")
    assert again["key"] != measured["key"]
    assert again["corpus_digests"] == {str(jsonl): corpus_digest(str(jsonl))}


# ------------------------------------------------------------------------------------------
# python-stdlib


def test_python_stdlib_is_the_standard_library_without_tests():
    files = local.stdlib_files()
    root = local.stdlib_root()
    relative = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "asyncio/base_events.py"} <= relative
    for path in relative:
        parts = path.split("/")
        assert path.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts[:-1]), path
        assert not parts[0].startswith(("config-", "_sysconfigdata")), path
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix())


def test_python_stdlib_loads_and_is_non_trivial():
    assert_split_is_disjoint_and_deterministic("python-stdlib")
    train, test = both_splits("python-stdlib")
    assert len(train) > 300 and len(test) > 20
    assert sum(map(len, train)) > 3_000_000  # megabytes of code (~11 MB for CPython 3.11)
    assert (local.stdlib_root() / "os.py").read_text().strip() in train + test
    assert "def " in load_text("python-stdlib", "test")


def test_python_stdlib_digest_names_the_python_version():
    digest = corpus_digest("python-stdlib")
    version = ".".join(map(str, sys.version_info[:3]))
    assert digest.startswith(f"python-stdlib:{version}:sha256:") and corpus_digest("python-stdlib") == digest


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d / "missing" / "folder", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no files"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n') and d / "x.jsonl", "no string field 'text'"),
        (lambda d: (d / "y.jsonl").write_text("not json\n") and d / "y.jsonl", "line 1 is not JSON"),
        (lambda d: (d / "one.txt").write_text("just one line") and d / "one.txt", "at least 2"),
        (lambda d: (d / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and d / "bin.txt", "not UTF-8"),
    ],
)
def test_bad_user_corpus_is_a_one_line_user_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as caught:
        load_documents(str(path), "train")
    assert "\n" not in str(caught.value)


def test_unknown_name_mentions_paths():
    with pytest.raises(UserError, match="unknown corpus 'nope'.*path of a text file"):
        get_corpus("nope")


def test_corpus_too_short_for_the_window(tokenizer, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "a short line of text"}\n{"text": "another short one"}\n')
    with pytest.raises(UserError, match=r"no '.*short.jsonl' train document is longer than --seqlen 64 tokens"):
        sample_calibration(tokenizer, CalibrationSpec(str(path), 2, 64, 0))


# ------------------------------------------------------------------------------------------
# the command


def test_prune_calibrates_on_a_text_file(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["prune", "--model", str(tiny_llama), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
            "--seqlen", "16", "--calib", str(text_file), "--out", str(out)]
    assert main(args) == 0
    calibration = read_manifest(out).calibration
    assert calibration.corpus == str(text_file) and calibration.bos_per_window is False
    assert calibration.corpus_digest == corpus_digest(str(text_file))


def test_eval_perplexity_on_a_jsonl_file(tiny_llama, jsonl, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["eval", "--model", str(tiny_llama), "--ppl", f"lee,{jsonl}", "--tasks", "none", "--limit", "2",
            "--seqlen", "16", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics["ppl"]) == {"lee", str(jsonl)} and all(v > 1 for v in metrics["ppl"].values())
    assert metrics["corpus_digests"][str(jsonl)] == corpus_digest(str(jsonl))
    assert metrics["bos_per_window"] is False


@pytest.mark.parametrize("flag", ["--calib", "--ppl"])
def test_missing_corpus_file_is_exit_2(tiny_llama, tmp_path, capsys, flag):
    missing = str(tmp_path / "nowhere.jsonl")
    if flag == "--calib":
        args = ["prune", "--model", str(tiny_llama), "--method", "wanda", "--sparsity", "0.5", "--calib", missing,
                "--out", str(tmp_path / "ckpt")]
    else:
        args = ["eval", "--model", str(tiny_llama), "--ppl", missing, "--tasks", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "ckpt").exists()
