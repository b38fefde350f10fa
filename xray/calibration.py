"""How far to trust a model's probabilities: expected calibration error, Brier score,
negative log-likelihood, reliability diagram, and temperature scaling (Guo et al. 2017) fitted
on the validation split.

Two classes: of p(class 1), e.g. p(pneumonia). With two classes, softmax(logits / T)[1] =
sigmoid((l1 - l0) / T) = sigmoid(logit(p) / T), so the temperature works on the probability
itself (and on an ensemble's or TTA's mean). K classes (normal/bacterial/viral): softmax(logits
/ T) = softmax(log p / T), again on the probabilities; the ECE is the top-class one (confidence
= the largest p, right = the argmax is the true class), the Brier score sums over the classes.
Temperature scaling is monotonic: the ranking (AUC), the argmax and every two-class decision at
the matching threshold stay the same; only what the numbers mean changes.
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
    """Expected calibration error of p (of class 1; 0/1 y): sum over equal-width bins of
    (share of images in the bin) x |observed rate of y - mean p|."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Two classes (p 1-D): mean (p - y)^2; K classes (p NxK): mean over images of the sum over
    classes of (p_k - [y = k])^2."""
    p = np.asarray(p, float)
    if p.ndim == 2:
        return float(np.mean(np.sum((p - one_hot(y, p.shape[1])) ** 2, axis=1)))
    return float(np.mean((p - np.asarray(y, float)) ** 2))


def nll(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (p 1-D: p(class 1); NxK: every class's)."""
    p = np.asarray(p, float)
    if p.ndim == 2:
        return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), np.asarray(y, int)], EPS, 1))))
    p = np.clip(p, EPS, 1 - EPS)
    y = np.asarray(y, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def one_hot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[np.asarray(y, int)]


def top_class(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right: argmax == y as 0/1, confidence: the largest p) of NxK probabilities: the pair a
    K-class ECE and reliability diagram read."""
    probs = np.asarray(probs, float)
    return (probs.argmax(axis=1) == np.asarray(y, int)).astype(float), probs.max(axis=1)


def scale(p: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens an over-confident model, T < 1 sharpens."""
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


def scale_probs(probs: np.ndarray, temperature: Optional[float]) -> np.ndarray:
    """NxK class probabilities through a temperature: softmax(log p / T) (two classes: `scale`
    of p(class 1), the same number); unchanged without one."""
    probs = np.asarray(probs, np.float64)
    if not temperature:
        return probs
    if probs.shape[1] == 2:
        p = scale(probs[:, 1], temperature)
        return np.stack([1 - p, p], axis=1)
    z = np.log(np.clip(probs, EPS, 1)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def class_probabilities(model, batch: np.ndarray) -> np.ndarray:
    """A TrainedModel's NxK class probabilities of a batch through its temperature (from its
    calibration.json; none: as trained), whatever its number of classes."""
    return scale_probs(model.class_probabilities(batch), model.temperature)


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of the temperature-scaled
    probabilities (p 1-D: p(class 1) and `scale`; NxK: `scale_probs`) (convex in 1/T), searched
    over log T in [log 1/50, log 50] by scipy's bounded Brent method."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    if len(np.unique(y)) < 2:
        raise XrayError("temperature scaling needs both classes in the validation split" if p.ndim == 1 else
                        "temperature scaling needs two classes or more in the validation split")
    if p.ndim == 2:
        if p.shape[1] == 2:
            p = p[:, 1]
        else:
            log_p = np.log(np.clip(p, EPS, 1))
            rows = np.arange(len(y)), np.asarray(y, int)

            def loss(log_t: float) -> float:
                z = log_p / np.exp(log_t)
                z_max = z.max(axis=1)
                return float(np.mean(z_max + np.log(np.exp(z - z_max[:, None]).sum(axis=1)) - z[rows]))
            return _minimise(loss)
    return _minimise(lambda log_t: nll(y, scale(p, np.exp(log_t))))


def _minimise(loss) -> float:
    fit = minimize_scalar(loss, method="bounded", bounds=(np.log(1 / 50), np.log(50)), options={"xatol": 1e-9})
    return float(np.exp(fit.x))


def calibration_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """ece, brier, nll of p(class 1) (p 1-D) or of NxK probabilities (the ECE of the top class)."""
    p = np.asarray(p, float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    confidence = top_class(y, p) if p.ndim == 2 else (y, p)
    return {"ece": ece(*confidence), "brier": brier(y, p), "nll": nll(y, p)}


def calibration_of(classes) -> str:
    """What a calibration record's ECE and reliability diagram are of: p(<class 1>), or the top class."""
    return f"p({classes[1]})" if len(classes) == 2 else "top class"


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
    """calibration.json beside the checkpoint, with what the fit did on val (p_val: p(class 1)
    of a two-class model, the NxK class probabilities of any; before the temperature)."""
    p_val = np.asarray(p_val, float)
    scaled = scale(p_val, temperature) if p_val.ndim == 1 else scale_probs(p_val, temperature)
    record = {"temperature": temperature, "fitted_on": "val", "checkpoint": checkpoint,
              "classes": 2 if p_val.ndim == 1 else int(p_val.shape[1]),
              "val_before": calibration_metrics(y_val, p_val),
              "val_after": calibration_metrics(y_val, scaled)}
    write_json(Path(folder) / FILE, record)
    return record


def reliability_figure(y: np.ndarray, curves: dict, title: str, bins: int = BINS, of: str = "p(pneumonia)"):
    """Observed rate of class 1 against mean p(class 1) per bin, one line per {label:
    probabilities}, with each one's ECE; bar heights = images per bin (first curve). NxK
    probabilities: the share of right top-class calls against the mean top-class p
    (of="top class")."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    labels = np.asarray(y, float)
    for i, (label, p) in enumerate(curves.items()):
        p = np.asarray(p, float)
        y, p = top_class(labels, p) if p.ndim == 2 else (labels, p)
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
    ax.set_xlabel(f"mean {of} in the bin" if of.startswith("p(") else "mean p of the top class in the bin")
    ax.set_ylabel("share called right" if of == "top class" else f"share {of[2:-1].lower()}"
                  if of.startswith("p(") else "observed share")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_zorder(2)
    ax.patch.set_visible(False)
    fig.tight_layout()
    return fig
