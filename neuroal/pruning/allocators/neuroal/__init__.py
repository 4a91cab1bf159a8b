"""NeuroAl (Cunegatti, Custode, Iacca, TMLR 2025) as an allocator: search the block-wise and then
the row-wise sparsity distribution whose sparse activations stay closest to the dense ones.
``math.py`` holds the paper's formulas, ``search.py`` the scoring passes, ``strategies.py`` how
the candidates are walked; the specification is docs/algorithm.md."""

from __future__ import annotations

from neuroal.pruning.allocators.neuroal.search import (
    NeuroalSearch,
    Options,
    cache_dense_statistics,
    dense_cache_file,
    search_lambdas,
)
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Search on ``inputs.search_ids`` with ``inputs.method``; in dense mode the dense model's
    statistics are kept under ``inputs.cache_dir`` for later searches."""
    cache = None
    if options.mode == "dense" and inputs.cache_dir is not None and inputs.model_digest:
        cache = dense_cache_file(inputs.cache_dir, inputs.model_digest, inputs.method, inputs.search_ids,
                                 inputs.model, inputs.device)
    result = search_lambdas(inputs.model, inputs.method, inputs.sparsity, inputs.search_ids, inputs.device, options,
                            batch_size=inputs.batch_size, dense_cache=cache)
    return Allocation(result.allocation, {"neuroal": {**options.model_dump(), **result.to_dict()}})


ALLOCATOR = Allocator("neuroal", "NeuroAl: block and row sparsities that keep activations aligned (TMLR 2025)",
                      allocate, Options, reads_data=True, searches=True)

__all__ = ["ALLOCATOR", "NeuroalSearch", "Options", "allocate", "cache_dense_statistics", "dense_cache_file",
           "search_lambdas"]
