"""Which validation signal tracks new patients? The screening decision (pneumonia vs normal: a
binary model's own, a subtype model's read-off) of every run, read from its eval_val.json /
predictions_val.csv (validation only: what the product may rank by) and its eval_test.json
(the held-out figures a ranking should predict), and Spearman's rho between each signal and
each held-out figure across runs, with a permutation p-value (and a 95 % CI from 10 runs on);
also over configurations,
each signal's mean over the seeds against the held-out figures' mean.

    python -m xray.report --signals 'outputs/multirun/seeds_*/*' 'outputs/fast/*' --figure signals.png

Reading the test half here is the point of the study: it chooses the ranking criterion, and
the docs say so. The report (`--rank-by val_log_loss`, ...) ranks by these same val signals."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xray.calibration import ece, nll
from xray.hparams import AT_VAL_THRESHOLD, binary_results, read_predictions_csv
from xray.labels import binary_decisions, task_classes

# name -> (what it is, True when higher is better)
SIGNALS = {
    "val_auc": ("val AUC", True),
    "val_log_loss": ("val log-loss of p(pneumonia)", False),
    "val_specificity": ("val specificity at the val-chosen threshold", True),
    "val_ece": ("val ECE of p(pneumonia)", False),
}
TARGETS = ("auc", "specificity", "accuracy")  # held-out, at the val-chosen threshold
SCREENING = {"binary": "binary", "subtype": "pneumonia_vs_normal"}  # task -> its screening decision


def screening_decision(result: dict) -> Optional[dict]:
    """The pneumonia-vs-normal block of an eval result with today's keys (None: the task has none)."""
    name = SCREENING.get(result.get("task", "binary"))
    return binary_results(result).get(name) if name else None


def val_signals(run_dir: Path, eval_val: dict) -> dict:
    """The screening decision's val signals of a run folder ({} when it has none): AUC and the
    specificity at the val-chosen threshold from eval_val.json; log-loss and ECE of
    p(pneumonia) as trained: a binary model's from eval_val.json (`calibration.uncalibrated`), a
    subtype model's (1 - p(normal)) from predictions_val.csv, unless those went through a
    temperature (fitted on this same val: it would flatter them), then None."""
    block = screening_decision(eval_val)
    if block is None:
        return {}
    at = block.get(AT_VAL_THRESHOLD) or {}
    out = {"val_auc": _value(at.get("auc")), "val_specificity": _value(at.get("specificity")),
           "val_log_loss": None, "val_ece": None}
    task, calibration = eval_val.get("task", "binary"), eval_val.get("calibration") or {}
    if task == "binary":
        raw = calibration.get("uncalibrated") or {}
        out.update({"val_log_loss": _value(raw.get("nll")), "val_ece": _value(raw.get("ece"))})
    elif calibration.get("temperature") is None:
        try:
            labels, probs = read_predictions_csv(Path(run_dir) / "predictions_val.csv", task_classes(task))
            y, p = binary_decisions(task, labels, probs)[SCREENING[task]]
            out.update({"val_log_loss": nll(y, p), "val_ece": ece(y, p)})
        except (OSError, KeyError, ValueError):
            pass
    return out


def held_out(eval_split: dict) -> dict:
    """The screening decision's AUC and its specificity and accuracy at the val-chosen threshold."""
    block = screening_decision(eval_split) or {}
    at = block.get(AT_VAL_THRESHOLD) or {}
    return {"auc": _value(at.get("auc")), "specificity": _value(at.get("specificity")),
            "accuracy": _value(at.get("accuracy"))}


def _value(metric) -> Optional[float]:
    value = metric.get("value") if isinstance(metric, dict) else metric
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


MIN_CI = 10  # pairs below which Fisher's z is no guide (at rho = +-1 its interval collapses)
EXACT = 8  # pairs up to which the permutation test enumerates every order (8! = 40,320)


def spearman(x: Sequence[float], y: Sequence[float], seed: int = 0) -> dict:
    """Spearman's rho of paired values; a two-sided permutation p-value (every order of y up to
    8 pairs, 20,000 random ones above); and from 10 pairs on, a 95 % CI by Fisher's z with
    Bonett and Wright's (2000) standard error sqrt((1 + rho^2 / 2) / (n - 3)). No rho below 3
    pairs or when one side is all tied."""
    from itertools import permutations

    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "rho": None, "p": None, "ci95": [None, None]}
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean()), (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
    rho = float(rx @ ry)  # (Pearson's r of the ranks, ties averaged: scipy's spearmanr)
    orders = (np.array(list(permutations(range(n)))) if n <= EXACT
              else np.random.default_rng(seed).permuted(np.tile(np.arange(n), (20000, 1)), axis=1))
    hits = int(np.sum(np.abs(ry[orders] @ rx) >= abs(rho) - 1e-12))
    p = hits / len(orders) if n <= EXACT else (hits + 1) / (len(orders) + 1)  # (a sampled p is never 0)
    ci: list = [None, None]
    if n >= MIN_CI:
        z, se = math.atanh(min(max(rho, -0.9999), 0.9999)), math.sqrt((1 + rho ** 2 / 2) / (n - 3))
        ci = [math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)]
    return {"n": n, "rho": rho, "p": p, "ci95": ci}


@dataclass
class RunPoint:
    """One run of the study: its name, configuration (hyper-parameters but the seed), val
    signals and held-out figures."""
    name: str
    configuration: str
    signals: dict
    targets: dict


def study(points: list[RunPoint]) -> list[dict]:
    """One row per (level, signal, held-out figure): rho and CI across runs, and across
    configurations of >= 2 seeds (seed means)."""
    rows = []
    groups: dict[str, list[RunPoint]] = {}
    for p in points:
        groups.setdefault(p.configuration, []).append(p)
    seeded = [g for g in groups.values() if len(g) >= 2]
    for level, units in (("runs", [[p] for p in points]), ("seed means", seeded)):
        for signal in SIGNALS:
            for target in TARGETS:
                pairs = [(np.mean([p.signals[signal] for p in unit]), np.mean([p.targets[target] for p in unit]))
                         for unit in units
                         if all(p.signals.get(signal) is not None and p.targets.get(target) is not None for p in unit)]
                stat = spearman([a for a, _ in pairs], [b for _, b in pairs])
                # rho of "better by the signal" with the figure: a loss or an ECE counts reversed
                if stat["rho"] is not None and not SIGNALS[signal][1]:  # (p stays: it is two-sided)
                    stat = {**stat, "rho": -stat["rho"], "ci95": [-stat["ci95"][1], -stat["ci95"][0]]
                            if stat["ci95"][0] is not None else stat["ci95"]}
                rows.append({"level": level, "signal": signal, "target": f"test_{target}", **stat})
    return rows


def study_figure(points: list[RunPoint], split: str = "test"):
    """One panel per (signal, held-out figure): each run a point, coloured by configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({p.configuration for p in points})
    fig, axes = plt.subplots(len(TARGETS), len(SIGNALS), figsize=(3.2 * len(SIGNALS), 2.9 * len(TARGETS)),
                             squeeze=False)
    for col, (signal, (what, higher)) in enumerate(SIGNALS.items()):
        for row, target in enumerate(TARGETS):
            ax = axes[row][col]
            for k, config in enumerate(configs):
                mine = [p for p in points if p.configuration == config
                        and p.signals.get(signal) is not None and p.targets.get(target) is not None]
                ax.scatter([p.signals[signal] for p in mine], [p.targets[target] for p in mine], s=22,
                           color=f"C{k % 10}", label=config if row == 0 and col == 0 else None)
            if not higher:
                ax.invert_xaxis()  # better to the right in every panel
            ax.set_xlabel(what + " (better →)", fontsize=7)
            ax.set_ylabel(f"{split} {target}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if configs:  # one line per configuration: they can be long (every lever that differs)
        handles, labels = axes[0][0].get_legend_handles_labels()
        labels = [textwrap.shorten(label, 170, placeholder=" ...") for label in labels]
        fig.legend(handles, labels, loc="lower left", ncol=1, fontsize=6.5, frameon=False)
    fig.suptitle("val signals against the held-out figures (one point per run)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * len(configs), 1, 0.97))
    return fig
