"""Binary classification metrics on p(pneumonia), in numpy: AUC, sensitivity, ... with
bootstrap confidence intervals and a Youden threshold."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing;
    predicted positive means p >= threshold."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(p_sorted))[0], len(p) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = max(y.sum(), 1), max((~y).sum(), 1)
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, p_sorted[last_of_tie]]
    return fpr, tpr, thresholds


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); nan if only one class is present."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximizing sensitivity + specificity - 1 (0.5 if undefined)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thresholds[best])


def confusion(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2x2 [[TN, FP], [FN, TP]]; rows = true class, columns = predicted."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    return np.array([[np.sum(~y & ~pred), np.sum(~y & pred)],
                     [np.sum(y & ~pred), np.sum(y & pred)]], dtype=np.int64)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc, sensitivity, specificity, ppv, npv at `threshold`."""
    (tn, fp), (fn, tp) = confusion(y, p, threshold)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "balanced_accuracy": (sens + spec) / 2,
        "auc": roc_auc(y, p),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def bootstrap_ci(y: np.ndarray, p: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], dict],
                 n: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap CI of every value `metric(y, p)` returns, resampling images."""
    y, p = np.asarray(y), np.asarray(p)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for key, value in metric(y[idx], p[idx]).items():
            samples.setdefault(key, []).append(value)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    with warnings.catch_warnings():  # a metric undefined in every resample stays nan
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))]
                for k, v in samples.items()}
