"""Model specs, loading, the architecture table, and the prunable matrices of a block."""

from neuroal.models.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    decoder_blocks,
    matrices_by_block,
    prunable_matrices,
)
from neuroal.models.loading import (
    ALIASES,
    ModelSource,
    check_weights,
    context_length,
    load_config,
    load_model,
    load_tokenizer,
    prefault_block_weights,
    published_dtype,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from neuroal.models.matrices import Matrix, block_matrices

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "Architecture",
    "Matrix",
    "ModelSource",
    "published_dtype",
    "architecture_of",
    "block_matrices",
    "check_weights",
    "context_length",
    "decoder_blocks",
    "load_config",
    "load_model",
    "load_tokenizer",
    "matrices_by_block",
    "prefault_block_weights",
    "prunable_matrices",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
]
