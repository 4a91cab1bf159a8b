"""A campaign against the ones before it: each cell's change against the previous campaign, the
regressions a scheduled run is gated on, and the report's history section; from plain dicts.

A campaign is a dict with ``run_id``, ``started``, ``status``, ``git_revision``, ``environment``
(library -> version, ``device``) and ``cells``: the grid's cells and the dense baselines, each
with ``name``, ``model``, ``status`` (``finished``, ``failed`` or ``running``), ``metrics`` (as in
``neuroal.report``) and ``settings`` (how it was measured: a cell is compared only with the same
grid point measured the same way; a change of its pruning settings, say fewer calibration samples,
is exactly what the gate is there to catch).
"""

from __future__ import annotations

from neuroal.metrics import mean_accuracy, relative_change

DEFAULT_HISTORY = 10  # campaigns in the report's history section, the latest included


def regressions(previous: dict | None, latest: dict, pct: float) -> list[str]:
    """What got worse in ``latest`` against ``previous``: a perplexity up by more than ``pct``
    percent, a task accuracy down by more than ``pct`` points, or a cell that failed (also when
    there is no previous campaign). One short text per finding, naming the cell and the numbers."""
    before = _by_name(previous)
    found = []
    for cell in latest["cells"]:
        if cell["status"] == "failed":
            found.append(f"{cell['name']} failed")
            continue
        old = before.get(cell["name"])
        if not _comparable(old, cell):
            continue
        for corpus, ppl in cell["metrics"]["ppl"].items():
            reference = old["metrics"]["ppl"].get(corpus)
            change = relative_change(ppl, reference)
            if change is not None and change * 100 > pct:
                found.append(f"{cell['name']} ppl {corpus} {reference:.2f} -> {ppl:.2f} ({change:+.1%})")
        for task, acc, reference in _accuracies(old, cell):
            if (reference - acc) * 100 > pct:
                found.append(f"{cell['name']} {task} acc {reference:.3f} -> {acc:.3f} ({(acc - reference) * 100:+.1f} pt)")
    return found


def history_section(history: list[dict], corpora: list[str], figures: list[dict]) -> list[str]:
    """The report's markdown lines on the last campaigns: the trend plots, then the change of the
    latest campaign against the one before, with what differs between the two."""
    lines = ["## History", "",
             f"The last {len(history)} campaign(s) of the experiment, oldest first: "
             + ", ".join(f"`{c['run_id'][:8]}` ({c['started']})" for c in history) + ".", ""]
    for figure in figures:
        lines += [f"![{figure['title']}]({figure['file']})", ""]
    if len(history) < 2:
        return lines + ["No earlier campaign to compare with.", ""]
    previous, latest = history[-2], history[-1]
    lines += ["### Against the previous campaign", "",
              f"Campaign `{latest['run_id']}` against `{previous['run_id']}`. {differences(previous, latest)}", "",
              "| cell | " + " | ".join(corpora) + " | mean acc |", "|---|" + "---|" * (len(corpora) + 1)]
    before = _by_name(previous)
    for cell in latest["cells"]:
        lines.append(f"| {cell['name']} | " + " | ".join(_change_texts(before.get(cell["name"]), cell, corpora)) + " |")
    return lines + ["", "Perplexity change in percent, accuracy change in points.", ""]


def differences(previous: dict, latest: dict) -> str:
    """What differs between two campaigns' code and machines: git revision, library versions, device."""
    changed = []
    if previous.get("git_revision") != latest.get("git_revision"):
        changed.append(f"git `{previous.get('git_revision') or '?'}` -> `{latest.get('git_revision') or '?'}`")
    old, new = previous.get("environment") or {}, latest.get("environment") or {}
    changed += [f"{name} {old.get(name, '?')} -> {new.get(name, '?')}"
                for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return "Differences: " + "; ".join(changed) + "." if changed else "Same git revision, library versions and device."


def _change_texts(old: dict | None, cell: dict, corpora: list[str]) -> list[str]:
    if cell["status"] != "finished":
        return [cell["status"]] * (len(corpora) + 1)
    if old is None or old["status"] != "finished":
        return ["new" if old is None else f"was {old['status']}"] * (len(corpora) + 1)
    if old["settings"] != cell["settings"]:
        return ["measured otherwise"] * (len(corpora) + 1)
    texts = []
    for corpus in corpora:
        ppl, reference = cell["metrics"]["ppl"].get(corpus), old["metrics"]["ppl"].get(corpus)
        change = relative_change(ppl, reference)
        texts.append("-" if ppl is None else f"{reference:.2f} → {ppl:.2f} ({change:+.1%})" if change is not None else f"{ppl:.2f}")
    acc, reference = mean_accuracy(cell["metrics"]), mean_accuracy(old["metrics"])
    texts.append("-" if acc is None or reference is None
                 else f"{reference:.3f} → {acc:.3f} ({(acc - reference) * 100:+.1f} pt)")
    return texts


def _by_name(campaign: dict | None) -> dict[str, dict]:
    return {c["name"]: c for c in campaign["cells"]} if campaign else {}


def _comparable(old: dict | None, cell: dict) -> bool:
    return (old is not None and old["status"] == "finished" and cell["status"] == "finished"
            and old["settings"] == cell["settings"])


def _accuracies(old: dict, cell: dict):
    """``(task, accuracy, previous accuracy)`` of every task both runs measured."""
    for task, values in (cell["metrics"].get("tasks") or {}).items():
        acc, reference = values.get("acc"), ((old["metrics"].get("tasks") or {}).get(task) or {}).get("acc")
        if acc is not None and reference is not None:
            yield task, acc, reference
