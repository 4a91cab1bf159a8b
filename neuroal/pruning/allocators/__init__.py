"""Sparsity allocators (``--top-up``): one package each, holding its math, its typed options and
``ALLOCATOR`` (a ``plugin.Allocator``). Adding one is a new package here plus its name in
``neuroal.pruning.registry.ALLOCATOR_NAMES``; configs, the CLI and the pipeline find it there."""
