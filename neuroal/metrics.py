"""What a cell's metrics reduce to, shared by the report, its history section and the plots.

Metrics are a dict ``{"ppl": {corpus: value}, "tasks": {task: {"acc": value}}}`` (see
``neuroal.report``). This module sits below both ``neuroal.report`` and ``neuroal.history`` so that
imports between the two go one way: the report renders the history section.
"""

from __future__ import annotations


def mean_accuracy(metrics: dict) -> float | None:
    """Mean over tasks of ``acc`` (None without tasks)."""
    accs = [values["acc"] for values in (metrics.get("tasks") or {}).values() if values.get("acc") is not None]
    return sum(accs) / len(accs) if accs else None


def relative_change(value: float | None, reference: float | None) -> float | None:
    """``(value - reference) / reference``; None when either is missing or the reference is 0."""
    if value is None or not reference:
        return None
    return (value - reference) / reference
