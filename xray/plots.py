"""Figures people would rather look at than read: confusion matrix, ROC, a prediction.
Used for TensorBoard images (train) and PNG files (evaluate, predict)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from xray.labels import CLASSES  # noqa: E402


def confusion_figure(cm: np.ndarray, title: str = "", classes: Sequence[str] = CLASSES) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 3.6), dpi=100)
    ax.imshow(cm, cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center",
                color="white" if n > cm.max() / 2 else "black", fontsize=12)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auc: float, title: str = "",
               point: Optional[tuple[float, float]] = None,
               more: Optional[dict[str, tuple[np.ndarray, np.ndarray, float]]] = None) -> Figure:
    """A ROC curve (with the chosen operating point), or with `more` one curve per
    {name: (fpr, tpr, auc)} (one-vs-rest curves of a K-class model; the first is labelled
    with `auc` as the macro AUC)."""
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if more:
        for name, (f, t, a) in more.items():
            ax.plot(f, t, lw=1.8, label=f"{name} vs rest: {a:.3f}")
        ax.plot([], [], " ", label=f"macro AUC = {auc:.3f}")
    else:
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    if point is not None:
        ax.plot(*point, "o", color="C3", label="chosen threshold")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def prediction_figure(image: np.ndarray, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 4.3), dpi=100)
    ax.imshow(image, cmap="gray")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Write a PNG atomically and free the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
