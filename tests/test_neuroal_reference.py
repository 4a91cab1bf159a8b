"""NeuroAl search, checked against a straightforward transcription of ``docs/algorithm.md`` (reference mode).

The transcription below (``reference_search``) is written from the specification alone: one sample
at a time through the whole model, no caching, no batching, statistics in float64. Block i of a
candidate is scored on the inputs that the *pruned* blocks before it produce; it then stays pruned
while later blocks are scored (the same inputs as "its sparse outputs feed block i+1"), and every
block is restored at the end of the candidate's pass.

Readings of the specification where it leaves room:
- Row step: every module is pruned with per-row masks (row r keeps floor((1 - s_r) * in)), also the
  modules whose vector is zero or constant and so keep s_m on every row (every down_proj in reference
  mode), and also at row lambda 0.00. The authors' code does the same (its row step hands every
  module a list of per-row ratios). floor((1 - s) * in) prunes one weight more per row than the block
  step's floor(s * in) whenever s * in is not an integer, so row lambda 0.00 is not the block winner.
- The last block: only its down_proj lacks a consumer and keeps its block sparsity; its q, k, v, o,
  gate and up get per-row sparsities like every other block's. (The authors' code keeps the whole last
  block at its block sparsity.)
"""

from __future__ import annotations

import math

import pytest
import torch

from neuroal.models import architecture_of, block_matrices, decoder_blocks, load_model, prunable_matrices, resolve_model
from neuroal.pruning import base_method, prune_model

CPU = torch.device("cpu")

# Candidate lambdas, written out as docs/algorithm.md lists them.
REF_BLOCK_LAMBDAS = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15, 0.20, 0.25]
REF_ROW_LAMBDAS = [0.00] + REF_BLOCK_LAMBDAS
CLIP_LOW, CLIP_HIGH = 0.01, 0.99


# ---------------------------------------------------------------------------------------------
# The transcription
# ---------------------------------------------------------------------------------------------


def ref_block_lambdas(sparsity: float) -> list[float]:
    """Block candidates: 0.25 is dropped when s >= 0.8."""
    return [lam for lam in REF_BLOCK_LAMBDAS if not (sparsity >= 0.8 and lam == 0.25)]


def clip(value: float) -> float:
    return min(max(value, CLIP_LOW), CLIP_HIGH)


def ref_block_schedule(num_blocks: int, sparsity: float, lam: float) -> list[float]:
    """Block i gets raw value i+1; normalise to [0, 2 lam], shift to mean density 1 - s, sort the
    densities descending (block 0 densest), sparsity = 1 - density, clip."""
    if num_blocks == 1:  # nothing to spread: max - min would be 0
        return [clip(sparsity)]
    raw = [float(i + 1) for i in range(num_blocks)]
    low, high = min(raw), max(raw)
    normalised = [(r - low) / (high - low) * 2 * lam for r in raw]
    mean = sum(normalised) / num_blocks
    densities = sorted((x - mean + (1 - sparsity) for x in normalised), reverse=True)
    return [clip(1 - d) for d in densities]


def ref_row_sparsities(vector: torch.Tensor, module_sparsity: float, lam: float) -> torch.Tensor:
    """Normalise to [0, 2 lam], shift to mean density 1 - s_m, sparsity = 1 - density, clip.
    A zero or constant vector keeps s_m on every row."""
    v = [float(x) for x in vector.double().tolist()]
    low, high = min(v), max(v)
    if high == low:
        return torch.full((len(v),), float(module_sparsity), dtype=torch.float64)
    normalised = [(x - low) / (high - low) * 2 * lam for x in v]
    mean = sum(normalised) / len(v)
    return torch.tensor([clip(1 - (x - mean + (1 - module_sparsity))) for x in normalised], dtype=torch.float64)


def ref_alignment_distance(a_dense: torch.Tensor, a_sparse: torch.Tensor) -> float:
    """d(m) = || a_dense/sum(a_dense) - a_sparse/sum(a_sparse) ||_2 / numel(a_dense)."""
    dense = [float(x) for x in a_dense.double().tolist()]
    sparse = [float(x) for x in a_sparse.double().tolist()]
    sd, ss = sum(dense), sum(sparse)
    return math.sqrt(sum((d / sd - s / ss) ** 2 for d, s in zip(dense, sparse))) / len(dense)


def prune_mask(scores: torch.Tensor, target) -> torch.Tensor:
    """True = prune. One sparsity: the floor(s * in) lowest of every row. Per-row sparsities: row r
    keeps its floor((1 - s_r) * in) highest. Stable sort: among equal scores the lower column goes first."""
    rows, cols = scores.shape
    if isinstance(target, torch.Tensor):
        counts = [cols - math.floor((1 - float(s)) * cols) for s in target.double().tolist()]
    else:
        counts = [int(target * cols)] * rows
    order = torch.sort(scores, dim=1, stable=True).indices
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    for r in range(rows):
        mask[r, order[r, : counts[r]]] = True
    return mask


class _Stop(Exception):
    """Raised after the block of interest ran: later blocks are not needed."""


@torch.no_grad()
def input_norms(model, block, linears: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """a(m) = sqrt(mean over samples of ||X_j||^2), X = m's input over one sample's tokens; each
    sample runs alone through the model as it is now (upstream blocks as they are now)."""
    squares = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}

    def record(name):
        def hook(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            squares[name] += (x**2).sum(dim=0)

        return hook

    def stop(_module, _args, _output):
        raise _Stop

    handles = [lin.owner.register_forward_hook(record(name)) for name, lin in linears.items()]
    handles.append(block.register_forward_hook(stop))
    try:
        for s in range(ids.shape[0]):
            try:
                model(input_ids=ids[s : s + 1])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: torch.sqrt(sq / ids.shape[0]) for name, sq in squares.items()}


def base_scores(method_name: str, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The base method's score, in float32 as the base methods compute it."""
    if method_name == "magnitude":
        return weight.abs().float()
    if method_name == "wanda":
        return weight.abs().float() * a.float().unsqueeze(0)
    raise ValueError(f"the transcription covers magnitude and wanda, not {method_name}")


@torch.no_grad()
def alignment_pass(model, method_name: str, targets: list[dict], ids: torch.Tensor):
    """One layer-sequential pass: score = sum of d(m); delta(m) = a_dense - a_sparse (full names).

    ``targets[i]``: block-relative module name -> sparsity (float) or per-row sparsities (tensor)."""
    arch = architecture_of(model)
    blocks = decoder_blocks(model)
    saved = [{name: lin.weight.detach().clone() for name, lin in block_matrices(b).items()} for b in blocks]
    score, deltas = 0.0, {}
    try:
        for i, block in enumerate(blocks):
            linears = block_matrices(block)
            dense = input_norms(model, block, linears, ids)  # upstream blocks are pruned, block i dense
            for name, lin in linears.items():
                mask = prune_mask(base_scores(method_name, lin.weight, dense[name]), targets[i][name])
                lin.weight[mask] = 0
            sparse = input_norms(model, block, linears, ids)  # block i pruned
            for name in linears:
                score += ref_alignment_distance(dense[name], sparse[name])
                deltas[f"{arch.blocks}.{i}.{name}"] = dense[name] - sparse[name]
            # block i stays pruned so that block i+1 sees its sparse outputs
    finally:
        for block, weights in zip(blocks, saved):
            for name, lin in block_matrices(block).items():
                lin.weight.copy_(weights[name])
    return score, deltas


def gqa_fold(vector: torch.Tensor, rows: int, config) -> torch.Tensor:
    """The o_proj delta, one value per k/v output row: the average over the query heads that share
    each kv head (query heads j*g .. j*g+g-1 of kv head j, head_dim contiguous entries each)."""
    if vector.numel() == rows:
        return vector
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    assert vector.numel() == heads * head_dim and rows == kv_heads * head_dim, (vector.numel(), rows)
    folded = torch.zeros(rows, dtype=vector.dtype)
    for j in range(kv_heads):
        for d in range(head_dim):
            total = sum(float(vector[h * head_dim + d]) for h in range(j * group, j * group + group))
            folded[j * head_dim + d] = total / group
    return folded


def row_vectors(model, block_index: int, deltas: dict) -> dict[str, torch.Tensor | None]:
    """Block-relative module name -> the consumer's delta as one value per output row (None: keeps s_m)."""
    arch = architecture_of(model)
    roles = arch.roles()
    blocks = decoder_blocks(model)
    linears = block_matrices(blocks[block_index])

    def delta(i, role):
        return deltas[f"{arch.blocks}.{i}.{roles[role][0]}"]

    vectors: dict[str, torch.Tensor | None] = {name: None for name in linears}
    for name in roles["attn_in"]:
        vectors[name] = gqa_fold(delta(block_index, "attn_out"), linears[name].out_features, model.config)
    for name in roles["attn_out"]:
        vectors[name] = delta(block_index, "mlp_in")
    for name in roles["mlp_in"]:
        vectors[name] = delta(block_index, "mlp_out")
    if block_index + 1 < len(blocks):  # the last block's down keeps its block sparsity
        for name in roles["mlp_out"]:
            vectors[name] = delta(block_index + 1, "attn_in")
    for name, vector in vectors.items():
        assert vector is None or vector.numel() == linears[name].out_features, name
    return vectors


def pick(scores: dict[float, float]) -> float:
    """Lowest score; ties go to the first candidate in the list."""
    best = None
    for lam, value in scores.items():
        if best is None or value < scores[best]:
            best = lam
    return best


def reference_search(model, method_name: str, sparsity: float, search_ids: torch.Tensor, step: str = "both"):
    """docs/algorithm.md, reference mode. Returns (block_lambda, row_lambda or None, block_scores,
    row_scores, allocation full-name -> float or per-row float64 tensor)."""
    arch = architecture_of(model)
    blocks = decoder_blocks(model)
    names = [list(block_matrices(b)) for b in blocks]

    def block_targets(schedule):
        return [{name: schedule[i] for name in names[i]} for i in range(len(blocks))]

    block_scores, block_deltas = {}, {}
    if step in ("block", "both"):
        for lam in ref_block_lambdas(sparsity):
            block_scores[lam], block_deltas[lam] = alignment_pass(
                model, method_name, block_targets(ref_block_schedule(len(blocks), sparsity, lam)), search_ids
            )
        block_lambda = pick(block_scores)
        schedule = ref_block_schedule(len(blocks), sparsity, block_lambda)
        deltas = block_deltas[block_lambda]
    else:  # row step alone: on the uniform distribution, deltas from one pass at it
        block_lambda, schedule = 0.0, [clip(sparsity)] * len(blocks)
        _, deltas = alignment_pass(model, method_name, block_targets(schedule), search_ids)

    allocation = {f"{arch.blocks}.{i}.{name}": schedule[i] for i in range(len(blocks)) for name in names[i]}
    if step == "block":
        return block_lambda, None, block_scores, {}, allocation

    vectors = [row_vectors(model, i, deltas) for i in range(len(blocks))]
    linears = [block_matrices(b) for b in blocks]
    row_scores, row_targets = {}, {}
    for lam in REF_ROW_LAMBDAS:
        targets = []
        for i in range(len(blocks)):
            per_block = {}
            for name in names[i]:
                v = vectors[i][name]
                if v is None:
                    v = torch.zeros(linears[i][name].out_features, dtype=torch.float64)
                per_block[name] = ref_row_sparsities(v, schedule[i], lam)
            targets.append(per_block)
        row_targets[lam] = targets
        row_scores[lam], _ = alignment_pass(model, method_name, targets, search_ids)
    row_lambda = pick(row_scores)
    allocation = {
        f"{arch.blocks}.{i}.{name}": row_targets[row_lambda][i][name] for i in range(len(blocks)) for name in names[i]
    }
    return block_lambda, row_lambda, block_scores, row_scores, allocation


# ---------------------------------------------------------------------------------------------
# Formula tests (hand-written expectations)
# ---------------------------------------------------------------------------------------------


def test_transcription_formulas_agree_with_hand_values():
    """The transcription's own formulas, on values worked out by hand."""
    assert ref_block_schedule(3, 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6], abs=1e-12)
    assert ref_row_sparsities(torch.tensor([0.0, 1.0, 2.0]), 0.5, 0.1).tolist() == pytest.approx(
        [0.6, 0.5, 0.4], abs=1e-12
    )
    assert ref_alignment_distance(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])) == pytest.approx(
        math.sqrt(2 * 0.25**2) / 2
    )


def test_block_lambdas_drop_025_at_high_sparsity():
    from neuroal.pruning.allocators.neuroal.math import BLOCK_LAMBDAS, ROW_LAMBDAS, block_lambdas

    assert list(BLOCK_LAMBDAS) == pytest.approx(REF_BLOCK_LAMBDAS)
    assert list(ROW_LAMBDAS) == pytest.approx(REF_ROW_LAMBDAS)
    for s in (0.5, 0.7, 0.79):
        assert block_lambdas(s) == pytest.approx(REF_BLOCK_LAMBDAS)
    for s in (0.8, 0.9):
        assert block_lambdas(s) == pytest.approx(REF_BLOCK_LAMBDAS[:-1])


@pytest.mark.parametrize("num_blocks", [2, 3, 7, 30])
@pytest.mark.parametrize(("s", "lam"), [(0.5, 0.1), (0.7, 0.25), (0.6, 0.03)])
def test_block_schedule_is_linear_between_s_minus_and_plus_lambda(num_blocks, s, lam):
    from neuroal.pruning.allocators.neuroal.math import block_schedule

    got = block_schedule(num_blocks, s, lam)
    assert len(got) == num_blocks
    expected = [s - lam + 2 * lam * i / (num_blocks - 1) for i in range(num_blocks)]
    assert list(got) == pytest.approx(expected, abs=1e-9)
    assert sum(got) / num_blocks == pytest.approx(s, abs=1e-9)  # nothing clips here
    assert list(got) == pytest.approx(ref_block_schedule(num_blocks, s, lam), abs=1e-12)


def test_block_schedule_clips():
    from neuroal.pruning.allocators.neuroal.math import block_schedule

    # s = 0.05, lambda = 0.1: raw ends -0.05 and 0.15; -0.05 clips to 0.01
    assert list(block_schedule(3, 0.05, 0.1)) == pytest.approx([0.01, 0.05, 0.15], abs=1e-9)
    # s = 0.95, lambda = 0.1: 0.85 .. 1.05; 1.05 clips to 0.99
    assert list(block_schedule(3, 0.95, 0.1)) == pytest.approx([0.85, 0.95, 0.99], abs=1e-9)
    assert list(block_schedule(5, 0.9, 0.25)) == pytest.approx([0.65, 0.775, 0.9, 0.99, 0.99], abs=1e-9)


def test_row_sparsities_mean_and_order():
    from neuroal.pruning.allocators.neuroal.math import row_sparsities

    vector = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.0])
    got = row_sparsities(vector, 0.6, 0.1).double()
    assert got.shape == (5,)
    assert (1 - got).mean().item() == pytest.approx(0.4, abs=1e-9)  # mean density 1 - s_m
    assert int(got.argmin()) == 2 and int(got.argmax()) == 1  # largest delta -> lowest sparsity
    assert got.max().item() - got.min().item() == pytest.approx(0.2, abs=1e-9)  # spread 2 lambda
    # by hand: normalised = (v + 1) / 3 * 0.2, mean 0.0853..., sparsity = 0.6 - (normalised - mean)
    normalised = [(x + 1) / 3 * 0.2 for x in vector.tolist()]
    mean = sum(normalised) / 5
    assert got.tolist() == pytest.approx([0.6 - (x - mean) for x in normalised], abs=1e-7)
    assert got.tolist() == pytest.approx(ref_row_sparsities(vector, 0.6, 0.1).tolist(), abs=1e-7)


def test_row_sparsities_constant_zero_and_clipping():
    from neuroal.pruning.allocators.neuroal.math import row_sparsities

    for vector in (torch.zeros(6), torch.full((6,), 3.5)):
        assert row_sparsities(vector, 0.7, 0.2).double().tolist() == pytest.approx([0.7] * 6, abs=1e-9)
    # s_m = 0.95, lambda = 0.1, two rows: sparsities 1.05 and 0.85 -> 1.05 clips to 0.99
    assert row_sparsities(torch.tensor([0.0, 1.0]), 0.95, 0.1).double().tolist() == pytest.approx(
        [0.99, 0.85], abs=1e-7
    )
    assert row_sparsities(torch.tensor([0.0, 1.0]), 0.05, 0.1).double().tolist() == pytest.approx(
        [0.15, 0.01], abs=1e-7
    )
    # lambda 0 on a non-constant vector: every row at s_m
    assert row_sparsities(torch.tensor([0.0, 1.0, 5.0]), 0.6, 0.0).double().tolist() == pytest.approx(
        [0.6] * 3, abs=1e-9
    )


def test_alignment_distance_by_hand():
    from neuroal.pruning.allocators.neuroal.math import alignment_distance

    # dense / sum = [0.25, 0.75], sparse / sum = [0.5, 0.5]: norm sqrt(2 * 0.0625), over numel 2
    assert alignment_distance(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == pytest.approx(
        math.sqrt(0.125) / 2, rel=1e-6
    )
    # scale does not matter, identical directions give 0
    assert alignment_distance(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(
        0.0, abs=1e-9
    )
    a, b = torch.rand(7, generator=torch.Generator().manual_seed(0)), torch.rand(7)
    assert alignment_distance(a, b) == pytest.approx(ref_alignment_distance(a, b), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Parity: the fast search against the transcription on the tiny GQA Llama
# ---------------------------------------------------------------------------------------------


def search_ids() -> torch.Tensor:
    return torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))


def calib_ids() -> torch.Tensor:
    return torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(1))


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


_RUNS: dict = {}


def run_both(folder, method_name: str, sparsity: float):
    """(reference tuple, fast result, fast model's weights before, after); computed once per case."""
    key = (str(folder), method_name, sparsity)
    if key not in _RUNS:
        from neuroal.pruning.allocators.neuroal import Options, search_lambdas

        ref_model, _ = load_model(resolve_model(str(folder)))
        fast_model, _ = load_model(resolve_model(str(folder)))
        ref = reference_search(ref_model, method_name, sparsity, search_ids())
        before = weights_of(fast_model)
        fast = search_lambdas(fast_model, base_method(method_name), sparsity, search_ids(), CPU,
                              Options(step="both", mode="reference", strategy="grid"), batch_size=8)
        _RUNS[key] = (ref, fast, before, weights_of(fast_model))
    return _RUNS[key]


def same_lambda(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and abs(a - b) < 1e-9


def find_key(scores: dict, lam: float):
    matches = [k for k in scores if abs(k - lam) < 1e-9]
    assert len(matches) == 1, (lam, sorted(scores))
    return matches[0]


def allocation_differences(ref: dict, fast: dict) -> list[str]:
    """Floats within 1e-9, per-row tensors within 1e-6. A float and a tensor of the same values
    compare equal here; whether they prune alike is the final-mask test's business."""
    problems = [f"module sets differ: {sorted(set(ref) ^ set(fast))}"] if set(fast) != set(ref) else []
    for name in sorted(set(ref) & set(fast)):
        expected, got = ref[name], fast[name]
        if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
            rows = expected.numel() if isinstance(expected, torch.Tensor) else got.numel()
            e, g = (
                t.double().cpu() if isinstance(t, torch.Tensor) else torch.full((rows,), float(t), dtype=torch.float64)
                for t in (expected, got)
            )
            if g.shape != e.shape:
                problems.append(f"{name}: {tuple(g.shape)} rows, expected {tuple(e.shape)}")
            elif not torch.allclose(g, e, rtol=0, atol=1e-6):
                problems.append(f"{name}: per-row sparsities off by {(g - e).abs().max().item():.3g}")
        elif abs(float(got) - float(expected)) > 1e-9:
            problems.append(f"{name}: {got} != {expected}")
    return problems


def assert_same_allocation(ref: dict, fast: dict):
    problems = allocation_differences(ref, fast)
    assert not problems, "\n".join(problems)


def score_differences(kind: str, ref: dict, fast: dict, rel: float = 1e-4) -> list[str]:
    problems = []
    for lam, value in fast.items():
        matches = [k for k in ref if abs(k - lam) < 1e-9]
        if len(matches) != 1:
            problems.append(f"{kind} lambda {lam}: not a candidate of the transcription")
        elif abs(value - ref[matches[0]]) > rel * abs(ref[matches[0]]):
            problems.append(f"{kind} lambda {lam}: score {value:.9g}, transcription {ref[matches[0]]:.9g}")
    return problems


CASES = [("magnitude", 0.5), ("magnitude", 0.7), ("wanda", 0.5), ("wanda", 0.7)]


@pytest.mark.slow
@pytest.mark.parametrize(("method_name", "sparsity"), CASES)
def test_search_matches_transcription(tiny_llama, method_name, sparsity):
    """Same lambdas, same scores for every candidate, same allocation, model left dense. Every
    difference is listed at once."""
    from neuroal.pruning.allocators.neuroal.math import block_schedule

    (block_lambda, row_lambda, block_scores, row_scores, allocation), fast, before, after = run_both(
        tiny_llama, method_name, sparsity
    )
    problems = []
    if not same_lambda(fast.block_lambda, block_lambda):
        problems.append(f"block lambda {fast.block_lambda}, transcription {block_lambda}")
    if not same_lambda(fast.row_lambda, row_lambda):
        problems.append(f"row lambda {fast.row_lambda}, transcription {row_lambda}")

    # grid: every block candidate, every row candidate except possibly 0.00
    missing = [lam for lam in block_scores if not any(abs(k - lam) < 1e-9 for k in fast.block_scores)]
    missing += [lam for lam in row_scores if lam != 0.0 and not any(abs(k - lam) < 1e-9 for k in fast.row_scores)]
    if missing:
        problems.append(f"candidates not evaluated: {missing}")
    problems += score_differences("block", block_scores, fast.block_scores)
    # Row lambda 0.00 puts every row at its block sparsity but prunes with per-row masks: a row keeps
    # floor((1 - s) * in), one weight fewer than the block step's floor(s * in) whenever s * in is not
    # an integer. So it is not the block winner again: when the fast search reports it, it must be
    # the per-row score.
    problems += score_differences("row", row_scores, fast.row_scores)

    expected_schedule = block_schedule(3, sparsity, block_lambda)
    if list(fast.block_sparsities) != pytest.approx(expected_schedule, abs=1e-9):
        problems.append(f"block sparsities {list(fast.block_sparsities)}, expected {expected_schedule}")
    problems += allocation_differences(allocation, fast.allocation)

    if set(after) != set(before):
        problems.append("the search changed the model's parameter set")
    problems += [
        f"the search changed {name}" for name in before if name in after and not torch.equal(after[name], before[name])
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize(("method_name", "sparsity"), CASES)
def test_final_masks_match_transcription(tiny_llama, method_name, sparsity):
    """The allocations prune the same weights: the same zero mask in every module."""
    (_, _, _, _, allocation), fast, _, _ = run_both(tiny_llama, method_name, sparsity)
    masks = []
    for chosen in (allocation, fast.allocation):
        model, _ = load_model(resolve_model(str(tiny_llama)))
        prune_model(model, base_method(method_name), chosen, calib_ids(), CPU, batch_size=2)
        masks.append({name: lin.weight == 0 for name, lin in prunable_matrices(model).items()})
    reference, got = masks
    assert set(got) == set(reference)
    problems = [
        f"{name}: {(got[name] != reference[name]).sum().item()} entries differ "
        f"(zeros {got[name].sum().item()} vs transcription {reference[name].sum().item()})"
        for name in reference
        if not torch.equal(got[name], reference[name])
    ]
    assert not problems, "\n".join(problems)


def test_gqa_row_step_folds_to_kv_rows():
    """Query heads 4, kv heads 2, head_dim 8 != hidden / heads: k and v get one sparsity per kv row,
    q one per query row, and the values agree with the transcription's fold."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from neuroal.pruning.allocators.neuroal import Options, search_lambdas

    config = tiny_llama_config(vocab_size=128, num_hidden_layers=2, head_dim=8)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        model.config.use_cache = False
        models.append(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    fast = search_lambdas(models[0], base_method("wanda"), 0.6, ids, CPU, Options(step="both", mode="reference", strategy="grid"))
    assert fast.row_lambda is not None
    layers = decoder_blocks(models[0])
    for i, block in enumerate(layers):
        attn = block.self_attn
        assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16  # 4 x 8 and 2 x 8
        for proj in ("q_proj", "k_proj", "v_proj"):
            target = fast.allocation[f"model.layers.{i}.self_attn.{proj}"]
            assert isinstance(target, torch.Tensor) and target.shape == (getattr(attn, proj).out_features,), proj

    ref = reference_search(models[1], "wanda", 0.6, ids)
    assert same_lambda(fast.block_lambda, ref[0]) and same_lambda(fast.row_lambda, ref[1])
    assert_same_allocation(ref[4], fast.allocation)


def test_gqa_fold_by_hand():
    """The transcription's fold: kv head j averages query heads 2j and 2j+1, entry by entry."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    vector = torch.arange(8, dtype=torch.float64)  # heads: [0,1] [2,3] [4,5] [6,7]
    assert gqa_fold(vector, 4, config).tolist() == [1.0, 2.0, 5.0, 6.0]
