"""One evaluation end to end: load a model (or a pruned checkpoint), perplexity, zero-shot tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from neuroal.checkpoint import MANIFEST, read_manifest
from neuroal.data import BOS_PER_WINDOW_CHOICES, corpus_digest, get_corpus, resolve_bos_per_window
from neuroal.environment import EVALUATING_LIBRARIES, compute_environment
from neuroal.errors import UserError
from neuroal.evaluation.perplexity import eval_windows, perplexity
from neuroal.evaluation.zeroshot import PAPER_TASKS, lm_eval_version, zero_shot
from neuroal.models import (
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
from neuroal.timing import timed

logger = logging.getLogger(__name__)

# The paper's perplexity context; the model's own where that is shorter.
DEFAULT_SEQLEN = 2048


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate and how.

    Attributes:
        model: A model spec or a pruned checkpoint folder.
        ppl: Corpora for perplexity: names or paths of user corpora (empty: none).
        tasks: Zero-shot tasks (empty: none).
        limit: At most this many perplexity windows per corpus and documents per task (None: all).
        batch_size: Windows or requests per forward pass.
        seqlen: Perplexity window length (None: ``DEFAULT_SEQLEN`` capped at the model's context).
        device, dtype: As for ``neuroal prune`` (``auto``: the GPU if any; float32 on CPU).
        online: Use lm-eval's registered (hub) tasks instead of the offline copies.
        trust_remote_code: Run code shipped with a hub model.
        allow_pickle: Load pickled ``.bin`` weights when the model has no safetensors.
        bos_per_window: ``auto`` (the family rule of ``neuroal.data.windows``), ``on`` or ``off``:
            whether every perplexity window starts with BOS.
    """

    model: str
    ppl: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 8
    seqlen: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    online: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    bos_per_window: str = "auto"

    @classmethod
    def of_campaign(cls, model: str, settings, trust_remote_code: bool = False, allow_pickle: bool = False):
        """The spec of a campaign's evaluation (``settings``: its ``EvalConfig``) of ``model``."""
        return cls(model=model, ppl=tuple(settings.ppl), tasks=tuple(settings.tasks), limit=settings.limit,
                   batch_size=settings.batch_size, seqlen=settings.seqlen, online=settings.online,
                   trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                   bos_per_window=settings.bos_per_window)


def evaluation_environment(spec: EvalSpec) -> dict:
    """What computes ``spec``'s numbers besides the weights and settings: the versions of torch,
    transformers and lm-eval, the device kind and the dtype (part of a campaign's metrics key)."""
    device = resolve_device(spec.device)
    return compute_environment(device, resolve_dtype(spec.dtype, device), EVALUATING_LIBRARIES)


def evaluate(spec: EvalSpec) -> dict:
    """Evaluate ``spec.model``; returns the metrics record that ``neuroal eval`` writes.

    A folder holding ``neuroal.json`` is a pruned checkpoint: its weights are verified against the
    recorded digests first, and its manifest is returned with the metrics.
    """
    _check(spec)
    device = resolve_device(spec.device)
    source = resolve_model(spec.model)
    manifest = read_manifest(source.folder) if (source.folder / MANIFEST).is_file() else None
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(source, resolve_dtype(spec.dtype, device), spec.trust_remote_code,
                                      allow_pickle=spec.allow_pickle)
        model.to(device)
    seqlen = _seqlen(spec, model.config)
    bos_per_window = resolve_bos_per_window(spec.bos_per_window, model.config)

    ppl = {}
    for corpus in spec.ppl:
        with timed(timings, f"ppl.{corpus}"):
            windows = _windows(tokenizer, corpus, seqlen, spec.limit, bos_per_window)
            ppl[corpus] = perplexity(model, windows, device, spec.batch_size)
        logger.info("perplexity on %s (%d x %d tokens): %.3f", corpus, windows.shape[0], seqlen, ppl[corpus])
    tasks = {}
    if spec.tasks:
        with timed(timings, "tasks"):
            tasks = zero_shot(model, tokenizer, spec.tasks, limit=spec.limit, batch_size=spec.batch_size,
                              device=device, offline=not spec.online)
    return {
        "model": spec.model,
        "source": source.to_dict(),
        "ppl": ppl,
        "tasks": tasks,
        "limit": spec.limit,
        "seqlen": seqlen,
        "bos_per_window": bos_per_window,
        "corpus_digests": {corpus: corpus_digest(corpus) for corpus in spec.ppl},
        "online": spec.online,
        "device": str(device),
        "lm_eval_version": lm_eval_version(),
        "environment": evaluation_environment(spec),
        "timings": timings,
        "checkpoint": manifest.model_dump() if manifest else None,
    }


def metrics_table(metrics: dict) -> str:
    """The metrics of ``evaluate`` as an aligned two-column table."""
    rows = [(f"ppl {corpus}", f"{value:.3f}") for corpus, value in metrics["ppl"].items()]
    for task, values in metrics["tasks"].items():
        rows += [(f"{task} {name}", f"{value:.4f}") for name, value in values.items() if value is not None]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def check_eval(spec: EvalSpec, source: ModelSource | None = None) -> ModelSource:
    """Every check of an evaluation that loads no weights: names, counts, device, the model spec,
    its config and weight files, and a perplexity window that every corpus's test split can fill.

    Args:
        spec: The evaluation.
        source: ``spec.model`` already resolved.

    Returns:
        The resolved model source. Raises ``UserError`` naming the problem.
    """
    _check(spec)
    resolve_device(spec.device)
    source = source or resolve_model(spec.model)
    model_config = load_config(source, spec.trust_remote_code)
    seqlen = _seqlen(spec, model_config)
    check_weights(source, spec.allow_pickle)
    if spec.ppl:
        tokenizer = load_tokenizer(source, spec.trust_remote_code)
        bos_per_window = resolve_bos_per_window(spec.bos_per_window, model_config)
        for corpus in spec.ppl:
            _windows(tokenizer, corpus, seqlen, 1, bos_per_window)
    return source


def _seqlen(spec: EvalSpec, model_config) -> int:
    """The perplexity window: ``spec.seqlen``, which must fit the model, else the default capped."""
    context = context_length(model_config)
    if spec.seqlen and context and spec.seqlen > context:
        raise UserError(f"--seqlen {spec.seqlen} is longer than the model's context of {context} tokens; "
                        "lower --seqlen")
    return spec.seqlen or min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)


def _windows(tokenizer, corpus: str, seqlen: int, limit: int | None, bos_per_window: bool):
    windows = eval_windows(tokenizer, corpus, seqlen, limit, bos_per_window=bos_per_window)
    if windows.shape[0] == 0:
        raise UserError(f"the {corpus!r} test split is shorter than one --seqlen {seqlen} window; "
                        "lower --seqlen or choose another corpus")
    return windows


def _check(spec: EvalSpec) -> None:
    """Fail on bad input before the slow model load."""
    for corpus in spec.ppl:
        get_corpus(corpus)
    if spec.bos_per_window not in BOS_PER_WINDOW_CHOICES:
        raise UserError(f"--bos-per-window must be one of {', '.join(BOS_PER_WINDOW_CHOICES)}, "
                        f"got {spec.bos_per_window!r}")
    unknown = [task for task in spec.tasks if task not in PAPER_TASKS]
    if unknown and not spec.online:
        raise UserError(f"unknown offline task {unknown[0]!r}; choose from {', '.join(PAPER_TASKS)} "
                        "(or pass --online for any lm-eval task)")
    for name in ("limit", "batch_size", "seqlen"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if spec.seqlen == 1:
        raise UserError("--seqlen must be at least 2: a perplexity window predicts each token from the ones before")
