"""Typed, closed configurations. Field names are the key paths used everywhere:
``params.yaml: prune.sparsity`` = CLI ``--sparsity`` = MLflow param ``prune.sparsity``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from neuroal.data.windows import BosPerWindow
from neuroal.errors import UserError
from neuroal.pruning.registry import ALLOCATORS, BASE_METHODS

# The allowed --method and --top-up values: the registry's names.
Method = Literal[tuple(BASE_METHODS)]
TopUp = Literal[tuple(ALLOCATORS)]


class _CellSettings(BaseModel):
    """One pruning cell: which model, how to score, how to allocate, on what calibration data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    method: Method
    top_up: TopUp = "uniform"
    sparsity: float = Field(gt=0, lt=1)
    structure: str = "unstructured"  # or "N:M", e.g. "2:4"
    calib: str = "wikipedia"  # a corpus name, or the path of a text file, folder or .jsonl file
    bos_per_window: BosPerWindow = "auto"
    nsamples: int = Field(128, ge=1)  # the paper's calibration size
    search_nsamples: int = Field(8, ge=1)  # the paper's NeuroAl search set
    seqlen: int = Field(2048, ge=1)  # the paper's window; must fit the model's context
    batch_size: int = Field(8, ge=1)  # samples per block forward; more helps GPUs, not CPUs
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The checkpoint's weights: auto keeps the source's published dtype where that is lossless.
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickled .bin weights (unpickling can run code)

    def allocator_options(self) -> BaseModel:
        """The options of this cell's allocator, from its ``<top_up>_<option>`` fields."""
        options = ALLOCATORS[self.top_up].Options
        return options(**{name: getattr(self, f"{self.top_up}_{name}") for name in options.model_fields})


def _allocator_option_fields() -> dict:
    """Every allocator's options as ``<allocator>_<option>`` fields, e.g. ``neuroal_mode``."""
    return {f"{name}_{option}": (info.annotation, info)
            for name, allocator in ALLOCATORS.items() for option, info in allocator.Options.model_fields.items()}


# The cell settings plus each allocator's options, so that `prune.neuroal_mode` in params.yaml,
# `--neuroal-mode` and the MLflow param `prune.neuroal_mode` are one key.
PruneConfig = create_model("PruneConfig", __base__=_CellSettings, __module__=__name__,
                           __doc__="One pruning cell, with every allocator's options (``<allocator>_<option>``).",
                           **_allocator_option_fields())


def validated(cls: type[BaseModel], **values) -> BaseModel:
    """Build a config, turning pydantic's multi-line report into a one-line ``UserError``."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(_key_path(e['loc'])) or 'config'}: {e['msg']}{_item(e)}" for e in exc.errors())
        raise UserError(f"invalid {cls.__name__}: {problems}") from None


def _key_path(loc: tuple) -> list[str]:
    """A pydantic error's location as key names; a list's item index is left to :func:`_item`."""
    return [str(part) for part in loc if not isinstance(part, int)]


def _item(error: dict) -> str:
    """`` (got X)`` when the error is about one item of a list (``prune.sparsity: [0.5, 1.5]``)."""
    return f" (got {error['input']!r})" if any(isinstance(part, int) for part in error["loc"]) else ""


# Campaign grid axes: lists in ``PruneGrid`` (params.yaml may give one value); a cell takes one of each.
GRID_AXES = ("model", "method", "top_up", "sparsity")
# A campaign cell's cached stages, named as its tasks are (``campaign.refresh`` recomputes them).
Stage = Literal["calibration", "prepare", "allocate", "prune", "evaluate"]


class EvalConfig(BaseModel):
    """How every model of a campaign is evaluated (``neuroal eval`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ppl: list[str] = ["wikipedia", "treebank", "lee"]
    tasks: list[str] = []
    limit: Optional[int] = Field(None, ge=1)
    seqlen: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    online: bool = False
    bos_per_window: BosPerWindow = "auto"


class CampaignSettings(BaseModel):
    """Where a campaign writes, how it runs its cells, and where results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str = "neuroal"  # MLflow experiment
    out: str = "runs/campaign"  # checkpoints, metrics, caches
    executor: Literal["local", "pool"] = "local"  # pool: cells go to a Prefect work pool
    deployment: str = "prune-cell/prune-cell"  # the deployment cells run on with executor: pool
    baseline: bool = True  # evaluate each dense model too
    dvc: bool = True  # track checkpoints with DVC
    dvc_remote: Optional[str] = None  # a path or s3://bucket/prefix to push checkpoints to
    artifact_location: Optional[str] = None  # artifact root of a new MLflow experiment (s3:// works)
    refresh: list[Stage] = []  # stages recomputed on purpose, their cached outputs notwithstanding


def _as_list(value) -> list:
    """One value as a one-element list; a list or tuple as a list; None as the empty list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _grid_fields() -> dict:
    """``PruneConfig``'s fields, the grid axes as non-empty lists of the cell's type and constraints
    (defaulting to a list of the cell's default), every other field as it is."""
    fields = {}
    for name, info in PruneConfig.model_fields.items():
        if name not in GRID_AXES:
            fields[name] = (info.annotation, info)
            continue
        item = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        default = ... if info.is_required() else [info.default]
        fields[name] = (Annotated[list[item], BeforeValidator(_as_list)], Field(default, min_length=1))
    return fields


# The campaign grid (``params.yaml: prune``), derived from PruneConfig so that a new cell setting or
# allocator option is a grid setting, a `neuroal campaign` flag and an MLflow param with no edit here.
PruneGrid = create_model("PruneGrid", __config__=ConfigDict(extra="forbid", frozen=True), __module__=__name__,
                         __doc__="The campaign grid: ``PruneConfig``'s fields, the grid axes as lists.",
                         **_grid_fields())


class CampaignConfig(BaseModel):
    """``params.yaml``: the grid (``prune``, list-valued axes), evaluation and campaign settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune: PruneGrid
    eval: EvalConfig = EvalConfig()
    campaign: CampaignSettings = CampaignSettings()

    def cells(self) -> list[PruneConfig]:
        """One ``PruneConfig`` per point of the grid, in params order (models outermost)."""
        axes = [getattr(self.prune, axis) for axis in GRID_AXES]
        shared = self.prune.model_dump(exclude=set(GRID_AXES))
        return [
            validated(PruneConfig, **shared, **dict(zip(GRID_AXES, point)))
            for point in itertools.product(*axes)
        ]

    def models(self) -> list[str]:
        return list(self.prune.model)


def load_campaign(path: Path, **overrides) -> CampaignConfig:
    """Read ``params.yaml`` and apply overrides given as dotted key paths (``prune.sparsity``).

    Raises ``UserError`` with one line for a missing or malformed file, an unknown key, a bad
    value, or an empty grid axis; every cell is validated here, before any work starts.
    """
    import yaml

    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise UserError(f"cannot read campaign parameters {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for key_path, value in overrides.items():
        if value is not None:
            section, _, key = key_path.partition(".")
            params.setdefault(section, {})[key] = value
    grid = params.get("prune")
    for axis in GRID_AXES:  # PruneGrid refuses these too; this says so in the words of params.yaml
        if isinstance(grid, dict) and axis in grid and not _as_list(grid[axis]):
            raise UserError(f"{path}: prune.{axis} needs at least one value")
    config = validated(CampaignConfig, **params)
    config.cells()
    return config
