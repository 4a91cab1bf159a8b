"""Model specs, loading, and the architecture table."""

from neuroal.models.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    block_linears,
    decoder_blocks,
    linears_by_block,
    prunable_linears,
)
from neuroal.models.loading import (
    ALIASES,
    ModelSource,
    check_weights,
    context_length,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model,
)

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "Architecture",
    "ModelSource",
    "architecture_of",
    "block_linears",
    "check_weights",
    "context_length",
    "decoder_blocks",
    "linears_by_block",
    "load_config",
    "load_model",
    "load_tokenizer",
    "prunable_linears",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
]
