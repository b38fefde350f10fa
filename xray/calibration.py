"""How far to trust a two-class task's p(positive class), e.g. p(pneumonia): expected
calibration error, Brier score, reliability diagram, and temperature scaling (Guo et al. 2017)
fitted on the validation split.

With two classes, softmax(logits / T)[1] = sigmoid((l1 - l0) / T) = sigmoid(logit(p) / T), so
the temperature works on the probability itself (and on an ensemble's or TTA's mean). It is
monotonic: the ranking (AUC) and every decision at the matching threshold stay the same; only
what the number means changes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.optimize import minimize_scalar

from xray.errors import XrayError
from xray.files import write_json

FILE = "calibration.json"  # in the run folder: the temperature of its checkpoint
BINS = 15
EPS = 1e-7


def ece(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error of p(pneumonia): sum over equal-width bins of
    (share of images in the bin) x |observed pneumonia rate - mean p|."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def nll(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    y = np.asarray(y, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def scale(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens an over-confident model, T < 1 sharpens."""
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of (y, scale(p, T)) (convex in
    1/T), searched over log T in [log 1/50, log 50] by scipy's bounded Brent method."""
    y = np.asarray(y)
    if y.all() or not y.any():
        raise XrayError("temperature scaling needs both classes in the validation split")
    fit = minimize_scalar(lambda log_t: nll(y, scale(p, np.exp(log_t))), method="bounded",
                          bounds=(np.log(1 / 50), np.log(50)), options={"xatol": 1e-9})
    return float(np.exp(fit.x))


def calibration_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    return {"ece": ece(y, p), "brier": brier(y, p), "nll": nll(y, p)}


def load_temperature(folder: Path, checkpoint: Path) -> Optional[float]:
    """The temperature stored in folder for this checkpoint (a run's best.ckpt, a best
    folder's), or None."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        temperature = float(record["temperature"])
        if Path(record["checkpoint"]).name != Path(checkpoint).name:
            return None  # fitted for another checkpoint of this run (best.ckpt, not last.ckpt)
    except (ValueError, KeyError, TypeError) as e:
        raise XrayError(f"{path} is damaged ({e}); delete it, or fit it again with calibrate=true") from None
    if not temperature > 0:
        raise XrayError(f"{path}: temperature {temperature} must be > 0; fit it again with calibrate=true")
    return temperature


def save_temperature(folder: Path, temperature: float, y_val: np.ndarray, p_val: np.ndarray,
                     checkpoint: str) -> dict:
    """calibration.json beside the checkpoint, with what the fit did on val."""
    record = {"temperature": temperature, "fitted_on": "val", "checkpoint": checkpoint,
              "val_before": calibration_metrics(y_val, p_val),
              "val_after": calibration_metrics(y_val, scale(p_val, temperature))}
    write_json(Path(folder) / FILE, record)
    return record


def reliability_figure(y: np.ndarray, curves: dict, title: str, bins: int = BINS):
    """Observed pneumonia rate against mean p(pneumonia) per bin, one line per
    {label: probabilities}, with each one's ECE; bar heights = images per bin (first curve)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    y = np.asarray(y, float)
    for i, (label, p) in enumerate(curves.items()):
        p = np.asarray(p, float)
        which = np.minimum((p * bins).astype(int), bins - 1)
        xs, ys, counts = [], [], []
        for b in range(bins):
            inside = which == b
            if inside.any():
                xs.append(p[inside].mean())
                ys.append(y[inside].mean())
                counts.append(inside.sum())
        ax.plot(xs, ys, "o-", color=f"C{i}", lw=1.5, ms=4, label=f"{label} (ECE {ece(y, p):.3f})")
        if i == 0:
            ax2 = ax.twinx()
            ax2.bar((np.arange(bins) + 0.5) / bins, np.bincount(which, minlength=bins), width=1 / bins,
                    color="grey", alpha=0.15)
            ax2.set_ylabel("images per bin", fontsize=8, color="grey")
            ax2.tick_params(labelsize=7, colors="grey")
    ax.set_xlabel("mean p(pneumonia) in the bin")
    ax.set_ylabel("share with pneumonia")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_zorder(2)
    ax.patch.set_visible(False)
    fig.tight_layout()
    return fig
