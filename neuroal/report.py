"""Comparison tables of a campaign's results (perplexity by method x top-up x sparsity)."""

from __future__ import annotations


def comparison_table(cells: list[dict], baselines: list[dict], corpus: str) -> str:
    """A markdown table per model: rows method x top-up, columns sparsity, cells the perplexity
    on ``corpus`` (and the mean zero-shot accuracy when tasks were run), the dense model first.

    ``cells`` hold ``model``, ``method``, ``top_up``, ``sparsity`` and ``metrics``; ``baselines``
    hold ``model`` and ``metrics``.
    """
    lines = []
    for model in dict.fromkeys(c["model"] for c in [*baselines, *cells]):
        mine = [c for c in cells if c["model"] == model]
        sparsities = sorted({c["sparsity"] for c in mine})
        lines += [f"### {model}: perplexity on {corpus} (mean zero-shot accuracy)", "",
                  "| method | top-up | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|---|" + "---|" * len(sparsities)]
        for base in (b for b in baselines if b["model"] == model):
            lines.append(f"| dense | | {_cell(base['metrics'], corpus)} |" + " |" * (len(sparsities) - 1))
        for method, top_up in dict.fromkeys((c["method"], c["top_up"]) for c in mine):
            row = {c["sparsity"]: c for c in mine if (c["method"], c["top_up"]) == (method, top_up)}
            values = [_cell(row[s]["metrics"], corpus) if s in row else "-" for s in sparsities]
            lines.append(f"| {method} | {top_up} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def mean_accuracy(metrics: dict) -> float | None:
    """Mean over tasks of ``acc`` (None without tasks)."""
    accs = [values["acc"] for values in (metrics.get("tasks") or {}).values() if values.get("acc") is not None]
    return sum(accs) / len(accs) if accs else None


def _cell(metrics: dict | None, corpus: str) -> str:
    if not metrics:
        return "failed"
    ppl = metrics.get("ppl", {}).get(corpus)
    text = f"{ppl:.2f}" if ppl is not None else "-"
    acc = mean_accuracy(metrics)
    return text + (f" ({acc:.3f})" if acc is not None else "")
