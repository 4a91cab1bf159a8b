"""Typed, closed configurations. Field names are the key paths used everywhere:
``params.yaml: prune.sparsity`` = CLI ``--sparsity`` = MLflow param ``prune.sparsity``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuroal.errors import UserError

Method = Literal["magnitude", "wanda", "multiflow", "sparsegpt"]
TopUp = Literal["uniform", "owl", "alpha", "dsnot", "neuroal"]


class PruneConfig(BaseModel):
    """One pruning cell: which model, how to score, how to allocate, on what calibration data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    method: Method
    top_up: TopUp = "uniform"
    sparsity: float = Field(gt=0, lt=1)
    structure: str = "unstructured"  # or "N:M", e.g. "2:4"
    neuroal_step: Literal["block", "row", "both"] = "both"
    neuroal_mode: Literal["reference", "dense"] = "reference"
    neuroal_strategy: Literal["grid", "coarse"] = "grid"
    calib: str = "wikipedia"
    nsamples: int = Field(128, ge=1)  # the paper's calibration size
    search_nsamples: int = Field(8, ge=1)  # the paper's NeuroAl search set
    seqlen: int = Field(2048, ge=1)  # the paper's window; must fit the model's context
    batch_size: int = Field(8, ge=1)  # samples per block forward; more helps GPUs, not CPUs
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


def validated(cls: type[BaseModel], **values) -> BaseModel:
    """Build a config, turning pydantic's multi-line report into a one-line ``UserError``."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid {cls.__name__}: {problems}") from None
