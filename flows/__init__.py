"""Prefect flows: ``prune_cell`` (one model x method x top-up x sparsity) and ``campaign`` (the
grid of ``params.yaml``, with the dense baselines), composed from ``tasks``."""
