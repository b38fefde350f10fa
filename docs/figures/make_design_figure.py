"""Draw docs/figures/design.png: the data flow of xray, from the Kaggle folders to a report.

    .venv/bin/python docs/figures/make_design_figure.py

Boxes are files and folders on disk; arrows are entrypoints, labelled with the modules they use.
Edit the lists below and rerun when the module map in docs/design.md changes.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "design.png"

# (x, y, title, contents): what lies on disk between two steps
STORES = [
    (0.0, 10.0, "chest_xray/", "{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg"),
    (0.0, 7.0, "outputs/data/<name>/", "{train,val,test}.mindrecord\nmanifest.json (mean/std, split, skipped)"),
    (0.0, 4.0, "run folder: outputs/train/<time>/", "config.yaml (with preprocess)\ncheckpoints/best.ckpt, last.ckpt\nhistory.jsonl, metrics.json, events.out.tfevents.*"),
    (0.0, 1.0, "results", "eval_<split>.json, predictions_<split>.csv\nroc, confusion, reliability plots\npredict: a printed table, plots"),
    (5.6, 4.0, "outputs/multirun/<sweep>/", "one run folder per member\nreport.{csv,md}, figures\nbest member -> outputs/best/<sweep>/"),
]
# (from store, to store, entrypoint, modules it uses)
STEPS = [
    (0, 1, "xray.convert", "labels, preprocess.load_image"),
    (1, 2, "xray.train", "data (epoch plan), augment, registry,\nstep, schedules, checkpoint, callbacks"),
    (2, 3, "xray.evaluate / predict", "checkpoint (load), preprocess,\nmetrics, calibration, explain"),
    (2, 4, "xray.train -m\n+ xray.report", "hparams, plots"),
]
BOX_W, BOX_H = 4.2, 1.5


def main() -> None:
    fig, ax = plt.subplots(figsize=(10, 9.5))
    ax.set_xlim(-2.3, 7.9)
    ax.set_ylim(0.1, 11.9)
    ax.axis("off")
    for x, y, title, contents in STORES:
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.05", facecolor="#eef3fb", edgecolor="#4a6fa5"))
        ax.text(x, y + BOX_H / 2 - 0.2, title, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.15, contents, ha="center", va="center", fontsize=8, family="monospace")
    for a, b, entrypoint, modules in STEPS:
        (xa, ya), (xb, yb) = STORES[a][:2], STORES[b][:2]
        if ya == yb:  # to the right: the entrypoint above the arrow, its modules below
            start, end = (xa + BOX_W / 2 + 0.05, ya), (xb - BOX_W / 2 - 0.05, yb)
            (x, y), ha = ((start[0] + end[0]) / 2, ya), "center"
        else:  # down: both right of the arrow
            start, end = (xa, ya - BOX_H / 2 - 0.05), (xb, yb + BOX_H / 2 + 0.05)
            (x, y), ha = (xa + 0.2, (start[1] + end[1]) / 2), "left"
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=15, color="#333333"))
        ax.text(x, y + 0.08, entrypoint, ha=ha, va="bottom", fontsize=9, weight="bold")
        ax.text(x, y - 0.08, modules, ha=ha, va="top", fontsize=8)
    ax.text(-2.2, 11.85, "xray: the data flow\nboxes: files on disk; arrows: entrypoints and the modules they use",
            fontsize=10, va="top")
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(OUT)


if __name__ == "__main__":
    main()
