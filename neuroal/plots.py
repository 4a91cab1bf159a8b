"""Plots of a pruned checkpoint's allocation (written beside its ``neuroal.json``) and the figures of
the campaign report, from plain dicts."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroal.checkpoint import Manifest
from neuroal.metrics import mean_accuracy

ALLOCATION_PNG = "allocation.png"


def block_sparsity(manifest: dict) -> list[float]:
    """Achieved sparsity of each decoder block, counted over all its weights (experts included);
    manifests that predate that count give the mean over the block's modules."""
    if manifest.get("block_sparsity"):
        return manifest["block_sparsity"]
    blocks: dict[int, list[float]] = defaultdict(list)
    for name, value in manifest["module_sparsity"].items():
        index = re.search(r"\.(\d+)\.", name)
        if index:
            blocks[int(index.group(1))].append(value)
    return [sum(v) / len(v) for _, v in sorted(blocks.items())]


def plot_allocation(manifest: Manifest, path: Path, panel: Callable[[Any, dict], None] | None = None) -> None:
    """Per-block sparsity as one PNG, and beside it the allocator's own ``panel`` (``Figures.panel``:
    NeuroAl's candidate scores) drawn from its details."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(11 if panel else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    sparsities = block_sparsity(manifest.model_dump())
    ax.bar(range(len(sparsities)), sparsities, color="#4C72B0")
    ax.axhline(manifest.target_sparsity, color="black", lw=1, ls="--", label="target")
    ax.set(xlabel="decoder block", ylabel="achieved sparsity", title=f"{manifest.method} + {manifest.top_up}")
    ax.set_ylim(max(0.0, min(sparsities) - 0.1), min(1.0, max(sparsities) + 0.1))
    ax.legend(loc="lower right")
    if panel:
        panel(axes[0][1], manifest.allocation)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Report figures: one model and base method each, from the report's cell dicts (see neuroal.report).
_TOP_UP_COLOURS = {"uniform": "#6e7781", "owl": "#DD8452", "alpha": "#55A868", "dsnot": "#8172B3",
                   "neuroal": "#4C72B0"}
_OTHER_COLOURS = ["#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def plot_perplexity_vs_sparsity(cells: list[dict], baselines: list[dict], corpora: list[str], path: Path,
                                title: str) -> bool:
    """Perplexity against target sparsity, one panel per corpus, a line per top-up, log y axis, the
    dense model as a horizontal line. Failed cells are left out. Returns False (and writes nothing)
    when no cell has a perplexity."""
    done = [c for c in cells if c.get("metrics")]
    corpora = [k for k in corpora if any(k in (c["metrics"].get("ppl") or {}) for c in done)]
    if not corpora:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.2 * len(corpora), 3.8), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for top_up, mine in _by_top_up(done).items():
            points = sorted((c["sparsity"], c["metrics"]["ppl"][corpus]) for c in mine if corpus in c["metrics"]["ppl"])
            ax.plot(*zip(*points), marker="o", color=_colour(top_up, done), label=top_up)
        for base in baselines:
            dense = ((base.get("metrics") or {}).get("ppl") or {}).get(corpus)
            if dense is not None:
                ax.axhline(dense, color="black", lw=1, ls="--", label=f"dense ({dense:.1f})")
        _log_axis(ax)
        ax.margins(y=0.08)  # keeps the dense line off the frame
        ax.set_xticks(sorted({c["sparsity"] for c in done}))
        ax.xaxis.set_major_formatter(_percent_formatter())
        ax.set(xlabel="target sparsity", ylabel=f"perplexity on {corpus} (log)", title=corpus)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_history(history: list[dict], model: str, corpora: list[str], path: Path, title: str) -> bool:
    """``model``'s cells over the last campaigns: a panel per corpus (perplexity, log y) and one for
    the mean zero-shot accuracy, against each campaign's start; a line per cell, coloured by top-up
    and dashed by sparsity, the dense model in black, a red cross where a cell failed (at its last
    value). Returns False (and writes nothing) when nothing finished."""
    series: dict[str, dict] = {}  # cell name -> the cell, its metrics and failures by campaign index
    for index, campaign in enumerate(history):
        for cell in campaign["cells"]:
            if cell["model"] == model:
                entry = series.setdefault(cell["name"], {"cell": cell, "points": {}, "failed": []})
                if cell.get("metrics"):
                    entry["points"][index] = cell["metrics"]
                elif cell["status"] == "failed":
                    entry["failed"].append(index)
    series = {name: s for name, s in series.items() if s["points"]}
    if not series:
        return False
    panels = [(corpus, lambda m, corpus=corpus: (m.get("ppl") or {}).get(corpus)) for corpus in corpora]
    if any(mean_accuracy(m) is not None for s in series.values() for m in s["points"].values()):
        panels.append(("mean accuracy", mean_accuracy))
    cells = [s["cell"] for s in series.values() if s["cell"].get("top_up")]
    sparsities = sorted({c["sparsity"] for c in cells})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (what, value) in zip(axes[0], panels):
        for s in series.values():
            points = [(i, value(m)) for i, m in sorted(s["points"].items()) if value(m) is not None]
            if not points:
                continue
            cell = s["cell"]
            dense = cell.get("top_up") is None
            style = {"color": "black", "ls": "--"} if dense else {
                "color": _colour(cell["top_up"], cells), "ls": _SPARSITY_STYLES[sparsities.index(cell["sparsity"]) % 4]}
            ax.plot(*zip(*points), marker="o", label=_history_label(cell), **style)
            for index in s["failed"]:
                last = [y for i, y in points if i < index]
                if last:
                    ax.plot(index, last[-1], marker="x", color="#cf222e", markersize=10, mew=2, ls="none")
        if what != "mean accuracy":
            _log_axis(ax)
        ax.set_xticks(range(len(history)), [f"{c['started'].removesuffix(' UTC')}\n{c['run_id'][:8]}" for c in history],
                      rotation=30, ha="right", fontsize=7)
        ax.set(xlabel="campaign (start, UTC, and run id)", title=what,
               ylabel="mean zero-shot accuracy" if what == "mean accuracy" else f"perplexity on {what} (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path, title)


_SPARSITY_STYLES = ["-", ":", "-.", (0, (5, 2))]  # by the rank of a cell's sparsity


def _history_label(cell: dict) -> str:
    return "dense" if cell.get("top_up") is None else f"{cell['method']} {cell['top_up']} {cell['sparsity']:.0%}"


def plot_block_sparsity_profiles(cells: list[dict], path: Path, title: str) -> bool:
    """Achieved sparsity of each decoder block, one panel per target sparsity, a line per top-up.
    Returns False (and writes nothing) when no cell has per-module sparsities."""
    done = [c for c in cells if (c.get("manifest") or {}).get("module_sparsity")]
    sparsities = sorted({c["sparsity"] for c in done})
    if not sparsities:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.2 * len(sparsities), 3.6), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        for top_up, mine in _by_top_up([c for c in done if c["sparsity"] == sparsity]).items():
            profile = block_sparsity(mine[0]["manifest"])
            ax.plot(range(len(profile)), profile, marker=".", color=_colour(top_up, done), label=top_up, zorder=2)
        ax.axhline(sparsity, color="black", lw=1, ls=":", zorder=1, label="target")  # under uniform's line
        ax.set(xlabel="decoder block", ylabel="achieved sparsity", title=f"target {sparsity:.0%}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def _by_top_up(cells: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[cell["top_up"]].append(cell)
    return dict(groups)


def _colour(top_up: str, cells: list[dict]) -> str:
    """The same colour for a top-up in every figure; top-ups outside the table take the next free one."""
    if top_up in _TOP_UP_COLOURS:
        return _TOP_UP_COLOURS[top_up]
    others = sorted({c["top_up"] for c in cells} - set(_TOP_UP_COLOURS))
    return _OTHER_COLOURS[others.index(top_up) % len(_OTHER_COLOURS)]


def _log_axis(ax) -> None:
    """A log y axis with labels on the minor ticks too: campaign perplexities span less than a decade
    or two, where labels on powers of ten alone leave one or two numbers to read from."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str) -> bool:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
