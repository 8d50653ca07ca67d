"""Per-class accuracy and the confusion matrix: real image sets are imbalanced, one accuracy hides the weak classes."""

from __future__ import annotations

from pathlib import Path

import torch

from kdprune.io import atomic_path


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, n_classes: int) -> torch.Tensor:
    """counts[true, predicted] (int64, n_classes x n_classes)."""
    flat = labels.cpu().long() * n_classes + predicted.cpu().long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def per_class(matrix: torch.Tensor, classes: list[str]) -> dict:
    """Images, correct and accuracy per class, plus the balanced accuracy (the mean over classes present)."""
    rows = {}
    for i, name in enumerate(classes):
        n = int(matrix[i].sum())
        rows[name] = {"images": n, "correct": int(matrix[i, i]), "accuracy": round(int(matrix[i, i]) / n, 4) if n else None}
    present = [r["accuracy"] for r in rows.values() if r["accuracy"] is not None]
    return {"classes": rows, "balanced_accuracy": round(sum(present) / len(present), 4) if present else None,
            "confusion": matrix.tolist(), "class_names": list(classes)}


def format_per_class(report: dict, title: str) -> str:
    """The per-class figures as a Markdown table, worst class first."""
    lines = [f"{title} (balanced accuracy {report['balanced_accuracy']:.2%})", "", "| class | images | correct | accuracy |",
             "|---|---:|---:|---:|"]
    ordered = sorted(report["classes"].items(), key=lambda item: (item[1]["accuracy"] is None, item[1]["accuracy"] or 0))
    for name, row in ordered:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        lines.append(f"| {name} | {row['images']:,} | {row['correct']:,} | {accuracy} |")
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """A PNG of the matrix normalised per true class (each row sums to 1), counts written in the cells."""
    import matplotlib

    matrix = matrix.cpu()
    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib import pyplot as plt

    n = len(classes)
    rates = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    try:
        image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= 30:  # beyond that the numbers are unreadable
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
