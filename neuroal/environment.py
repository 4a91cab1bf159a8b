"""What computes a result besides its inputs: the library versions, the device kind and the dtype.

Every cached stage puts the part that can change its output into its key (and each checkpoint
records it), so after an upgrade of torch, transformers or lm-eval, or on another GPU model or
dtype, a scheduled campaign measures again instead of serving yesterday's numbers.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import neuroal

# What computes activations, masks and losses; tokenizers also cuts the calibration windows.
COMPUTE_LIBRARIES = ("torch", "transformers")
TOKENIZING_LIBRARIES = ("transformers", "tokenizers")
EVALUATING_LIBRARIES = ("torch", "transformers", "lm_eval")


def library_versions(names=COMPUTE_LIBRARIES) -> dict[str, str]:
    """The installed version of each distribution in ``names`` (read from its metadata, so
    nothing heavy is imported)."""
    return {name: installed_version(name) for name in names}


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_kind(device: torch.device) -> str:
    """``cpu``, or the GPU model (``cuda:NVIDIA H200``): kernels, and so results, differ by model."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_environment(device: torch.device, dtype: torch.dtype, libraries=COMPUTE_LIBRARIES) -> dict:
    """The cache-key part of a stage that runs the model: library versions, device kind, dtype."""
    return {**library_versions(libraries), "device": device_kind(device), "dtype": dtype_name(dtype)}


def recorded_versions() -> dict[str, str]:
    """What a checkpoint's manifest records as the code that made it."""
    return {"neuroal": neuroal.__version__, "python": platform.python_version(),
            **library_versions(("torch", "transformers", "tokenizers", "safetensors"))}
