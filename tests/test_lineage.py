"""Checkpoints in the source's precision and their compact lineage forms: written and rebuilt byte
for byte (mask-only, SparseGPT's changed weights, fused experts), and refused with one line and
nothing written when a mask, a values file or the source is wrong or missing."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neuroal.lineage as lineage_module
from conftest import SMOLLM2_VOCAB, save_tiny_model, tiny_llama_config, tiny_moe_configs
from neuroal.cli import main
from neuroal.lineage import LINEAGE, MASKS, VALUES

PRUNE = ["--sparsity", "0.6", "--calib", "lee", "--nsamples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny Llama published in bfloat16, one in float32, and a Mixtral with fused experts."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_config(tiny_llama_config()).to(torch.bfloat16)
    bf16.save_pretrained(root / "bf16")
    tokenizer.save_pretrained(root / "bf16")
    return {"bf16": root / "bf16", "f32": save_tiny_model(tiny_llama_config(), tokenizer, root / "f32"),
            "moe": save_tiny_model(tiny_moe_configs(SMOLLM2_VOCAB)["MixtralForCausalLM"], tokenizer, root / "moe")}


@pytest.fixture(scope="module")
def cells(sources, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``(checkpoint, lineage form)`` per cell, each written once by ``neuroal prune --lineage``."""
    root = tmp_path_factory.mktemp("cells")
    grid = {"bf16-wanda": ("bf16", "wanda", []), "bf16-sparsegpt": ("bf16", "sparsegpt", []),
            "bf16-sparsegpt-as-bf16": ("bf16", "sparsegpt", ["--save-dtype", "bfloat16"]),
            "f32-magnitude": ("f32", "magnitude", []), "moe-wanda": ("moe", "wanda", [])}
    made = {}
    for name, (source, method, extra) in grid.items():
        out, lineage = root / name, root / f"{name}.lineage"
        assert main(["-q", "prune", "--model", str(sources[source]), "--method", method, *PRUNE, *extra,
                     "--out", str(out), "--lineage", str(lineage)]) == 0
        made[name] = out, lineage
    return made


def sha256_of_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for f in folder.glob("*.safetensors") for t in load_file(f).values()}


def test_weights_are_written_in_the_source_precision_where_that_is_lossless(cells):
    expected = {"bf16-wanda": "bfloat16", "bf16-sparsegpt": "float32", "bf16-sparsegpt-as-bf16": "bfloat16",
                "f32-magnitude": "float32"}
    for name, dtype in expected.items():
        checkpoint, _ = cells[name]
        manifest = json.loads((checkpoint / "neuroal.json").read_text())
        assert manifest["save_dtype"] == dtype and manifest["dtype"] == "float32", name
        assert stored_dtypes(checkpoint) == {getattr(torch, dtype)}, name
        # The achieved sparsity is counted from what was written.
        blocks = [t for k, t in load_file(checkpoint / "model.safetensors").items() if ".layers." in k and t.dim() == 2]
        counted = sum(int((t == 0).sum()) for t in blocks) / sum(t.numel() for t in blocks)
        assert counted == pytest.approx(manifest["achieved_sparsity"], abs=1e-12) and abs(counted - 0.6) < 0.01, name


def test_an_unknown_save_dtype_is_refused(sources, tmp_path, capsys):
    out = tmp_path / "out"
    line = _refused(["prune", "--model", str(sources["f32"]), "--method", "magnitude", "--sparsity", "0.5",
                     "--save-dtype", "int8", "--out", str(out)], capsys)
    assert "save_dtype" in line and _nothing_written(out)


def test_a_bf16_source_pruned_by_masking_keeps_its_values(sources, cells):
    source = load_file(sources["bf16"] / "model.safetensors")
    pruned = load_file(cells["bf16-wanda"][0] / "model.safetensors")
    for name, weight in pruned.items():
        kept = weight != 0
        assert torch.equal(weight[kept], source[name][kept]), name  # exactly the source's bits where kept


@pytest.mark.parametrize("name, form", [("bf16-wanda", "mask"), ("f32-magnitude", "mask"), ("moe-wanda", "mask"),
                                        ("bf16-sparsegpt", "values"), ("bf16-sparsegpt-as-bf16", "values")])
def test_a_lineage_form_rebuilds_the_checkpoint_byte_for_byte(cells, name, form, tmp_path, monkeypatch):
    monkeypatch.setattr(lineage_module, "_SCATTER_SLICE", 1000)  # kept values go back in several slices a matrix
    checkpoint, lineage = cells[name]
    recipe = json.loads((lineage / LINEAGE).read_text())
    assert recipe["form"] == form
    assert main(["materialize", "--lineage", str(lineage), "--out", str(tmp_path / "again")]) == 0
    assert sha256_of_files(tmp_path / "again") == sha256_of_files(checkpoint)


def test_the_lineage_form_stores_bits_for_masks_and_values_only_where_weights_changed(cells):
    for name in ("bf16-wanda", "moe-wanda", "bf16-sparsegpt"):
        checkpoint, lineage = cells[name]
        weights = load_file(checkpoint / "model.safetensors")
        pruned = {k: t for k, t in weights.items() if (t == 0).any()}
        tensors = json.loads((lineage / LINEAGE).read_text())["files"]["model.safetensors"]["tensors"]
        assert {k for k, t in tensors.items() if t["form"] != "source"} == set(pruned), name
        assert (lineage / MASKS).stat().st_size == sum((t.numel() + 7) // 8 for t in pruned.values()), name
        kept = sum(int((t != 0).sum()) * t.element_size() for t in pruned.values())
        assert (lineage / VALUES).stat().st_size == (kept if "sparsegpt" in name else 0), name
        assert not (lineage / "model.safetensors").exists() and not (lineage / "tokenizer.json").exists()


def _refused(argv: list[str], capsys) -> str:
    """Run ``neuroal ARGV``; it must exit 2 with one line on stderr. Returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuroal: error: "), err
    return err


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def _tampered_copy(lineage: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "lineage"
    shutil.copytree(lineage, copy)
    return copy


def test_a_flipped_bit_in_a_mask_is_refused(cells, tmp_path, capsys):
    lineage = _tampered_copy(cells["bf16-wanda"][1], tmp_path)
    masks = bytearray((lineage / MASKS).read_bytes())
    masks[len(masks) // 2] ^= 0x10
    (lineage / MASKS).write_bytes(masks)
    out = tmp_path / "out"
    assert "masks.bin" in _refused(["materialize", "--lineage", str(lineage), "--out", str(out)], capsys)
    assert _nothing_written(out)
    # With its recorded digest forged too, the rebuilt weights no longer match the checkpoint's.
    recipe = json.loads((lineage / LINEAGE).read_text())
    recipe["blobs"][MASKS] = hashlib.sha256(masks).hexdigest()
    (lineage / LINEAGE).write_text(json.dumps(recipe))
    assert "sha256" in _refused(["materialize", "--lineage", str(lineage), "--out", str(out)], capsys)
    assert _nothing_written(out)


def test_a_truncated_values_file_is_refused(cells, tmp_path, capsys):
    lineage = _tampered_copy(cells["bf16-sparsegpt"][1], tmp_path)
    values = (lineage / VALUES).read_bytes()
    (lineage / VALUES).write_bytes(values[: len(values) // 3])
    out = tmp_path / "out"
    assert "values.bin" in _refused(["materialize", "--lineage", str(lineage), "--out", str(out)], capsys)
    assert _nothing_written(out)
    recipe = json.loads((lineage / LINEAGE).read_text())  # forged digest: the short read is caught
    recipe["blobs"][VALUES] = hashlib.sha256(values[: len(values) // 3]).hexdigest()
    (lineage / LINEAGE).write_text(json.dumps(recipe))
    assert "values.bin is too short" in _refused(["materialize", "--lineage", str(lineage), "--out", str(out)], capsys)
    assert _nothing_written(out)


def test_a_wrong_or_missing_source_is_refused_naming_the_digest_it_needs(sources, cells, tmp_path, capsys):
    lineage = cells["bf16-wanda"][1]
    needed = json.loads((lineage / "neuroal.json").read_text())["source"]["digest"]
    out = tmp_path / "out"
    line = _refused(["materialize", "--lineage", str(lineage), "--out", str(out), "--source", str(sources["f32"])],
                    capsys)
    assert needed in line and _nothing_written(out)
    line = _refused(["materialize", "--lineage", str(lineage), "--out", str(out), "--source", str(tmp_path / "gone")],
                    capsys)
    assert needed in line and "not available" in line and _nothing_written(out)
    # The recorded source moved away: the same line, and --source finds it again.
    moved = _tampered_copy(lineage, tmp_path)
    manifest = json.loads((moved / "neuroal.json").read_text())
    manifest["source"]["spec"] = str(tmp_path / "moved-away")
    forged = json.dumps(manifest)
    (moved / "neuroal.json").write_text(forged)
    recipe = json.loads((moved / LINEAGE).read_text())
    recipe["files"]["neuroal.json"]["sha256"] = hashlib.sha256(forged.encode()).hexdigest()
    (moved / LINEAGE).write_text(json.dumps(recipe))
    assert needed in _refused(["materialize", "--lineage", str(moved), "--out", str(out)], capsys)
    assert _nothing_written(out)


def test_a_source_converted_to_other_weights_is_refused(cells, tmp_path, capsys):
    lineage = _tampered_copy(cells["f32-magnitude"][1], tmp_path)
    recipe = json.loads((lineage / LINEAGE).read_text())
    recipe["source_files"]["model.safetensors"] = "0" * 64  # as if another transformers had converted it
    (lineage / LINEAGE).write_text(json.dumps(recipe))
    out = tmp_path / "out"
    assert "other weights" in _refused(["materialize", "--lineage", str(lineage), "--out", str(out)], capsys)
    assert _nothing_written(out)


def test_materialize_never_overwrites(cells, capsys):
    checkpoint, lineage = cells["f32-magnitude"]
    before = sha256_of_files(checkpoint)
    assert "already exists" in _refused(["materialize", "--lineage", str(lineage), "--out", str(checkpoint)], capsys)
    assert sha256_of_files(checkpoint) == before


def test_a_disk_that_fills_while_materializing_raises_and_leaves_nothing(cells, tmp_path, monkeypatch):
    class FullDisk:  # a file that takes 4 KiB and then reports no space left, as a full disk does
        def __init__(self, file):
            self.file, self.room = file, 4096

        def write(self, data):
            size = memoryview(data).nbytes
            if size > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= size
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FullDisk(file) if "x" in mode else file

    monkeypatch.setattr(lineage_module, "open", open_on_a_full_disk, raising=False)
    out = tmp_path / "out"
    with pytest.raises(OSError) as raised:
        lineage_module.materialize(cells["bf16-sparsegpt"][1], out)
    assert raised.value.errno == errno.ENOSPC and _nothing_written(out)
