"""The allocators' searches and the sequential loop give the masks recorded from the code before
they were rebuilt (``tests/recorded_masks.py``), bit for bit, on tiny families and SmolLM2."""

from __future__ import annotations

import json

import pytest

from recorded_masks import CELLS, RECORDED, model_folders, record_of



@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, str]:
    return model_folders(tmp_path_factory.mktemp("recorded-masks"), tokenizer)


@pytest.mark.parametrize(
    "name, key, fields",
    [pytest.param(*cell, id=cell[0], marks=[pytest.mark.slow] if cell[1] == "smollm2" else []) for cell in CELLS],
)
def test_masks_are_the_recorded_ones(name, key, fields, folders, tmp_path):
    recorded = json.loads(RECORDED.read_text())[name]
    record = record_of(folders[key], fields, tmp_path)
    assert record["chosen"] == recorded["chosen"]
    assert record["masks"] == recorded["masks"], f"{name}: masks differ from the recorded code's"
