"""neuroal: NeuroAl and peer sparsity allocators for pruning LLMs without re-training."""

__version__ = "0.1.0"

# Bump whenever a change alters the allocation or masks that a config produces: campaigns then
# recompute the allocations and checkpoints that older code cached instead of reusing them.
# 2: NeuroAl's coarse strategy searches in lambda (golden section), not in grid steps.
# 3: each block is replayed with its own layer type's mask and rotary embedding (sliding-window
#    families); flattened MLP inputs (OPT) count samples, not batches.
# 4: experts of mixture-of-experts models are pruned and counted; block allocators balance their
#    block sparsities by weight count; row counts forgive float error (0.65 * 80 prunes 52).
RESULTS_VERSION = 4
