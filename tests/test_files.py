"""Atomic writes and self-checking cache entries."""

from __future__ import annotations

import json
import os

import pytest

from neuroal.files import read_checked_json, write_checked_json, write_json_atomic


def test_checked_json_round_trip_and_corruption(tmp_path):
    path = tmp_path / "cache.json"
    payload = [["Title", "Some text."], ["Other", "More text."]]
    assert read_checked_json(path) is None
    write_checked_json(path, payload)
    assert read_checked_json(path) == payload
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left behind
    path.write_text(path.read_text()[:-10])  # truncated
    assert read_checked_json(path) is None
    write_checked_json(path, payload)
    path.write_text(path.read_text().replace("Some text.", "Tampered."))  # valid JSON, bad checksum
    assert read_checked_json(path) is None


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"ppl": 1.5})

    def rename_fails(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", rename_fails)  # dies after the temporary file is written
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"ppl": 2.5})
    assert json.loads(path.read_text()) == {"ppl": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
