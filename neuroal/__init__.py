"""neuroal: NeuroAl and peer sparsity allocators for pruning LLMs without re-training."""

__version__ = "0.1.0"
