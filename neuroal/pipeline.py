"""One pruning cell end to end: load, sample calibration data, allocate, prune, save."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from pathlib import Path

import torch

import neuroal
from neuroal.checkpoint import save_checkpoint
from neuroal.config import PruneConfig
from neuroal.data import CalibrationSpec, get_corpus, sample_calibration
from neuroal.errors import UserError
from neuroal.models import load_model, prunable_linears, resolve_device, resolve_dtype, resolve_model
from neuroal.plots import ALLOCATION_PNG, plot_allocation
from neuroal.pruning import AllocationContext, base_method, needs_calibration, prune_model, sparsity_report, top_up
from neuroal.pruning.masks import parse_structure

logger = logging.getLogger(__name__)

# Config attributes that hold a model's context length, by family.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def prune_to_checkpoint(config: PruneConfig, out: Path, overwrite: bool = False) -> dict:
    """Prune ``config.model`` as ``config`` says and write the checkpoint folder ``out``.

    Returns the manifest written to ``out/neuroal.json``. Bad input raises ``UserError`` before
    anything is written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another --out or pass --overwrite")
    model, tokenizer, manifest = prune_in_memory(config)
    plot = {ALLOCATION_PNG: lambda path: plot_allocation(manifest, path)}
    return save_checkpoint(model, tokenizer, manifest, out, overwrite=overwrite, extras=plot)


def prune_in_memory(config: PruneConfig):
    """Load and prune ``config.model``; returns ``(model, tokenizer, manifest)`` without saving."""
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
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    with _timed(timings, "load"):
        source = resolve_model(config.model)
        model, tokenizer = load_model(source, dtype, config.trust_remote_code)
    calibration = None
    if reads_data:
        _check_context(model.config, config.seqlen)
        with _timed(timings, "calibration"):
            calibration = sample_calibration(
                tokenizer, CalibrationSpec(config.calib, config.nsamples, config.seqlen, config.seed)
            )
    ids = calibration.input_ids if calibration else None
    with _timed(timings, "allocate"):
        context = AllocationContext(
            model, prunable_linears(model), config.sparsity, ids, device, config.batch_size, method=method,
            search_ids=calibration.search_set(config.search_nsamples) if top.searches else None,
            options={"step": config.neuroal_step, "mode": config.neuroal_mode, "strategy": config.neuroal_strategy},
        )
        allocation = top.allocate(context)
    with _timed(timings, "prune"):
        prune_model(model, method, allocation, ids, device, config.batch_size, structure, top)
    report = sparsity_report(model)
    logger.info("pruned %s to %.4f sparsity (target %.4f)", config.model, report["achieved"], config.sparsity)

    manifest = {
        "source": source.to_dict(),
        "method": config.method,
        "top_up": config.top_up,
        "mode": config.neuroal_mode if config.top_up == "neuroal" else None,
        "structure": config.structure,
        "target_sparsity": config.sparsity,
        "achieved_sparsity": report["achieved"],
        "module_sparsity": report["modules"],
        "lambdas": _lambdas(context.details),
        "allocation": context.details,
        "calibration": {**calibration.spec.to_dict(), "digest": calibration.digest} if calibration else None,
        "seed": config.seed,
        "config": config.model_dump(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
        "timings": timings,
    }
    return model, tokenizer, manifest


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
    for attr in _CONTEXT_ATTRS:
        context = getattr(model_config, attr, None)
        if isinstance(context, int) and seqlen > context:
            raise UserError(f"seqlen {seqlen} is longer than the model's context of {context} tokens; lower --seqlen")


@contextlib.contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)


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
