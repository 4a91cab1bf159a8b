"""Architecture table: where each model family keeps its decoder blocks and which modules play
which role. Differences between families are data here, never copies of functions.

Roles (names relative to one decoder block: a linear's module, or a fused expert tensor):
  attn_in   the projections that read the attention input (q, k, v or a fused qkv)
  attn_out  the attention output projection
  mlp_in    the projections that read the MLP input (gate and up, or fc1; each expert's gate_up)
  mlp_out   the MLP output projection (each expert's down)
A role may list names that only some blocks hold (Qwen MoE models mix dense and expert blocks);
where several MLP inputs are present, the first listed stands for the MLP's input. Every matrix
of a block is prunable whether or not it has a role (``matrices.py``); roles only tell the NeuroAl
row step which matrix feeds which.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from neuroal.errors import UserError
from neuroal.models.matrices import Matrix, block_matrices

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Where a family's decoder blocks are and the role of each projection in a block."""

    blocks: str
    attn_in: tuple[str, ...] = ()
    attn_out: tuple[str, ...] = ()
    mlp_in: tuple[str, ...] = ()
    mlp_out: tuple[str, ...] = ()
    # Row order of a fused q/k/v projection: "concat" ([q; k; v]) or "per_head" ([q_h; k_h; v_h]
    # for each head h, as GPT-NeoX lays out query_key_value).
    qkv_layout: str = "concat"

    def roles(self) -> dict[str, tuple[str, ...]]:
        """Role name -> module names, for the roles this architecture knows."""
        return {
            "attn_in": self.attn_in,
            "attn_out": self.attn_out,
            "mlp_in": self.mlp_in,
            "mlp_out": self.mlp_out,
        }


_LLAMA_LIKE = Architecture(
    blocks="model.layers",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out=("self_attn.o_proj",),
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out=("mlp.down_proj",),
)

# Mixture-of-experts blocks (transformers 5 fuses each layer's experts into 3-D tensors). Qwen2/3-MoE
# also have dense-MLP blocks (``mlp_only_layers``, ``decoder_sparse_step``); Qwen2-MoE adds a
# shared expert that reads every token, so it stands for the MLP's input.
_MOE = dataclasses.replace(_LLAMA_LIKE, mlp_in=("mlp.experts.gate_up_proj",), mlp_out=("mlp.experts.down_proj",))
_QWEN_MOE = dataclasses.replace(
    _LLAMA_LIKE,
    mlp_in=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.experts.gate_up_proj", *_LLAMA_LIKE.mlp_in),
    mlp_out=("mlp.shared_expert.down_proj", "mlp.experts.down_proj", *_LLAMA_LIKE.mlp_out),
)

# Keyed by the Hugging Face class name of the causal-LM model.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "MixtralForCausalLM": _MOE,
    "OlmoeForCausalLM": _MOE,
    "Qwen2MoeForCausalLM": _QWEN_MOE,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Gemma3ForCausalLM": _LLAMA_LIKE,
    "PhiForCausalLM": Architecture(
        blocks="model.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out=("self_attn.dense",),
        mlp_in=("mlp.fc1",),
        mlp_out=("mlp.fc2",),
    ),
    "Phi3ForCausalLM": Architecture(
        blocks="model.layers",
        attn_in=("self_attn.qkv_proj",),
        attn_out=("self_attn.o_proj",),
        mlp_in=("mlp.gate_up_proj",),
        mlp_out=("mlp.down_proj",),
    ),
    "OPTForCausalLM": Architecture(
        blocks="model.decoder.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out=("self_attn.out_proj",),
        mlp_in=("fc1",),
        mlp_out=("fc2",),
    ),
    "GPTNeoXForCausalLM": Architecture(
        blocks="gpt_neox.layers",
        attn_in=("attention.query_key_value",),
        attn_out=("attention.dense",),
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out=("mlp.dense_4h_to_h",),
        qkv_layout="per_head",
    ),
}

# Last path component -> role, for families not in the table (generic fallback).
_ROLE_BY_NAME = {
    **{n: "attn_in" for n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")},
    **{n: "attn_out" for n in ("o_proj", "out_proj")},
    **{n: "mlp_in" for n in ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h")},
    **{n: "mlp_out" for n in ("down_proj", "fc2", "w2", "dense_4h_to_h")},
}


def architecture_of(model: nn.Module) -> Architecture:
    """Return the table entry for ``model``, or one derived from ``_no_split_modules``."""
    name = type(model).__name__
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    arch = _generic_architecture(model)
    logger.info("architecture %s is not in the table; using blocks at %r", name, arch.blocks)
    return arch


def decoder_blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The model's ordered list of decoder blocks."""
    arch = arch or architecture_of(model)
    return model.get_submodule(arch.blocks)


def matrices_by_block(model: nn.Module, arch: Architecture | None = None) -> list[dict[str, Matrix]]:
    """Per decoder block, its prunable matrices by full name (``model.layers.3.mlp.up_proj``,
    ``model.layers.3.mlp.experts.down_proj.5``)."""
    arch = arch or architecture_of(model)
    return [
        {f"{arch.blocks}.{index}.{name}": matrix for name, matrix in block_matrices(block).items()}
        for index, block in enumerate(decoder_blocks(model, arch))
    ]


def prunable_matrices(model: nn.Module, arch: Architecture | None = None) -> dict[str, Matrix]:
    """Every prunable matrix of the model by its full name, in block order."""
    return {name: m for block in matrices_by_block(model, arch) for name, m in block.items()}


def _generic_architecture(model: nn.Module) -> Architecture:
    """Find the block list from ``_no_split_modules`` and guess roles from the last component of the
    matrices' stems (``q_proj``, ``gate_up_proj``, ...)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in block_classes:
            roles: dict[str, list[str]] = {"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_out": []}
            # every block's stems: a model may start with dense blocks before its expert blocks (DeepSeek)
            for stem in dict.fromkeys(m.stem for block in module for m in block_matrices(block).values()):
                role = _ROLE_BY_NAME.get(stem.rsplit(".", 1)[-1])
                if role:
                    roles[role].append(stem)
            return Architecture(blocks=path, **{k: tuple(v) for k, v in roles.items()})
    raise UserError(
        f"cannot find the decoder blocks of {type(model).__name__}: no module list of "
        f"{sorted(block_classes) or '_no_split_modules'}; add the family to neuroal.models.architectures"
    )
