"""An allocator's lifecycle (``neuroal.pruning.plugin``): a stateful allocator defined here, in the
tests only, goes through the pipeline and the campaign's tasks with its ``prepare`` and ``summary``
hooks, though nothing outside its definition names it. (Shipped, it would be a package
``allocators/loudness/`` and one name in ``registry.py``.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import input_norms_by_whole_model_hooks
from pydantic import BaseModel, ConfigDict, Field

from neuroal.checkpoint import Manifest, read_manifest
from neuroal.config import PruneConfig
from neuroal.files import write_json_atomic
from neuroal.models import load_model, resolve_model
from neuroal.pipeline import Plan
from neuroal.pruning.allocation import at_target_by_weight, expand_to_modules
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator, Prepare
from neuroal.pruning.statistics import NORMS
from tasks import cells



class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    spread: float = Field(0.1, ge=0, lt=0.5)


def _prepared(inputs: AllocationInputs) -> Path:
    return inputs.cache_dir / f"loudness-{inputs.model_digest[:16]}.json"


def prepare(inputs: AllocationInputs, options: Options, stale_before: float = 0.0) -> Path:
    """Each dense block's mean input norm, kept per model (its state across cells)."""
    path = _prepared(inputs)
    if not (path.exists() and path.stat().st_mtime >= stale_before):
        steps = layer_sequential(inputs.model, inputs.calibration_ids, inputs.device, inputs.batch_size,
                                 frozenset((NORMS,)))
        write_json_atomic(path, [{n: float(s.norms().mean()) for n, s in step.stats.items()} for step in steps])
    return path


def allocate(inputs: AllocationInputs, options: Options) -> Allocation:
    """Louder blocks pruned less; reads only what ``prepare`` kept (missing: it fails)."""
    loudness = [sum(block.values()) for block in json.loads(_prepared(inputs).read_text())]
    order = sorted(range(len(loudness)), key=loudness.__getitem__)  # quietest first
    raw = [0.0] * len(loudness)
    for rank, index in enumerate(order):
        raw[index] = inputs.sparsity + options.spread * (1 - 2 * rank / max(len(order) - 1, 1))
    names = [[n for n in inputs.matrices if n.startswith(f"model.layers.{i}.")] for i in range(len(raw))]
    sizes = [sum(inputs.matrices[n].weight.numel() for n in block) for block in names]
    sparsities = at_target_by_weight(raw, sizes, inputs.sparsity)
    return Allocation(expand_to_modules(sparsities, names), {"loudness": loudness, "spread": options.spread})


def summary(details: dict) -> dict:
    return {"spread": details["spread"], "loudest_block": max(range(len(details["loudness"])),
                                                              key=details["loudness"].__getitem__)}


LOUDNESS = Allocator("loudness", "louder blocks pruned less (a test plugin)", allocate, Options, reads_data=True,
                     prepare=Prepare(needed=lambda options: options.spread > 0, run=prepare), summary=summary)


def loudness_plan(model: Path, spread: float) -> Plan:
    """A cell whose allocator is the test plugin (the config names a registered one: the plugin is
    not in the registry, so it is handed to the plan directly)."""
    config = PruneConfig(model=str(model), method="wanda", sparsity=0.5, calib="lee", nsamples=4, seqlen=32,
                         batch_size=2)
    return dataclasses.replace(Plan.of(config), allocator=LOUDNESS, options=Options(spread=spread))


def test_a_plugin_with_prepare_and_summary_runs_through_the_campaign_tasks(tiny_llama, tmp_path):
    plan, cache = loudness_plan(tiny_llama, 0.1), tmp_path / "cache"
    calibration = cells.calibration.fn(plan, cache)
    prepared = cells.prepare.fn(plan, calibration, cache)

    # The prepared state is the dense model's, as whole-model forwards with hooks measure it.
    model, _ = load_model(resolve_model(str(tiny_llama)))
    ids = cells._calibration(calibration).input_ids
    hooked = input_norms_by_whole_model_hooks(model, ids)
    kept = json.loads(Path(prepared.path).read_text())
    for index, block in enumerate(kept):
        for name, mean in block.items():
            assert mean == pytest.approx(float(hooked[f"model.layers.{index}.{name}"].mean()), rel=1e-5)

    allocation = cells.allocate.fn(plan, calibration, cache)
    out = cells.prune.fn(plan, calibration, allocation, tmp_path / "checkpoint", tmp_path / "lineage")
    manifest = read_manifest(Path(out.path))
    loudness = [sum(block.values()) for block in kept]
    assert manifest.summary == {"spread": 0.1, "loudest_block": loudness.index(max(loudness))}
    assert manifest.allocation == {"loudness": loudness, "spread": 0.1}
    blocks = manifest.block_sparsity  # counted from the weights written
    assert blocks[loudness.index(max(loudness))] == min(blocks) and max(blocks) - min(blocks) > 0.1
    assert manifest.achieved_sparsity == pytest.approx(0.5, abs=0.01)


def test_options_that_need_no_preparation_prepare_nothing(tiny_llama, tmp_path):
    plan = loudness_plan(tiny_llama, 0.0)
    assert cells.prepare.fn(plan, cells.calibration.fn(plan, tmp_path), tmp_path) is None
    assert not (tmp_path / "activations").exists()


def test_manifests_from_before_summaries_read_as_neuroal_summaries():
    """``neuroal.json`` files written before allocators summarised themselves kept NeuroAl's
    ``mode`` and ``lambdas`` as fields; they still read (old checkpoints pull and evaluate)."""
    common = {"source": {"spec": "m", "kind": "folder", "digest": "0" * 64}, "method": "wanda",
              "target_sparsity": 0.5, "achieved_sparsity": 0.5, "module_sparsity": {}, "seed": 0, "config": {},
              "device": "cpu", "dtype": "float32", "versions": {}, "results_version": 3, "timings": {}}
    old = Manifest.model_validate({**common, "top_up": "neuroal", "mode": "reference",
                                   "lambdas": {"block": 0.1, "row": 0.12}})
    assert old.summary == {"block_lambda": 0.1, "row_lambda": 0.12, "mode": "reference"}
    assert Manifest.model_validate({**common, "top_up": "owl", "mode": None, "lambdas": None}).summary == {}
