"""One pruning cell end to end: load, sample calibration data, allocate, prune, save."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

import neuroal
from neuroal.checkpoint import save_checkpoint
from neuroal.config import PruneConfig
from neuroal.data import (
    CalibrationSet,
    CalibrationSpec,
    check_calibration_documents,
    get_corpus,
    resolve_bos_per_window,
    sample_calibration,
)
from neuroal.errors import UserError
from neuroal.models import (
    ModelSource,
    check_weights,
    context_length,
    load_config,
    load_model,
    load_tokenizer,
    prunable_linears,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from neuroal.paths import cache_dir
from neuroal.plots import ALLOCATION_PNG, plot_allocation
from neuroal.pruning import AllocationContext, base_method, needs_calibration, prune_model, sparsity_report, top_up
from neuroal.pruning.allocators import Allocation
from neuroal.pruning.masks import parse_structure
from neuroal.pruning.methods import BaseMethod, Structure
from neuroal.pruning.neuroal import cache_dense_statistics, dense_cache_file
from neuroal.pruning.topups import TopUp
from neuroal.timing import timed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocated:
    """The output of the allocation stage: targets per module (or row), what the allocator found,
    and how long it took. A campaign stores it between its allocation and prune tasks."""

    allocation: Allocation
    details: dict
    seconds: float


def prune_to_checkpoint(config: PruneConfig, out: Path, overwrite: bool = False, *,
                        calibration: CalibrationSet | None = None, allocated: Allocated | None = None,
                        activation_cache: Path | None = None, source: ModelSource | None = None) -> dict:
    """Prune ``config.model`` as ``config`` says and write the checkpoint folder ``out``.

    Returns the manifest written to ``out/neuroal.json``. Bad input raises ``UserError`` before
    anything is written. The keyword arguments hand in the results of earlier stages (see
    ``prune_in_memory``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another --out or pass --overwrite")
    model, tokenizer, manifest = prune_in_memory(config, calibration=calibration, allocated=allocated,
                                                 activation_cache=activation_cache, source=source)
    plot = {ALLOCATION_PNG: lambda path: plot_allocation(manifest, path)}
    return save_checkpoint(model, tokenizer, manifest, out, overwrite=overwrite, extras=plot)


def check_config(config: PruneConfig, source: ModelSource | None = None) -> ModelSource:
    """Every check of a cell that loads no weights: names, N:M, counts, device, the model spec, its
    config (a causal LM, remote code, context length) and weight files (truncated, pickled).

    Args:
        config: The cell.
        source: ``config.model`` already resolved (a campaign checks many cells of one model).

    Returns:
        The resolved model source. Raises ``UserError`` naming the problem.
    """
    cell = _Cell.of(config, source)
    model_config = load_config(cell.source, config.trust_remote_code)
    check_weights(cell.source, config.allow_pickle)
    if cell.reads_data:
        _check_context(model_config, config.seqlen)
        check_calibration_documents(load_tokenizer(cell.source, config.trust_remote_code), config.calib,
                                    config.seqlen, resolve_bos_per_window(config.bos_per_window, model_config))
    return cell.source


def reads_calibration(config: PruneConfig) -> bool:
    """Whether the cell reads calibration data (magnitude with a data-free top-up does not)."""
    return _Cell.of(config).reads_data


def calibrate(config: PruneConfig) -> CalibrationSet | None:
    """The calibration stage alone (tokenizer only); None when the cell reads no data."""
    cell = _Cell.of(config)
    if not cell.reads_data:
        return None
    model_config = load_config(cell.source, config.trust_remote_code)
    _check_context(model_config, config.seqlen)
    return cell.calibrate(load_tokenizer(cell.source, config.trust_remote_code), model_config)


def allocate(config: PruneConfig, calibration: CalibrationSet | None, activation_cache: Path | None = None) -> Allocated:
    """The allocation stage alone: load the model and run the top-up's allocator."""
    cell = _Cell.of(config)
    model, _ = cell.load()
    return cell.allocate(model, calibration, activation_cache)


def cache_dense_activations(config: PruneConfig, calibration: CalibrationSet, folder: Path) -> Path | None:
    """The dense-activation stage: the fully dense model's statistics on the search set, kept in
    ``folder`` for every dense-mode NeuroAl search on this model and search set. None when the
    cell does not search in dense mode."""
    cell = _Cell.of(config)
    if not (cell.top.searches and config.neuroal_mode == "dense"):
        return None
    model, _ = cell.load()
    search_ids = calibration.search_set(config.search_nsamples)
    cache = dense_cache_file(folder, cell.source.digest, cell.method, search_ids, model, cell.device)
    return cache_dense_statistics(model, cell.method, search_ids, cell.device, cache, config.batch_size)


def prune_in_memory(config: PruneConfig, *, calibration: CalibrationSet | None = None,
                    allocated: Allocated | None = None, activation_cache: Path | None = None,
                    source: ModelSource | None = None):
    """Load and prune ``config.model``; returns ``(model, tokenizer, manifest)`` without saving.

    ``calibration`` and ``allocated``, when given, are the results of the earlier stages for this
    same config (``calibrate``, ``allocate``) and are used instead of being computed again.
    ``activation_cache`` is the folder of dense-model statistics (default: the neuroal cache).
    ``source`` is ``config.model`` already resolved (``check_config`` returns it).
    """
    cell = _Cell.of(config, source)
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = cell.load()
    if cell.reads_data:
        _check_context(model.config, config.seqlen)
    if calibration is None and cell.reads_data:
        with timed(timings, "calibration"):
            calibration = cell.calibrate(tokenizer, model.config)
    allocated = allocated or cell.allocate(model, calibration, activation_cache)
    timings["allocate"] = allocated.seconds
    ids = calibration.input_ids if calibration else None
    with timed(timings, "prune"):
        prune_model(model, cell.method, allocated.allocation, ids, cell.device, config.batch_size, cell.structure, cell.top)
    report = sparsity_report(model)
    logger.info("pruned %s to %.4f sparsity (target %.4f)", config.model, report["achieved"], config.sparsity)

    manifest = {
        "source": cell.source.to_dict(),
        "method": config.method,
        "top_up": config.top_up,
        "mode": config.neuroal_mode if config.top_up == "neuroal" else None,
        "structure": config.structure,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": report["achieved"],
        "module_sparsity": report["modules"],
        "lambdas": _lambdas(allocated.details),
        "allocation": allocated.details,
        "calibration": {**calibration.spec.to_dict(), "digest": calibration.digest} if calibration else None,
        "seed": config.seed,
        "config": config.model_dump(),
        "device": str(cell.device),
        "dtype": str(cell.dtype).removeprefix("torch."),
        "versions": _versions(),
        "results_version": neuroal.RESULTS_VERSION,
        "timings": timings,
    }
    return model, tokenizer, manifest


@dataclass(frozen=True)
class _Cell:
    """A validated config with what its stages share: method, top-up, device, dtype, source."""

    config: PruneConfig
    method: BaseMethod
    top: TopUp
    structure: Structure
    reads_data: bool
    device: torch.device
    dtype: torch.dtype
    source: ModelSource

    @classmethod
    def of(cls, config: PruneConfig, source: ModelSource | None = None) -> "_Cell":
        """Check ``config`` (cheap checks first, then the model spec) and resolve it (unless
        ``source`` is given)."""
        method, top = base_method(config.method), top_up(config.top_up)
        structure = _check_structure(config)
        reads_data = needs_calibration(method, top)
        if reads_data:
            get_corpus(config.calib)  # an unknown corpus fails before the model is loaded
        if top.searches and config.search_nsamples > config.nsamples:
            raise UserError(f"--search-nsamples {config.search_nsamples} exceeds --nsamples {config.nsamples}; "
                            "the search set is the first windows of the calibration set")
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        return cls(config, method, top, structure, reads_data, device, dtype, source or resolve_model(config.model))

    def load(self):
        """``(model, tokenizer)`` of the cell's source, with its dtype and trust settings."""
        c = self.config
        return load_model(self.source, self.dtype, c.trust_remote_code, allow_pickle=c.allow_pickle)

    def calibrate(self, tokenizer, model_config) -> CalibrationSet:
        """Draw the calibration windows; the spec (in the manifest) records the resolved BOS choice."""
        c = self.config
        bos_per_window = resolve_bos_per_window(c.bos_per_window, model_config)
        return sample_calibration(tokenizer, CalibrationSpec(c.calib, c.nsamples, c.seqlen, c.seed, bos_per_window))

    def allocate(self, model, calibration: CalibrationSet | None, activation_cache: Path | None) -> Allocated:
        c = self.config
        torch.manual_seed(c.seed)
        timings: dict[str, float] = {}
        with timed(timings, "allocate"):
            context = AllocationContext(
                model, prunable_linears(model), c.sparsity, calibration.input_ids if calibration else None,
                self.device, c.batch_size, method=self.method,
                search_ids=calibration.search_set(c.search_nsamples) if self.top.searches else None,
                options={"step": c.neuroal_step, "mode": c.neuroal_mode, "strategy": c.neuroal_strategy},
                cache_dir=activation_cache or cache_dir("activations"), model_digest=self.source.digest,
            )
            allocation = self.top.allocate(context)
        return Allocated(allocation, context.details, timings["allocate"])


def _lambdas(details: dict) -> dict | None:
    """NeuroAl's chosen lambdas (None for other top-ups)."""
    search = details.get("neuroal")
    return {"block": search["block_lambda"], "row": search["row_lambda"]} if search else None


def _check_structure(config: PruneConfig):
    """N:M fixes the sparsity at n/m, and only the uniform allocation (and DSnoT's) keeps N:M."""
    structure = parse_structure(config.structure)
    if structure is None:
        return None
    n, m = structure
    if abs(config.sparsity - n / m) > 1e-9:
        raise UserError(f"--structure {n}:{m} prunes {n / m:g} of the weights; pass --sparsity {n / m:g}")
    if config.top_up not in ("uniform", "dsnot"):
        raise UserError(f"--structure {n}:{m} works with --top-up uniform or dsnot, not {config.top_up}")
    return structure


def _check_context(model_config, seqlen: int) -> None:
    context = context_length(model_config)
    if context is not None and seqlen > context:
        raise UserError(f"seqlen {seqlen} is longer than the model's context of {context} tokens; lower --seqlen")


def _versions() -> dict:
    import safetensors
    import transformers

    return {
        "neuroal": neuroal.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
