"""``eval --plot FILE.png``: the confusion matrix as a picture (matplotlib, written atomically).

Rows are the true classes, columns the predicted ones; each row is shaded by the fraction of that
class's images (so small and large classes read alike) and each cell shows its count. Up to 40
classes get their names on the axes.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AttnInjectError
from ..files.output import atomic_write
from .evaluation import Confusion

MAX_LABELLED = 40


def plot_confusion(confusion: Confusion, path: Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise AttnInjectError(
            "plotting needs matplotlib, which is not installed", hint="pip install matplotlib.", field="plot"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(confusion.classes)
    rows = [[count / max(sum(row), 1) for count in row] for row in confusion.matrix]
    side = min(max(4.0, 0.45 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= MAX_LABELLED:
        ax.set_xticks(range(n), confusion.classes, rotation=90)
        ax.set_yticks(range(n), confusion.classes)
        for i, row in enumerate(confusion.matrix):
            for j, count in enumerate(row):
                if count:
                    colour = "white" if rows[i][j] > 0.5 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    images = sum(map(sum, confusion.matrix))
    correct = sum(confusion.matrix[i][i] for i in range(n))
    ax.set_title(f"{title}\ntop-1 {correct / max(images, 1):.2%} on {images} images", fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
