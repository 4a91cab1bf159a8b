"""NeuroAl (Cunegatti, Custode, Iacca, TMLR 2025) as an allocator: search the block-wise and then
the row-wise sparsity distribution whose sparse activations stay closest to the dense ones.
``math.py`` holds the paper's formulas, ``search.py`` the scoring passes, ``figures.py`` its
plots (``neuroal.pruning.walks``: how the candidates are walked); the specification is docs/algorithm.md.

Its lifecycle: ``prepare`` keeps the dense model's statistics on the search set (dense mode only)
for every later search on that model and data; ``summary`` is the chosen lambdas."""

from __future__ import annotations

from pathlib import Path

from neuroal.pruning.allocators.neuroal.figures import FIGURES
from neuroal.pruning.allocators.neuroal.search import (
    NeuroalSearch,
    Options,
    cache_dense_statistics,
    dense_cache_file,
    search_lambdas,
)
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator, Prepare


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Search on ``inputs.search_ids`` with ``inputs.method``; in dense mode the dense model's
    statistics are read from (or kept under) ``inputs.cache_dir``."""
    result = search_lambdas(inputs.model, inputs.method, inputs.sparsity, inputs.search_ids, inputs.device, options,
                            batch_size=inputs.batch_size, dense_cache=_dense_cache(inputs, options))
    return Allocation(result.allocation, {"neuroal": {**options.model_dump(mode="json"), **result.to_dict()}})


def prepare(inputs: AllocationInputs, options: Options, stale_before: float = 0.0) -> Path:
    """The dense model's statistics on the search set, computed once per model and search set."""
    return cache_dense_statistics(inputs.model, inputs.method, inputs.search_ids, inputs.device,
                                  _dense_cache(inputs, options), inputs.batch_size, stale_before)


def summary(details: dict) -> dict:
    """The chosen lambdas (``row_lambda`` None without a row step) and the mode they were chosen in."""
    search = details["neuroal"]
    return {"block_lambda": search["block_lambda"], "row_lambda": search["row_lambda"], "mode": search["mode"]}


def _dense_cache(inputs: AllocationInputs, options: Options) -> Path | None:
    """Where dense mode keeps the dense statistics (None: reference mode, or nowhere to keep them)."""
    if options.mode != "dense" or inputs.cache_dir is None or not inputs.model_digest:
        return None
    return dense_cache_file(inputs.cache_dir, inputs.model_digest, inputs.method, inputs.search_ids,
                            inputs.model, inputs.device)


ALLOCATOR = Allocator("neuroal", "NeuroAl: block and row sparsities that keep activations aligned (TMLR 2025)",
                      allocate, Options, reads_data=True, searches=lambda options: True,
                      prepare=Prepare(needed=lambda options: options.mode == "dense", run=prepare),
                      summary=summary, figures=FIGURES)

__all__ = ["ALLOCATOR", "NeuroalSearch", "Options", "allocate", "cache_dense_statistics", "dense_cache_file",
           "search_lambdas"]
