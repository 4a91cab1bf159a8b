"""Resolve a model spec to a local folder and load it as (model, tokenizer).

A spec is a Hugging Face hub id, a local model folder, a ``.gguf`` file, or an alias of
``ALIASES`` (the model zoo, see ``neuroal.models.zoo``). GGUF files are dequantized once into a
cached safetensors folder, because GGUF parsing takes ~20 s and the converted folder loads in
under a second.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from neuroal.digests import file_digest, pickle_weight_files, weight_files, weights_digest
from neuroal.errors import UserError
from neuroal.files import SAFETENSORS_DTYPES, remove_stale_temporaries, safetensors_header, temporary_path
from neuroal.models.architectures import decoder_blocks
from neuroal.models.zoo import ALIASES, locate_parts, whole_gguf
from neuroal.paths import cache_dir

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What transformers raises for a folder or file it cannot read as a model.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)

# Config attributes that hold a model's context length, by family.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Hub files we need; weights are safetensors only (pickled .bin files can run code on load).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: the spec as given, the local folder it resolved to, a digest."""

    spec: str
    kind: str  # "alias", "gguf", "folder" or "hub"
    folder: Path
    digest: str  # sha256 over the weight files (of the GGUF file for aliases and .gguf specs)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "digest": self.digest}


def resolve_model(spec: str) -> ModelSource:
    """Turn a model spec into a local folder with config, safetensors weights and tokenizer."""
    if spec in ALIASES:
        return _alias_source(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {spec} does not exist")
        return _gguf_source(spec, "gguf", path)
    if path.exists():
        return _folder_source(spec, path)
    if _looks_like_path(spec):
        raise UserError(f"model folder {spec} does not exist")
    return _hub_source(spec)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} requested but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half precision is slow there), bfloat16 on GPUs that have it."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def published_dtype(source: ModelSource) -> torch.dtype:
    """The floating dtype that most of a model's weights are stored in (by element count), read
    from its safetensors headers: what a hub model was published in, float32 for a dequantized GGUF.
    float32 for a folder of pickled weights, whose dtypes cannot be read without unpickling."""
    counts: dict[str, int] = {}
    for path in weight_files(source.folder):
        layout = json.loads(safetensors_header(path))
        for name, info in layout.items():
            if name != "__metadata__" and SAFETENSORS_DTYPES.get(info["dtype"]) in DTYPES:
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + math.prod(info["shape"])
    return getattr(torch, SAFETENSORS_DTYPES[max(counts, key=counts.get)]) if counts else torch.float32


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load a resolved model on the CPU; work is moved to the compute device block by block.

    Weights are read from safetensors files; pickled ``.bin`` weights only with ``allow_pickle``
    (unpickling can run code). Returns ``(model, tokenizer)`` with the model in eval mode and the
    KV cache off.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(source, trust_remote_code)
    safe = check_weights(source, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=safe
        )
    except _LOAD_ERRORS as exc:
        raise UserError(f"cannot load model {source.spec}: {_first_line(exc)}") from None
    model.eval()
    model.config.use_cache = False
    return model, load_tokenizer(source, trust_remote_code)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in writable, as writing to each page would


def prefault_block_weights(model) -> None:
    """Fault the decoder blocks' weights in writable, in one system call per tensor, before they
    are pruned in place.

    transformers maps safetensors files copy-on-write, so the first write to each mapped page
    traps and copies it: zeroing a block matrix the first time costs 15x a later write on SmolLM2
    here (4.05 s of a qwen2.5-coder-0.5b prune). The kernel makes those private copies far faster
    in bulk (0.16 s for SmolLM2's blocks), without holding the file's pages and their copies at
    once, as copying the tensors would. Data never changes: on memory already private, or where
    the call is not supported (not Linux, an older kernel), it does nothing.
    """
    if sys.platform != "linux":
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    for param in decoder_blocks(model).parameters():  # load_model loads on the CPU
        if not param.numel():
            continue
        start = param.data_ptr()
        extent = (1 + sum((n - 1) * stride for n, stride in zip(param.shape, param.stride()))) * param.element_size()
        madvise(start - start % page, extent + start % page, _MADV_POPULATE_WRITE)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer of a resolved model (no weights are read)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_check_folder(source), trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise UserError(f"cannot load the tokenizer of {source.spec}: {_first_line(exc)}") from None


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The model config of a resolved model (no weights are read).

    Raises ``UserError`` for a folder that is not a model, a model that is not a causal language
    model, and one that needs the code shipped with it unless ``trust_remote_code``.
    """
    from transformers import AutoConfig

    folder = _check_folder(source)
    if not trust_remote_code:
        _refuse_remote_code(source)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise UserError(f"cannot read the config of {source.spec}: {_first_line(exc)}") from None
    _check_causal_lm(source, config)
    return config


def check_weights(source: ModelSource, allow_pickle: bool = False) -> bool:
    """Check, without loading them, that a model's weight files can be loaded: safetensors files
    whose headers cover the file (a truncated download fails here), or pickled ``.bin`` files
    when ``allow_pickle``. Returns whether the weights are safetensors."""
    from safetensors import safe_open

    folder = _check_folder(source)
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise UserError(f"cannot load model {source.spec}: weight file {path.name} is truncated or corrupt "
                            f"({_first_line(exc)}); download or convert it again") from None
    if weight_files(folder):
        return True
    if not pickle_weight_files(folder):
        raise UserError(f"{source.spec} has no weights: no .safetensors (or .bin) files in {folder}")
    if source.kind == "hub":
        raise UserError(f"hub model {source.spec} has no safetensors weights, and pickled weights are not "
                        "downloaded; download it yourself and pass its folder with --allow-pickle if you trust it")
    if not allow_pickle:
        raise UserError(f"{source.spec} has only pickled .bin weights, and unpickling can run code; convert them "
                        "to safetensors, or pass --allow-pickle (prune.allow_pickle) if you trust the model")
    return False


def _check_folder(source: ModelSource) -> Path:
    if not (source.folder / "config.json").is_file():
        raise UserError(f"{source.spec} is not a model folder: it has no config.json")
    return source.folder


def _refuse_remote_code(source: ModelSource) -> None:
    """A config with ``auto_map`` and a model type transformers does not know needs the Python
    code shipped beside it; transformers would refuse with a hint at its own argument."""
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads((source.folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of {source.spec}: config.json is not valid JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{source.spec} needs the code shipped with it (auto_map in its config.json); "
                        "pass --trust-remote-code to run it, only for a model you trust")


def _check_causal_lm(source: ModelSource, config) -> None:
    """Refuse encoders (BERT) and encoder-decoders (T5): pruning assumes a decoder-only causal LM.

    ``config.architectures`` names the classes the model was saved from; a model of a known type
    saved as another head (``BertForMaskedLM``) would otherwise load as a causal LM with new weights.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved_as = list(getattr(config, "architectures", None) or [])
    known = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "auto_map", None)
    if known and (not saved_as or any(a in causal_classes or a.endswith("ForCausalLM") for a in saved_as)):
        return
    kind = ", ".join(saved_as) or config.model_type
    raise UserError(f"{source.spec} is not a causal language model ({kind}); neuroal prunes decoder-only "
                    "models such as LlamaForCausalLM")


def context_length(model_config) -> int | None:
    """The longest sequence the model accepts, from whichever attribute its family uses."""
    for attr in _CONTEXT_ATTRS:
        value = getattr(model_config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _alias_source(alias: str) -> ModelSource:
    """An alias's converted folder. Its packages must be installed even when the folder is cached,
    so that an alias resolves the same way on every machine; its digest is its GGUF file's."""
    entry = ALIASES[alias]
    parts = locate_parts(alias, entry)
    folder = _converted_folder(entry.gguf, entry.sha256)
    if not _is_converted(folder):
        gguf = whole_gguf(alias, entry, parts, cache_dir("gguf"))
        _convert_gguf(gguf, folder, entry.sha256, tie_embeddings=entry.tie_embeddings)
    return ModelSource(spec=alias, kind="alias", folder=folder, digest=entry.sha256)


def _gguf_source(spec: str, kind: str, gguf: Path) -> ModelSource:
    digest = file_digest(gguf)
    folder = _converted_folder(gguf.name, digest)
    if not _is_converted(folder):
        _convert_gguf(gguf, folder, digest)
    return ModelSource(spec=spec, kind=kind, folder=folder, digest=digest)


def _converted_folder(gguf_name: str, digest: str) -> Path:
    return cache_dir("models") / f"{Path(gguf_name).stem}-{digest[:16]}"


def _is_converted(folder: Path) -> bool:
    return (folder / "neuroal-source.json").is_file()  # written last: the folder is complete


def _convert_gguf(gguf: Path, folder: Path, digest: str, tie_embeddings: bool = False) -> None:
    """Dequantize a GGUF file into a safetensors folder, written aside and renamed into place.

    With ``tie_embeddings`` the LM head becomes the input embedding matrix (the GGUF's separate
    ``output.weight`` is dropped), as in the upstream model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to safetensors (once; cached in %s)", gguf.name, folder)
    remove_stale_temporaries(folder)
    tmp = temporary_path(folder)
    tmp.mkdir()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except _LOAD_ERRORS as exc:
            raise UserError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from None
        if tie_embeddings:
            _tie_embeddings(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "neuroal-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=1))
        if not (folder / "neuroal-source.json").is_file():  # else a concurrent run finished first
            shutil.rmtree(folder, ignore_errors=True)  # a stale, incomplete conversion
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tie_embeddings(model) -> None:
    """Share the input embeddings with the LM head. transformers will not tie them itself when a
    GGUF holds both matrices with different values (two quantizations of one matrix)."""
    model.config.tie_word_embeddings = True
    model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"could not tie the embeddings of {type(model).__name__}")


def _folder_source(spec: str, path: Path) -> ModelSource:
    if not path.is_dir():
        raise UserError(f"{spec} is neither a model folder nor a .gguf file")
    return ModelSource(spec=spec, kind="folder", folder=path.resolve(), digest=weights_digest(path))


def _hub_source(spec: str) -> ModelSource:
    """Download (or find in the local HF cache when offline) a hub repo's safetensors snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types: offline, 404, auth, bad id
        raise UserError(
            f"model {spec} not found: not a local path, and the Hugging Face hub could not serve it "
            f"({type(exc).__name__}); pass a local folder, a .gguf file or an alias: {', '.join(ALIASES)}"
        ) from None
    return ModelSource(spec=spec, kind="hub", folder=folder, digest=weights_digest(folder))


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
