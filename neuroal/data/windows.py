"""Whether each calibration or perplexity window starts with the model's BOS token.

Windows are cut from one token stream, so only the first one would start with BOS. Families
trained to always see BOS first degrade badly without it: dense Gemma-3-270M on 8 Penn Treebank
windows of 256 tokens scores perplexity 864 without a BOS per window and 166 with one, and its
calibration statistics are skewed the same way. For those families a window of ``seqlen`` tokens
is BOS + ``seqlen - 1`` stream tokens.

The other families keep the reference's convention (one stream, no BOS per window), which is how
the literature's Llama, SmolLM2 and Qwen numbers were measured, so results stay comparable.

The rule is data: ``BOS_PER_WINDOW_MODEL_TYPES``, keyed by the model config's ``model_type``.
``--bos-per-window on|off`` overrides it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

from neuroal.errors import UserError

BOS_PER_WINDOW_CHOICES: tuple[str, ...] = ("auto", "on", "off")


def _yaml_switch(value):
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean; take it back as the word."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


# The setting as a config field: auto (the family rule below), on or off, also from YAML's booleans.
BosPerWindow = Annotated[Literal[BOS_PER_WINDOW_CHOICES], BeforeValidator(_yaml_switch)]

# Model types whose models expect BOS at the start of every sequence (Gemma's tokenizers add it
# to every text and its attention leans on that position). Add a family here, not an if-chain.
BOS_PER_WINDOW_MODEL_TYPES = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "recurrent_gemma",
})


def family_wants_bos(model_config) -> bool:
    """Whether the model's family expects BOS at every window start (the ``auto`` rule)."""
    model_type = getattr(model_config, "model_type", None)
    text_type = getattr(getattr(model_config, "text_config", None), "model_type", None)
    return bool({model_type, text_type} & BOS_PER_WINDOW_MODEL_TYPES)


def resolve_bos_per_window(setting: str, model_config) -> bool:
    """Resolve ``auto``/``on``/``off`` for one model.

    Args:
        setting: ``"auto"`` (the family rule), ``"on"`` or ``"off"``.
        model_config: The model's Hugging Face config (its ``model_type`` decides ``auto``).

    Returns:
        True when every window starts with BOS.

    Raises:
        UserError: ``setting`` is not one of the three choices.
    """
    if setting not in BOS_PER_WINDOW_CHOICES:
        raise UserError(f"--bos-per-window must be one of {', '.join(BOS_PER_WINDOW_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return family_wants_bos(model_config)
    return setting == "on"


def window_bos_id(tokenizer) -> int:
    """The tokenizer's BOS id, put at the start of every window.

    Raises:
        UserError: The tokenizer has no BOS token.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise UserError("--bos-per-window on needs a tokenizer with a BOS token, and this one has none; "
                        "use --bos-per-window off")
    return int(bos)
