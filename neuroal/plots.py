"""Plots of a pruned checkpoint's allocation, written beside its ``neuroal.json``."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ALLOCATION_PNG = "allocation.png"


def block_sparsity(module_sparsity: dict[str, float]) -> list[float]:
    """Mean achieved sparsity of each decoder block, from per-module sparsities keyed by full name."""
    blocks: dict[int, list[float]] = defaultdict(list)
    for name, value in module_sparsity.items():
        index = re.search(r"\.(\d+)\.", name)
        if index:
            blocks[int(index.group(1))].append(value)
    return [sum(v) / len(v) for _, v in sorted(blocks.items())]


def plot_allocation(manifest: dict, path: Path) -> None:
    """Per-block sparsity, and for NeuroAl the score of every candidate lambda, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    search = (manifest.get("allocation") or {}).get("neuroal")
    fig, axes = plt.subplots(1, 2 if search else 1, figsize=(11 if search else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    sparsities = block_sparsity(manifest["module_sparsity"])
    ax.bar(range(len(sparsities)), sparsities, color="#4C72B0")
    ax.axhline(manifest["target_sparsity"], color="black", lw=1, ls="--", label="target")
    ax.set(xlabel="decoder block", ylabel="achieved sparsity", title=f"{manifest['method']} + {manifest['top_up']}")
    ax.set_ylim(max(0.0, min(sparsities) - 0.1), min(1.0, max(sparsities) + 0.1))
    ax.legend(loc="lower right")
    if search:
        ax = axes[0][1]
        for step, marker in (("block", "o"), ("row", "s")):
            scores = {float(k): v for k, v in search[f"{step}_scores"].items()}
            if scores:
                ax.plot(list(scores), list(scores.values()), marker=marker, label=f"{step} (chose {search[f'{step}_lambda']})")
        ax.set(xlabel="lambda", ylabel="alignment score (lower is better)", title="NeuroAl candidates")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
