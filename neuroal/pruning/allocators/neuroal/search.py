"""NeuroAl's search (docs/algorithm.md, "NeuroAl"): score candidate lambdas with layer-sequential
passes over the search set, block step then row step, and return the allocation of the winners.

What makes it affordable without changing what it chooses:
- the search set's block inputs are captured once per search, not once per candidate;
- reference mode reuses block 0's dense statistics (its inputs never change);
- dense mode reads the fully dense model's statistics, computed once per model and search set
  (and kept on disk), and prunes candidates with those fixed scores, ranked once per module;
- a candidate stops as soon as its running score can no longer win (scores only grow);
- the row candidate lambda = 0 repeats the block winner and is not scored again.
The ``coarse`` strategy (``neuroal.pruning.walks``) trades the exhaustive grid for fewer passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from torch import nn

from neuroal.digests import json_digest, tensors_digest
from neuroal.environment import compute_environment
from neuroal.models import Architecture, architecture_of, block_matrices, decoder_blocks
from neuroal.progress import progress
from neuroal.pruning.allocation import at_target_by_weight
from neuroal.pruning.allocators.neuroal.math import (
    BLOCK_LAMBDAS,
    alignment_distance,
    block_lambdas,
    block_schedule,
    pooled_norms,
    producer_vectors,
    row_lambdas,
    row_sparsities,
)
from neuroal.pruning.layer_sequential import input_stats
from neuroal.pruning.masks import mask_from_ranks, prune_counts, row_ranks
from neuroal.pruning.plugin import BaseMethod, Target
from neuroal.pruning.prune import method_for, trial_block
from neuroal.pruning.statistics import NORMS, InputStats, load_stats, save_stats
from neuroal.pruning.walks import WALKS
from neuroal.replay import BlockInputs, capture_block_inputs, observe_inputs, onloaded

logger = logging.getLogger(__name__)



def _comma_separated(value):
    """A list on the command line: ``--neuroal-lambdas 0,0.01,0.02`` (params.yaml gives a list)."""
    return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _ascending(grid: tuple[float, ...]) -> tuple[float, ...]:
    if not grid or list(grid) != sorted(set(grid)):
        raise ValueError("give one or more distinct lambdas in ascending order")
    return grid


# Block-step candidates; 0 (every block at the target) lets the search fall back to uniform.
Lambdas = Annotated[tuple[Annotated[float, Field(ge=0, lt=0.5)], ...], BeforeValidator(_comma_separated),
                    AfterValidator(_ascending)]


class Options(BaseModel):
    """NeuroAl's options (``--neuroal-step``, ``--neuroal-mode``, ``--neuroal-strategy``,
    ``--neuroal-lambdas``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: Literal["block", "row", "both"] = Field("both", description="block step, row step, or both")
    # reference: each block against its own dense output on the sparse inputs; dense: against the
    # fully dense model. Measured: dense always chose the largest lambda and lost to uniform.
    mode: Literal["reference", "dense"] = Field("reference", description="what a block's activations are compared with")
    strategy: Literal["grid", "coarse"] = Field("coarse", description="every candidate, or a golden-section walk")
    lambdas: Lambdas = Field(BLOCK_LAMBDAS, description="block-step candidate lambdas, comma-separated (0: uniform "
                                                        "may win); the row step tries these and 0")


@dataclass
class NeuroalSearch:
    """What the search chose, and the evidence.

    ``*_scores`` map each evaluated candidate to its score; a candidate stopped early (its
    running score already lost) is listed in ``*_stopped`` with the partial, lower-bound score.
    """

    block_lambda: float
    row_lambda: float | None
    block_scores: dict[float, float]
    row_scores: dict[float, float]
    block_sparsities: list[float]
    allocation: dict[str, Target]
    block_stopped: list[float] = field(default_factory=list)
    row_stopped: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON-ready summary for ``neuroal.json`` (per-row sparsities as lists)."""
        return {
            "block_lambda": self.block_lambda,
            "row_lambda": self.row_lambda,
            "block_scores": {str(k): v for k, v in self.block_scores.items()},
            "row_scores": {str(k): v for k, v in self.row_scores.items()},
            "block_stopped_early": self.block_stopped,
            "row_stopped_early": self.row_stopped,
            "block_sparsities": self.block_sparsities,
            "row_sparsities": {
                name: [round(x, 6) for x in t.tolist()] for name, t in self.allocation.items() if isinstance(t, torch.Tensor)
            },
            "gqa_rows": "k/v rows take the o_proj delta averaged over the query heads sharing each kv head",
        }


@torch.no_grad()
def search_lambdas(
    model: nn.Module,
    method: BaseMethod,
    sparsity: float,
    search_ids: torch.Tensor,
    device: torch.device,
    options: Options = Options(),
    *,
    batch_size: int = 8,
    dense_cache: Path | None = None,
) -> NeuroalSearch:
    """Choose NeuroAl's block lambda (and row lambda) for ``method`` at ``sparsity``.

    The model's weights are left as they were. The returned allocation (module full name ->
    sparsity, or per-row sparsities) is for the final layer-sequential prune. In dense mode,
    ``dense_cache`` (see ``dense_cache_file``) keeps the dense model's statistics on disk for
    every later search on the same model and search set.
    """
    strategy = options.strategy
    search = _Search(model, method, search_ids, device, batch_size, options.mode, dense_cache)
    num_blocks = len(search.blocks)

    def schedule(lam):  # balanced by the blocks' weight counts (experts count in their block's budget)
        return at_target_by_weight(block_schedule(num_blocks, sparsity, lam), search.block_sizes, sparsity)

    def block_targets(lam):
        return [{n: s for n in names} for s, names in zip(schedule(lam), search.names)]

    block = search.choose(block_lambdas(sparsity, options.lambdas), block_targets, strategy, "block")
    best_targets = block_targets(block.lam)
    result = NeuroalSearch(block.lam, None, block.scores, {}, schedule(block.lam),
                           search.allocation(best_targets), block_stopped=block.stopped)
    if options.step == "block" or method.score is None:  # no row step for SparseGPT (docs/algorithm.md)
        return result

    shapes = [{n: tuple(m.weight.shape) for n, m in block.items()} for block in search.matrices]
    vectors = [producer_vectors(search.arch, block.deltas, i, search.matrices[i], model.config)
               for i in range(num_blocks)]

    def row_targets(lam):
        # The row step prunes every module with per-row masks (docs/algorithm.md); a missing, zero or
        # constant vector gives each row the module's own sparsity.
        return [
            {n: row_sparsities(vectors[i][n], s, lam) if n in vectors[i] else torch.full(shapes[i][n][:1], s, dtype=torch.float64)
             for n, s in targets.items()}
            for i, targets in enumerate(best_targets)
        ]

    # lambda = 0 puts every row at its module's sparsity: the block winner again, unless per-row
    # rounding (keep floor((1 - s) * in)) prunes a different count than floor(s * in).
    known = {0.0: block} if _same_counts(row_targets(0.0), best_targets, shapes) else None
    row = search.choose(row_lambdas(options.lambdas), row_targets, strategy, "row", known=known)
    result.row_lambda, result.row_scores, result.row_stopped = row.lam, row.scores, row.stopped
    result.allocation = search.allocation(row_targets(row.lam))
    return result


@torch.no_grad()
def cache_dense_statistics(model: nn.Module, method: BaseMethod, search_ids: torch.Tensor, device: torch.device,
                           cache: Path, batch_size: int = 8, stale_before: float = 0.0) -> Path:
    """Compute the dense model's statistics on a search set into ``cache`` (kept if valid and
    written at or after ``stale_before``, a POSIX time), so that every later dense-mode search on
    it reads them instead of running the dense pass."""
    if cache.is_file() and cache.stat().st_mtime < stale_before:
        cache.unlink()
    _Search(model, method, search_ids, device, batch_size, "dense", cache)
    return cache


def dense_cache_file(folder: Path, model_digest: str, method: BaseMethod, search_ids: torch.Tensor,
                     model: nn.Module, device: torch.device) -> Path:
    """Where the dense model's statistics on a search set live: named by everything they depend
    on (model weights, search tokens, statistics kept, library versions, device kind, dtype), so a
    different input or other code never reads a stale entry."""
    key = json_digest({
        "model": model_digest,
        "search_ids": tensors_digest({"ids": search_ids}),
        "kinds": sorted(_search_kinds(method)),
        "environment": compute_environment(device, next(model.parameters()).dtype),
        "format": 2,  # token counts stored (expert fallbacks read them)
    })
    return Path(folder) / f"dense-{key[:32]}.safetensors"


def _search_kinds(method: BaseMethod) -> frozenset[str]:
    """The statistics a search keeps: input norms for the distance, plus what the method scores with."""
    return frozenset((NORMS,)) | method.statistics


def _same_counts(per_row: list[dict], per_module: list[dict], shapes: list[dict]) -> bool:
    """Whether per-row targets prune exactly as many weights in every row as the module targets."""
    return all(
        torch.equal(prune_counts(shapes[i][n], t, t.device), prune_counts(shapes[i][n], per_module[i][n], t.device))
        for i, block in enumerate(per_row)
        for n, t in block.items()
    )


@dataclass
class _Outcome:
    lam: float
    score: float
    deltas: list[dict[str, torch.Tensor]]
    scores: dict[float, float] = field(default_factory=dict)
    stopped: list[float] = field(default_factory=list)


class _Search:
    """The scoring pass of NeuroAl over the search set, with what can be reused across candidates."""

    def __init__(self, model, method: BaseMethod, search_ids, device, batch_size: int, mode: str,
                 dense_cache: Path | None = None):
        self.model, self.method, self.device, self.mode = model, method, device, mode
        self.arch: Architecture = architecture_of(model)
        self.blocks = decoder_blocks(model, self.arch)
        self.matrices = [block_matrices(b) for b in self.blocks]  # views: they follow a block's onloading
        self.names = [list(b) for b in self.matrices]
        self.block_sizes = [sum(m.weight.numel() for m in b.values()) for b in self.matrices]
        self.kinds = _search_kinds(method)
        self.inputs = capture_block_inputs(model, self.blocks, search_ids, device, batch_size)
        self.reference_stats: dict[int, dict[str, InputStats]] = {}  # block 0 in reference mode
        self.dense_stats: list[dict[str, InputStats]] = []
        self.ranks: dict[tuple[int, str], torch.Tensor] = {}  # fixed scores, ranked once (see _pruned)
        if mode == "dense":
            cached = load_stats(dense_cache, self.kinds, device) if dense_cache else None
            self.dense_stats = cached or self._dense_pass()
            if dense_cache and cached is None:
                save_stats(dense_cache, self.dense_stats)

    def choose(self, lambdas, targets_for, strategy: str, what: str, known: dict | None = None) -> _Outcome:
        """Score candidates (every one, or a coarse-to-fine walk) and return the lowest; ties go to
        the first listed."""
        walk = WALKS[strategy](list(lambdas))
        known = known or {}
        best: _Outcome | None = None
        for lam, outcome in known.items():  # already scored: a free bound for early stopping
            if best is None or _better(outcome, best, lambdas):
                best = _Outcome(lam, outcome.score, outcome.deltas)
        scores: dict[float, float] = {lam: outcome.score for lam, outcome in known.items()}
        stopped: list[float] = []
        bar = progress(total=len(lambdas), desc=f"neuroal {what}")
        index = next(walk)
        while True:
            lam = lambdas[index]
            if lam not in scores:
                bound = (best.score, _rank(best.lam, lambdas) < index) if best else None
                score, deltas, complete = self.score(targets_for(lam), bound)
                scores[lam] = score
                if not complete:
                    stopped.append(lam)
                elif best is None or _better(_Outcome(lam, score, deltas), best, lambdas):
                    best = _Outcome(lam, score, deltas)
            bar.update()
            try:
                index = walk.send(_rank(best.lam, lambdas))
            except StopIteration:
                break
        bar.close()
        logger.info("neuroal %s lambda %.2f (score %.6g; %d candidates, %d stopped early)",
                    what, best.lam, best.score, len(scores), len(stopped))
        best.scores = {lam: scores[lam] for lam in lambdas if lam in scores}
        best.stopped = stopped
        return best

    def score(self, targets: list[dict[str, Target]], bound) -> tuple[float, list, bool]:
        """One layer-sequential pass: sum of alignment distances, deltas, and whether it finished.

        ``bound = (best score, best is listed earlier)``: stop once this candidate cannot win.
        """
        inputs: BlockInputs = self.inputs
        total, deltas = 0.0, []
        for index, block in enumerate(self.blocks):
            with onloaded(block, self.device):
                matrices = block_matrices(block)
                dense = self._dense_block_stats(index, block, matrices, inputs)
                sparse = {n: InputStats(frozenset((NORMS,))) for n in matrices}
                prune = partial(self._pruned, index, dense, targets[index])
                inputs = trial_block(block, matrices, inputs, prune, observe=lambda n, x: sparse[n].add(x))
            block_deltas = {}
            for name in matrices:
                a_dense, a_sparse = dense[name].norms(), sparse[name].norms()
                total += alignment_distance(a_dense, a_sparse)
                block_deltas[name] = (a_dense - a_sparse).cpu()
            for stem, names in _expert_slices(matrices).items():  # the MLP input of a mixture of experts
                block_deltas[stem] = (pooled_norms([dense[n].norms() for n in names])
                                      - pooled_norms([sparse[n].norms() for n in names])).cpu()
            deltas.append(block_deltas)
            if bound is not None and (total > bound[0] or (total == bound[0] and bound[1])):
                return total, deltas, False
        return total, deltas, True

    def allocation(self, targets: list[dict[str, Target]]) -> dict[str, Target]:
        """Block-relative targets -> the allocation by full module name."""
        return {f"{self.arch.blocks}.{i}.{n}": t for i, block in enumerate(targets) for n, t in block.items()}

    def _dense_block_stats(self, index, block, matrices, inputs) -> dict[str, InputStats]:
        """a_dense: the fully dense model's (dense mode) or this block's on the sparse inputs."""
        if self.mode == "dense":
            return self.dense_stats[index]
        if index == 0 and 0 in self.reference_stats:  # block 0 always sees the same inputs
            return self.reference_stats[0]
        stats = input_stats(block, matrices, inputs, self.kinds)
        if index == 0:
            self.reference_stats[0] = stats
        return stats

    def _pruned(self, index: int, stats: dict[str, InputStats], targets: dict[str, Target], name: str,
                matrix) -> tuple[torch.Tensor, torch.Tensor]:
        """A candidate's weight and mask for one matrix. Where the statistics are the same for every
        candidate (every block in dense mode, block 0 in reference mode) a score-based method's
        scores are ranked once, and each candidate's mask is a comparison with its counts."""
        weight, target = matrix.weight, targets[name]
        method, stats, _ = method_for(self.method, stats[name])  # magnitude for an expert no token reached
        if method.score is None or not (self.mode == "dense" or index == 0):
            return method.prune(weight, stats, target, None)
        key = (index, name)
        if key not in self.ranks:
            self.ranks[key] = row_ranks(method.score(weight, stats))
        ranks = self.ranks[key]
        return weight, mask_from_ranks(ranks, prune_counts(ranks.shape, target, ranks.device))

    def _dense_pass(self) -> list[dict[str, InputStats]]:
        """Statistics of the fully dense model on the search set, block by block."""
        inputs, dense_stats = self.inputs, []
        for block in progress(self.blocks, desc="neuroal dense"):
            with onloaded(block, self.device):
                matrices = block_matrices(block)
                stats = {n: InputStats(self.kinds) for n in matrices}
                inputs = observe_inputs(block, matrices, inputs, lambda n, x: stats[n].add(x))
            dense_stats.append(stats)
        return dense_stats


def _expert_slices(matrices: dict) -> dict[str, list[str]]:
    """The names of each fused expert tensor's slices, by the tensor's stem."""
    grouped: dict[str, list[str]] = {}
    for name, m in matrices.items():
        if m.expert is not None:
            grouped.setdefault(m.stem, []).append(name)
    return grouped


def _rank(lam, lambdas) -> int:
    return list(lambdas).index(lam)


def _better(a: _Outcome, b: _Outcome, lambdas) -> bool:
    return a.score < b.score or (a.score == b.score and _rank(a.lam, lambdas) < _rank(b.lam, lambdas))
