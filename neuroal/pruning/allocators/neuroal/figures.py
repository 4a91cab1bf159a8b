"""NeuroAl's plots (``Allocator.figures``), from its details as kept in ``neuroal.json``
(``{"neuroal": NeuroalSearch.to_dict()}``): its candidates' scores against lambda."""

from __future__ import annotations

from pathlib import Path

from neuroal.plots import pyplot, save_figure
from neuroal.pruning.plugin import Figures


def search_of(details: dict) -> dict | None:
    """The search's record in an allocation's details, when it scored any candidate."""
    search = (details or {}).get("neuroal")
    return search if search and (search.get("block_scores") or search.get("row_scores")) else None


def candidates_panel(ax, details: dict) -> None:
    """Beside a checkpoint's block sparsities: both steps' scores against lambda, one line each."""
    search = search_of(details) or {}
    for step, marker in (("block", "o"), ("row", "s")):
        scores = {float(k): v for k, v in (search.get(f"{step}_scores") or {}).items()}
        if scores:
            ax.plot(list(scores), list(scores.values()), marker=marker, label=f"{step} (chose {search[f'{step}_lambda']})")
    ax.set(xlabel="lambda", ylabel="alignment score (lower is better)", title="NeuroAl candidates")
    ax.legend()


def candidates_figure(cells: list[dict], path: Path, title: str) -> bool:
    """The campaign report's figure: a row per target sparsity, the block and row steps side by
    side, the chosen lambda starred. A candidate stopped early is hollow: its score is the partial
    sum at which it had already lost (a lower bound). False (nothing written) when no cell holds a
    search."""
    searches = sorted((c["sparsity"], s) for c in cells if (s := search_of((c.get("manifest") or {}).get("allocation"))))
    if not searches:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(len(searches), 2, figsize=(10.4, 3.2 * len(searches)), squeeze=False)
    for row, (sparsity, search) in zip(axes, searches):
        for ax, step in zip(row, ("block", "row")):
            _plot_step(ax, search, step)
            ax.set(xlabel=f"{step} lambda", ylabel="alignment score (lower is better)",
                   title=f"{step} step, target {sparsity:.0%}")
    return save_figure(fig, path, title)


def _plot_step(ax, search: dict, step: str) -> None:
    scores = sorted((float(k), v) for k, v in (search.get(f"{step}_scores") or {}).items())
    if not scores:
        ax.text(0.5, 0.5, f"no {step} step", ha="center", va="center", transform=ax.transAxes)
        return
    stopped = {float(x) for x in search.get(f"{step}_stopped_early") or []}
    full = [(lam, score) for lam, score in scores if lam not in stopped]
    partial = [(lam, score) for lam, score in scores if lam in stopped]
    ax.plot(*zip(*scores), color="#4C72B0", lw=1, alpha=0.5)
    if full:
        ax.plot(*zip(*full), ls="", marker="o", color="#4C72B0", label="scored")
    if partial:
        ax.plot(*zip(*partial), ls="", marker="o", mfc="white", color="#4C72B0", label="stopped early (lower bound)")
    chosen = search.get(f"{step}_lambda")
    if chosen is not None and float(chosen) in dict(scores):
        ax.plot([float(chosen)], [dict(scores)[float(chosen)]], ls="", marker="*", ms=15, color="#C44E52",
                label=f"chosen {float(chosen):g}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # scores are ~1e-4: show the exponent once
    ax.margins(0.08)  # the star of a chosen extreme stays inside the frame
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def without_row_sparsities(details: dict) -> dict:
    """What the report keeps of the details: the search without its per-row sparsities (megabytes)."""
    search = (details or {}).get("neuroal")
    return {"neuroal": {k: v for k, v in search.items() if k != "row_sparsities"}} if search else {}


FIGURES = Figures(candidates_panel, candidates_figure, "NeuroAl candidate scores", without_row_sparsities)
