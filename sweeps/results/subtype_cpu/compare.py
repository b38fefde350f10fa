"""The pneumonia-type runs on the test half, side by side (README "Pneumonia type"):
bacterial vs viral ROC of each model, and per-class sensitivity of the 3-class models; prints
the bacterial-vs-viral figures of each run with bootstrap 95 % CIs (a 3-class model's read off
as p_bact / (p_bact + p_viral) on the pneumonia images), at 0.5 and at the threshold chosen on
val (Youden, on the run's predictions_val.csv read off the same way).

    python sweeps/results/subtype_cpu/compare.py <runs folder> [out.png]

<runs folder> holds the run folders named below (the commands are in the README); each has
predictions_test.csv (an ensemble: the folder `python -m xray.evaluate` wrote). Runs not there
(yet) are left out.
"""
import csv
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xray.labels import binary_read_offs  # noqa: E402
from xray.metrics import (binary_metrics, bootstrap_ci, roc_auc, roc_curve,  # noqa: E402
                          youden_threshold)


def read(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def bacterial_vs_viral(run: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(y = 1 for bacterial, p(bacterial)) on the pneumonia images of a split."""
    p = read(run / f"predictions_{split}.csv")
    if "p_viral" not in p:  # a bacterial_vs_viral model: VIRAL = 0, BACTERIAL = 1
        return p["label"].astype(int), p["p_bacterial"].astype(float)
    probs = np.stack([p["p_normal"], p["p_bacterial"], p["p_viral"]], axis=1).astype(float)
    return binary_read_offs("subtype", p["label"].astype(int), probs)["bacterial_vs_viral"]


def print_bacterial_vs_viral(run: Path, y: np.ndarray, p: np.ndarray) -> None:
    ci = bootstrap_ci(y, p, binary_metrics)
    m = binary_metrics(y, p, 0.5)
    line = (f"{run.name}: bacterial vs viral AUC {m['auc']:.3f} ({ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}); "
            f"at 0.5 accuracy {m['accuracy']:.3f} ({ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}), "
            f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}")
    if (run / "predictions_val.csv").exists():
        threshold = youden_threshold(*bacterial_vs_viral(run, "val"))
        t = binary_metrics(y, p, threshold)
        line += (f"; at the val-chosen {threshold:.2f} accuracy {t['accuracy']:.3f}, "
                 f"sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}")
    print(line)


# every run of the README's table, in the order trained: (folder, what changed); the folders of
# `task=subtype` models (predictions with p_normal) appear in both panels
RUNS = [("0_subtype", "subtype, shuffle"),
        ("1_bacterial_vs_viral", "bacterial_vs_viral, shuffle"),
        ("2_subtype_balanced", "subtype, balanced"),
        ("2_bacterial_vs_viral_balanced", "bacterial_vs_viral, balanced"),
        ("3_subtype_balanced_16ep", "subtype, balanced, 16 epochs"),
        ("3_bacterial_vs_viral_balanced_16ep", "bacterial_vs_viral, balanced, 16 epochs"),
        ("4_subtype_balanced_16ep_clahe", "subtype, balanced, 16 epochs, CLAHE"),
        ("4_bacterial_vs_viral_balanced_16ep_clahe", "bacterial_vs_viral, balanced, 16 epochs, CLAHE"),
        ("5_subtype_balanced_24ep", "subtype, balanced, 24 epochs"),
        ("6_subtype_balanced_24ep_seed7", "subtype, balanced, 24 epochs, seed 7"),
        ("7_subtype_balanced_24ep_seed42", "subtype, balanced, 24 epochs, seed 42 again"),
        ("8_subtype_ensemble_24ep_seeds_42_7", "subtype, mean of seeds 42 and 7"),
        ("9_subtype_balanced_32ep_seed42", "subtype, balanced, 32 epochs, seed 42"),
        ("10_subtype_balanced_32ep_seed7", "subtype, balanced, 32 epochs, seed 7"),
        ("11_subtype_ensemble_32ep_seeds_42_7", "subtype, mean of the 32-epoch seeds 42 and 7"),
        ("12_subtype_balanced_32ep_intensity", "subtype, balanced, 32 epochs, intensity augmentation"),
        ("13_subtype_ensemble_32ep_plain_intensity", "subtype, mean of 32-epoch seed 42 with and without intensity"),
        ("14_subtype_ensemble_32ep_three", "subtype, mean of the three 32-epoch models")]


def main(runs: Path, out: Path) -> None:
    found = [(name, label, read(runs / name / "predictions_test.csv"))
             for name, label in RUNS if (runs / name / "predictions_test.csv").exists()]
    fig, (roc_ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for name, label, predictions in found:
        y, p = bacterial_vs_viral(runs / name)
        print_bacterial_vs_viral(runs / name, y, p)
        fpr, tpr, _ = roc_curve(y, p)
        label = f"read off {label}" if "p_normal" in predictions else label
        roc_ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(y, p):.3f})")
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    roc_ax.set(xlabel="1 - specificity (viral called bacterial)", ylabel="sensitivity (bacterial)",
               title="Bacterial vs viral, test half (193 pneumonia images)")
    roc_ax.legend(fontsize=8, loc="lower right")
    classes = ["NORMAL", "BACTERIAL", "VIRAL"]
    runs3 = [(label, p) for _, label, p in found if "p_normal" in p]
    width = 0.8 / len(runs3)
    for k, (label, p) in enumerate(runs3):
        y = p["label"].astype(int)
        top = np.stack([p[f"p_{c.lower()}"].astype(float) for c in classes], 1).argmax(1)
        sens = [float(np.mean(top[y == c] == c)) for c in range(3)]
        bars = bar_ax.bar(np.arange(3) + (k - (len(runs3) - 1) / 2) * width, sens, width,
                          label=f"{label} (accuracy {np.mean(top == y):.3f})")
        bar_ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bar_ax.set_xticks(range(3), classes)
    bar_ax.set(ylim=(0, 1.08), ylabel="sensitivity (argmax)", title="3 classes, test half (310 images)")
    bar_ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "levers_test.png"))
