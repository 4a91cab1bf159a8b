"""The pruning cell as separate stages (calibrate -> allocate -> prune), each result stored in a
file and read back, gives exactly the checkpoint of the one-shot prune; stored files verify."""

from __future__ import annotations

import pytest

from neuroal.config import PruneConfig
from neuroal.data import load_calibration, save_calibration
from neuroal.digests import file_digest
from neuroal.pipeline import Plan, allocate, calibrate, prune_to_checkpoint
from neuroal.pruning import Allocation, load_allocation, save_allocation


@pytest.mark.parametrize("top_up", ["owl", "neuroal"])
def test_stages_through_files_equal_the_one_shot_prune(tiny_llama, tmp_path, top_up):
    config = PruneConfig(model=str(tiny_llama), method="wanda", top_up=top_up, sparsity=0.6, calib="lee",
                         nsamples=4, search_nsamples=2, seqlen=32, neuroal_mode="dense")
    plan = Plan.of(config)
    one_shot = prune_to_checkpoint(plan, tmp_path / "one-shot", activation_cache=tmp_path / "cache")

    save_calibration(calibrate(plan), tmp_path / "calibration.safetensors")
    calibration = load_calibration(tmp_path / "calibration.safetensors")
    assert calibration.digest == one_shot.calibration.digest
    save_allocation(tmp_path / "allocation.safetensors", allocate(plan, calibration, activation_cache=tmp_path / "cache"))
    staged = prune_to_checkpoint(plan, tmp_path / "staged", calibration=calibration,
                                 allocation=load_allocation(tmp_path / "allocation.safetensors"))

    assert staged.files == one_shot.files  # same weights, byte for byte
    assert staged.allocation == one_shot.allocation
    assert file_digest(tmp_path / "staged" / "model.safetensors") == file_digest(tmp_path / "one-shot" / "model.safetensors")


def test_corrupt_stage_files_read_as_missing(tiny_llama, tmp_path):
    config = PruneConfig(model=str(tiny_llama), method="wanda", sparsity=0.5, calib="lee", nsamples=2, seqlen=16)
    path = tmp_path / "calibration.safetensors"
    save_calibration(calibrate(Plan.of(config)), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the token ids
    path.write_bytes(bytes(data))
    assert load_calibration(path) is None
    save_allocation(tmp_path / "a.safetensors", Allocation({"model.layers.0.mlp.up_proj": 0.5}))
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-4])  # truncated
    assert load_allocation(tmp_path / "a.safetensors") is None
    assert load_calibration(tmp_path / "missing.safetensors") is None
