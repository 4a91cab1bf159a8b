"""One pruning cell end to end: load, sample calibration data, allocate, prune, save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

import neuroal
from neuroal.checkpoint import CalibrationRecord, Manifest, SourceRecord, save_checkpoint
from neuroal.config import PruneConfig
from neuroal.data import (
    CalibrationSet,
    CalibrationSpec,
    check_calibration_documents,
    get_corpus,
    resolve_bos_per_window,
    sample_calibration,
)
from neuroal.environment import device_kind, dtype_name, recorded_versions
from neuroal.errors import UserError
from neuroal.models import (
    ModelSource,
    check_weights,
    context_length,
    load_config,
    load_model,
    load_tokenizer,
    prefault_block_weights,
    prunable_matrices,
    published_dtype,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from neuroal.paths import cache_dir
from neuroal.plots import ALLOCATION_PNG, plot_allocation
from neuroal.pruning import (
    ALLOCATORS,
    Allocation,
    AllocationInputs,
    Allocator,
    BaseMethod,
    allocator,
    base_method,
    needs_calibration,
    prune_model,
    sparsity_report,
)
from neuroal.pruning.masks import parse_structure
from neuroal.pruning.plugin import Structure
from neuroal.timing import timed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """A cell resolved once, then handed to every stage: its config, the model source, the base
    method, the allocator and its options, the N:M structure, whether it reads data, device and
    dtype. ``Plan.of`` checks the cheap things first (names, N:M, counts), then resolves the model."""

    config: PruneConfig
    source: ModelSource
    method: BaseMethod
    allocator: Allocator
    options: BaseModel
    structure: Structure
    reads_data: bool
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, config: PruneConfig, source: ModelSource | None = None) -> "Plan":
        """Check and resolve ``config`` (``source``: its model already resolved)."""
        method, chosen = base_method(config.method), allocator(config.top_up)
        options = config.allocator_options()
        structure = _check_structure(config, chosen)
        reads_data = needs_calibration(method, chosen)
        if reads_data:
            get_corpus(config.calib)  # an unknown corpus fails before the model is loaded
        if chosen.searches(options) and config.search_nsamples > config.nsamples:
            raise UserError(f"--search-nsamples {config.search_nsamples} exceeds --nsamples {config.nsamples}; "
                            "the search set is the first windows of the calibration set")
        device = resolve_device(config.device)
        return cls(config, source or resolve_model(config.model), method, chosen, options, structure,
                   reads_data, device, resolve_dtype(config.dtype, device))

    def load(self):
        """``(model, tokenizer)`` of the cell's source, with its dtype and trust settings; a model
        with a block weight the pruner cannot handle is refused here, before any data is read."""
        c = self.config
        model, tokenizer = load_model(self.source, self.dtype, c.trust_remote_code, allow_pickle=c.allow_pickle)
        prunable_matrices(model)
        if self.device.type == "cpu":  # pruned in place there (a GPU works on copies of the blocks)
            prefault_block_weights(model)
        return model, tokenizer

    def calibrate(self, tokenizer, model_config) -> CalibrationSet:
        """Draw the calibration windows; the spec (in the manifest) records the resolved BOS choice."""
        c = self.config
        bos_per_window = resolve_bos_per_window(c.bos_per_window, model_config)
        return sample_calibration(tokenizer, CalibrationSpec(c.calib, c.nsamples, c.seqlen, c.seed, bos_per_window))

    def allocate(self, model, calibration: CalibrationSet | None, activation_cache: Path | None) -> Allocation:
        """Run the allocator on the loaded dense ``model``; the result records how long it took."""
        torch.manual_seed(self.config.seed)
        inputs = self.allocation_inputs(model, calibration, activation_cache)
        start = time.perf_counter()
        allocation = self.allocator.allocate(inputs, self.options)
        allocation.seconds = round(time.perf_counter() - start, 3)
        return allocation

    def allocation_inputs(self, model, calibration: CalibrationSet | None, cache: Path | None) -> AllocationInputs:
        """What the allocator's hooks see: the dense model, the cell's target and data, and ``cache``
        (default: the neuroal cache's ``activations``) for what they keep across runs."""
        c = self.config
        return AllocationInputs(
            model, prunable_matrices(model), c.sparsity, self.method, self.device, c.batch_size,
            calibration_ids=calibration.input_ids if calibration else None,
            search_ids=calibration.search_set(c.search_nsamples) if self.allocator.searches(self.options) else None,
            cache_dir=cache or cache_dir("activations"), model_digest=self.source.digest,
        )


def check_config(config: PruneConfig, source: ModelSource | None = None) -> Plan:
    """Every check of a cell that loads no weights: names, N:M, counts, device, the model spec, its
    config (a causal LM, remote code, context length), weight files (truncated, pickled) and the
    calibration corpus.

    Args:
        config: The cell.
        source: ``config.model`` already resolved (a campaign checks many cells of one model).

    Returns:
        The cell's plan. Raises ``UserError`` naming the problem.
    """
    plan = Plan.of(config, source)
    model_config = load_config(plan.source, config.trust_remote_code)
    check_weights(plan.source, config.allow_pickle)
    if plan.reads_data:
        _check_context(model_config, config.seqlen)
        check_calibration_documents(load_tokenizer(plan.source, config.trust_remote_code), config.calib,
                                    config.seqlen, resolve_bos_per_window(config.bos_per_window, model_config))
    return plan


def prune_to_checkpoint(plan: Plan, out: Path, overwrite: bool = False, *,
                        calibration: CalibrationSet | None = None, allocation: Allocation | None = None,
                        activation_cache: Path | None = None) -> Manifest:
    """Prune as ``plan`` says and write the checkpoint folder ``out``.

    Returns the manifest written to ``out/neuroal.json``. Bad input raises ``UserError`` before
    anything is written. The keyword arguments hand in the results of earlier stages (see
    ``prune_in_memory``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another --out or pass --overwrite")
    model, tokenizer, manifest = prune_in_memory(plan, calibration=calibration, allocation=allocation,
                                                 activation_cache=activation_cache)
    manifest = _cast_for_saving(model, manifest, plan)
    figures = plan.allocator.figures
    plot = {ALLOCATION_PNG: lambda path: plot_allocation(manifest, path, figures.panel if figures else None)}
    return save_checkpoint(model, tokenizer, manifest, out, overwrite=overwrite, extras=plot)


def _cast_for_saving(model, manifest: Manifest, plan: Plan) -> Manifest:
    """Cast ``model`` to the dtype its checkpoint is written in; the sparsity is counted again from
    the cast weights (a cast to float16 could flush tiny kept weights to zero)."""
    dtype = save_dtype(plan.config.save_dtype, published_dtype(plan.source), model)
    model.to(dtype)
    report = sparsity_report(model)
    return manifest.model_copy(update={"save_dtype": dtype_name(dtype), "achieved_sparsity": report["achieved"],
                                       "block_sparsity": report["blocks"], "module_sparsity": report["modules"]})


def save_dtype(requested: str, published: torch.dtype, model) -> torch.dtype:
    """The dtype a checkpoint's weights are written in.

    ``auto``: the source's ``published`` dtype when every weight of ``model`` survives the cast bit
    for bit (a bf16 model pruned in float32 by masking), else the dtype it was computed in (the
    weights SparseGPT updated); a named dtype is cast to as asked.
    """
    if requested != "auto":
        return resolve_dtype(requested, torch.device("cpu"))
    computed = next(model.parameters()).dtype
    if published == computed or all(_survives(t, published) for t in model.state_dict().values()):
        return published
    return computed


def _survives(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor`` casts to ``dtype`` and back unchanged (integer tensors are not cast)."""
    if not tensor.is_floating_point():
        return True
    back = tensor.to(dtype).to(tensor.dtype)
    return torch.equal(back, tensor) and torch.equal(torch.signbit(back), torch.signbit(tensor))


def calibrate(plan: Plan) -> CalibrationSet | None:
    """The calibration stage alone (tokenizer only); None when the cell reads no data."""
    if not plan.reads_data:
        return None
    model_config = load_config(plan.source, plan.config.trust_remote_code)
    _check_context(model_config, plan.config.seqlen)
    return plan.calibrate(load_tokenizer(plan.source, plan.config.trust_remote_code), model_config)


def allocate(plan: Plan, calibration: CalibrationSet | None, activation_cache: Path | None = None) -> Allocation:
    """The allocation stage alone: load the model and run the allocator."""
    model, _ = plan.load()
    return plan.allocate(model, calibration, activation_cache)


def prepare(plan: Plan, calibration: CalibrationSet | None, folder: Path, stale_before: float = 0.0) -> Path | None:
    """The allocator's cached pre-stage (``Allocator.prepare``: NeuroAl's dense statistics in dense
    mode), kept in ``folder`` for every later allocation on this model and data (recomputed when
    written before ``stale_before``, a POSIX time). None when the allocator has none for its options."""
    stage = plan.allocator.prepare
    if stage is None or not stage.needed(plan.options):
        return None
    model, _ = plan.load()
    return stage.run(plan.allocation_inputs(model, calibration, folder), plan.options, stale_before)


def prune_in_memory(plan: Plan, *, calibration: CalibrationSet | None = None, allocation: Allocation | None = None,
                    activation_cache: Path | None = None):
    """Load and prune as ``plan`` says; returns ``(model, tokenizer, manifest)`` without saving.

    ``calibration`` and ``allocation``, when given, are the results of the earlier stages for this
    same plan (``calibrate``, ``allocate``) and are used instead of being computed again.
    ``activation_cache`` is the folder of dense-model statistics (default: the neuroal cache).
    """
    config = plan.config
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = plan.load()
    if plan.reads_data:
        _check_context(model.config, config.seqlen)
    if calibration is None and plan.reads_data:
        with timed(timings, "calibration"):
            calibration = plan.calibrate(tokenizer, model.config)
    allocation = allocation or plan.allocate(model, calibration, activation_cache)
    timings["allocate"] = allocation.seconds
    ids = calibration.input_ids if calibration else None
    with timed(timings, "prune"):
        unreached = prune_model(model, plan.method, allocation.targets, ids, plan.device, config.batch_size,
                                plan.structure, plan.allocator, plan.options)
    if unreached:
        logger.warning("%d experts received no calibration token and were pruned by magnitude", len(unreached))
    report = sparsity_report(model)
    logger.info("pruned %s to %.4f sparsity (target %.4f)", config.model, report["achieved"], config.sparsity)

    calibrated = CalibrationRecord(**calibration.spec.to_dict(), digest=calibration.digest) if calibration else None
    manifest = Manifest(
        source=SourceRecord(**plan.source.to_dict()),
        method=config.method,
        top_up=config.top_up,
        structure=config.structure,
        target_sparsity=config.sparsity,
        achieved_sparsity=report["achieved"],
        block_sparsity=report["blocks"],
        module_sparsity=report["modules"],
        unreached_experts=unreached,
        summary=plan.allocator.summary(allocation.details),
        allocation=allocation.details,
        calibration=calibrated,
        seed=config.seed,
        config=config.model_dump(mode="json"),
        device=str(plan.device),
        device_kind=device_kind(plan.device),
        dtype=dtype_name(plan.dtype),
        versions=recorded_versions(),
        results_version=neuroal.RESULTS_VERSION,
        timings=timings,
    )
    return model, tokenizer, manifest


def _check_structure(config: PruneConfig, chosen: Allocator) -> Structure:
    """N:M fixes the sparsity at n/m, and only some allocators (uniform, DSnoT) keep N:M."""
    structure = parse_structure(config.structure)
    if structure is None:
        return None
    n, m = structure
    if abs(config.sparsity - n / m) > 1e-9:
        raise UserError(f"--structure {n}:{m} prunes {n / m:g} of the weights; pass --sparsity {n / m:g}")
    if not chosen.keeps_structure:
        keeping = ", ".join(name for name, a in ALLOCATORS.items() if a.keeps_structure)
        raise UserError(f"--structure {n}:{m} works with --top-up {keeping}, not {config.top_up}")
    return structure


def _check_context(model_config, seqlen: int) -> None:
    context = context_length(model_config)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen {seqlen} is longer than the model's context of {context} tokens; lower --seqlen")
