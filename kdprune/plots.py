"""Figures the stages write (PNG, atomically), with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

from kdprune.io import atomic_path


def sensitivity_plot(rows: list[dict], path: Path, unit: str, baseline: float, chosen: dict | None = None) -> None:
    """Validation accuracy vs pruning target: one point per row ({target, val_accuracy}), the unpruned model's
    accuracy as a dashed line, and the chosen, fully fine-tuned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = sorted(rows, key=lambda r: r["target"])
    if rows:
        ax.plot([r["target"] for r in rows], [r["val_accuracy"] for r in rows], "o-", label=rows[0]["label"])
    ax.axhline(baseline, color="grey", linestyle="--", label="distilled (unpruned)")
    if chosen is not None:
        ax.plot([chosen["target"]], [chosen["val_accuracy"]], "*", markersize=12, label=chosen["label"])
    ax.set_xlabel(f"target: fraction of {unit} removed")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
