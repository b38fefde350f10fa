"""Rank a sweep's members, plot them and export the best checkpoint; or compare named runs.

    python -m xray.report outputs/multirun/<sweep>            # table + report.{csv,md} + PNGs
    python -m xray.report outputs/multirun/<sweep> --force    # replace outputs/best/<name> even if not better
    python -m xray.report outputs/multirun/<sweep> --rank-by test_auc --top-k 3
    python -m xray.report --compare 'outputs/subtype_cpu/*' <run> --splits test,val \
        [--decisions bacterial_vs_viral,argmax] [--figure compare.png] [--markdown]

Works on a sweep that is still running or partly failed: members without metrics.json are
`unfinished`; a member whose training raised is `failed`. --compare reads each run folder's
eval_<split>.json (an ensemble's: the folder `xray.evaluate` wrote) and prints every decision
(a two-class task's own and a subtype model's read-offs at the val-chosen threshold and at 0.5,
a K-class model's argmax) with its bootstrap CIs; --figure draws their ROC curves from the
predictions_<split>.csv files, and per-class sensitivities of K-class models.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from tabulate import tabulate

from xray.errors import XrayError, one_line_errors
from xray.files import atomic_dir, write_json, write_text
from xray.hparams import ARGMAX, AT_HALF, AT_VAL_THRESHOLD, binary_results, decision_metrics, hparams_of, read_eval
from xray.hparams import TEST_METRICS  # the same keys TensorBoard's HParams tab shows
from xray.labels import binary_decisions
from xray.metrics import roc_auc, roc_curve

log = logging.getLogger(__name__)

EVAL_METRICS = TEST_METRICS  # per evaluated split, at the val-chosen threshold
LOWER_IS_BETTER = {"final_train_loss", "wall_time_s"}


@dataclass
class Member:
    name: str
    path: Path
    status: str  # ok | diverged | failed | unfinished
    hparams: dict
    sweep_name: str
    metrics: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)  # split -> eval_<split>.json of its best.ckpt

    @property
    def best_val_auc(self) -> Optional[float]:
        return (self.metrics.get("best_val") or {}).get("auc")

    def values(self) -> dict:
        """Every number the report can show or rank by."""
        best = self.metrics.get("best_val") or {}
        out = {"best_val_auc": best.get("auc"), "best_val_accuracy": best.get("accuracy")}
        for split, result in self.evals.items():
            decision = decision_metrics(result)  # two classes: at the val-chosen threshold; more: argmax
            if split == "val" or not decision:  # val: best_val_auc says it, unbiased
                continue
            for metric in EVAL_METRICS:
                out[f"{split}_{metric}"] = (decision.get(metric) or {}).get("value")
        out.update({"best_epoch": self.metrics.get("best_epoch"),
                    "final_train_loss": self.metrics.get("final_train_loss"),
                    "wall_time_s": self.metrics.get("wall_time_s")})
        return out


def collect(sweep_dir: Path, rank_by: str = "best_val_auc") -> list[Member]:
    """Every member folder (one with .hydra/config.yaml) of a sweep, ranked by `rank_by`
    (best val AUC by default; e.g. test_auc when the members were evaluated on test)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise XrayError(f"{sweep_dir} is not a folder; pass a sweep folder, e.g. outputs/multirun/<sweep>")
    members = []
    for config in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        path = config.parent.parent
        cfg = OmegaConf.load(config)
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        evals = {f.stem[len("eval_"):]: read_eval(f) for f in sorted(path.glob("eval_*.json")) if "_tta" not in f.stem}
        # a finished run's own record first: a rerun of it (with a typo) rewrites .hydra/, not that
        hparams = {**hparams_of(cfg), **metrics.get("hparams", {})}
        members.append(Member(path.name, path, metrics.get("status", "unfinished"),
                              hparams, str(cfg.get("sweep_name", "sweep")), metrics, evals))
    if not members:
        raise XrayError(f"{sweep_dir} has no sweep members (no */.hydra/config.yaml); "
                        "pass the folder a `python -m xray.train -m ...` wrote")
    return rank(members, rank_by)


def rank(members: list[Member], by: str = "best_val_auc") -> list[Member]:
    """Members sorted by a column, best first (highest, or lowest for a loss or a time);
    members without a value last."""
    known = sorted({k for m in members for k in m.values()} - {"best_epoch"})
    if by not in known:
        raise XrayError(f"--rank-by {by} is not a column of this sweep; use one of {', '.join(known)}")
    sign = 1.0 if by in LOWER_IS_BETTER else -1.0

    def key(m: Member) -> tuple:
        value = m.values().get(by)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, sign * (value or 0.0), m.name)

    return sorted(members, key=key)


def varying_hparams(members: list[Member]) -> list[str]:
    """The hyper-parameters that tell the members apart (the sweep's levers)."""
    keys = [k for k in members[0].hparams if k != "status"]
    return [k for k in keys if len({repr(m.hparams.get(k)) for m in members}) > 1]


def eval_splits(members: list[Member]) -> list[str]:
    """The splits other than val some member was evaluated on, test first."""
    found = {s for m in members for s, r in m.evals.items() if s != "val" and decision_metrics(r)}
    return sorted(found, key=lambda s: (s != "test", s))


def rows(members: list[Member]) -> tuple[list[str], list[dict]]:
    """(columns, one dict per member in rank order)."""
    levers = varying_hparams(members)
    split_cols = [f"{s}_{m}" for s in eval_splits(members) for m in EVAL_METRICS]
    columns = (["rank", "member", "status", *levers, "best_val_auc", "best_val_accuracy", *split_cols,
                "best_epoch", "final_train_loss", "wall_time_s", "checkpoint"])
    out = []
    for i, m in enumerate(members):
        ckpt = m.path / "checkpoints" / "best.ckpt"
        out.append({"rank": i + 1, "member": m.name, "status": m.status,
                    **{k: m.hparams.get(k) for k in levers}, **m.values(),
                    "checkpoint": str(ckpt) if ckpt.exists() else None})
    return columns, out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(columns: list[str], data: list[dict], markdown: bool = False) -> str:
    """A table of `data`'s `columns`: aligned text for a terminal, or a GitHub markdown table."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in data]
    # disable_numparse: the cells are formatted already; tabulate would turn "1.00" into "1"
    return tabulate(cells, headers=columns, tablefmt="github" if markdown else "plain",
                    disable_numparse=True) + "\n"


def table(members: list[Member], markdown: bool = False) -> str:
    columns, data = rows(members)
    return render(columns if markdown else [c for c in columns if c != "checkpoint"], data, markdown)


def write_csv(members: list[Member], path: Path) -> None:
    columns, data = rows(members)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(data)
    write_text(path, buf.getvalue())


def train_loss_curve(member: Member) -> tuple[np.ndarray, np.ndarray]:
    """(step, loss) of a member: per-step losses from its TensorBoard file, else per epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(member.path), size_guidance={"scalars": 0})
    # quiet while reading: the directory watcher's "No path found after ..." lines, and a resumed
    # run's next event file restarting at its checkpoint's step, where the accumulator drops what
    # the interrupted part logged after that step (it was trained again), which is right, and
    # warns about "a TensorFlow restart", which is not for our users
    tensorboard_log = logging.getLogger("tensorboard")
    level = tensorboard_log.level
    tensorboard_log.setLevel(logging.ERROR)
    try:
        acc.Reload()
    finally:
        tensorboard_log.setLevel(level)
    if "train/loss" in acc.Tags().get("scalars", []):
        events = acc.Scalars("train/loss")
        return np.array([e.step for e in events]), np.array([e.value for e in events])
    return np.array([]), np.array([])


def setting_of(members: list[Member]):
    """A member's levers other than lr and momentum as one label (e.g. "mse, image_size=72"):
    the heat map's panels and the loss curves' colours, so members that differ in more than
    lr and momentum never share a cell or a colour."""
    levers = [k for k in varying_hparams(members) if k not in ("lr", "momentum")] or ["loss"]
    if len(levers) > 2:  # too many to spell out: the member's own (readable) folder name
        return lambda m: m.name
    return lambda m: ", ".join(f"{m.hparams[k]}" if k == "loss" else f"{k}={m.hparams[k]}" for k in levers)


MAX_GRID_VALUES = 8  # lr or momentum values beyond which the lr x momentum figures are unreadable


def is_grid(members: list[Member]) -> bool:
    """True when lr and momentum each take a few values (a grid sweep), so that one heat-map
    cell or loss-curve panel per (lr, momentum) is readable; an Optuna search draws a new lr
    for every member."""
    return all(len({m.hparams.get(k) for m in members}) <= MAX_GRID_VALUES for k in ("lr", "momentum"))


def heatmap_figure(members: list[Member]):
    """Best val AUC over lr x momentum, one panel per setting of the other levers (per loss in
    a loss x lr x momentum sweep); diverged/failed cells say so."""
    import matplotlib.pyplot as plt

    setting = setting_of(members)
    panels = sorted({setting(m) for m in members})
    lrs = sorted({m.hparams["lr"] for m in members})
    moms = sorted({m.hparams["momentum"] for m in members})
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * len(lrs) * len(panels), 1.2 + 0.8 * len(moms)),
                             dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        grid = np.full((len(moms), len(lrs)), np.nan)
        labels = [["" for _ in lrs] for _ in moms]
        for m in members:
            if setting(m) != panel:
                continue
            i, j = moms.index(m.hparams["momentum"]), lrs.index(m.hparams["lr"])
            auc = m.best_val_auc
            if auc is not None and not math.isnan(auc):
                grid[i, j] = auc
            labels[i][j] = (f"{auc:.3f}" if auc is not None and not math.isnan(auc) else "") + (
                "" if m.status == "ok" else f"\n{m.status}")
        image = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
        for i in range(len(moms)):
            for j in range(len(lrs)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8,
                        color="white" if np.isnan(grid[i, j]) or grid[i, j] < 0.8 else "black")
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
        ax.set_yticks(range(len(moms)), [f"{v:g}" for v in moms])
        ax.set_xlabel("lr")
        if ax is axes[0][0]:
            ax.set_ylabel("momentum")
        ax.set_title(f"{panel}: best val AUC", fontsize=9)
        ax.set_facecolor("#444444")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return fig


def curves_figure(members: list[Member]):
    """Training-loss curves, one panel per (lr, momentum), the members' other levers overlaid
    (one colour per setting, e.g. per loss; see setting_of)."""
    import matplotlib.pyplot as plt

    lrs = sorted({m.hparams["lr"] for m in members})
    moms = sorted({m.hparams["momentum"] for m in members})
    fig, axes = plt.subplots(len(moms), len(lrs), figsize=(4.0 * len(lrs), 3.0 * len(moms)),
                             dpi=100, squeeze=False, sharex=True)
    setting = setting_of(members)
    settings = sorted({setting(m) for m in members})
    limits: dict[int, tuple[float, float]] = {}  # per panel: a blow-up spike must not flatten the rest
    for m in members:
        ax = axes[moms.index(m.hparams["momentum"])][lrs.index(m.hparams["lr"])]
        steps, loss = train_loss_curve(m)
        window = max(1, min(len(loss), len(loss) // 25))  # light smoothing: a moving average
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) else loss
        label = setting(m) + ("" if m.status == "ok" else f" ({m.status})")
        # one colour per setting in every panel; a member without a curve still gets its legend entry
        ax.plot(steps[window - 1:] if len(loss) else [], smooth, lw=1.5, label=label,
                color=f"C{settings.index(setting(m)) % 10}")
        if len(smooth):
            lo, hi = limits.get(id(ax), (np.inf, -np.inf))
            limits[id(ax)] = (min(lo, 0.9 * float(np.percentile(smooth, 1))),
                              max(hi, 1.2 * float(np.percentile(smooth, 95))))
    for i, mom in enumerate(moms):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            ax.set_title(f"lr={lr:g}, momentum={mom:g}", fontsize=9)
            if id(ax) in limits:
                ax.set_ylim(*limits[id(ax)])
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            if i == len(moms) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("train loss")
    fig.tight_layout()
    return fig


def val_vs_split_figure(members: list[Member], split: str):
    """Best val AUC against the split's AUC and specificity (at the val-chosen threshold), one
    point per member: how much validation says about new patients."""
    import matplotlib.pyplot as plt

    done = [(i + 1, m) for i, m in enumerate(members)
            if m.values().get(f"{split}_auc") is not None and m.best_val_auc is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
    x = [m.best_val_auc for _, m in done]
    for ax, metric in zip(axes, ("auc", "specificity")):
        y = [m.values().get(f"{split}_{metric}") for _, m in done]
        y = [np.nan if v is None else v for v in y]  # (no overall specificity with more classes)
        ax.scatter(x, y, s=30, color="C0")
        for (number, _), xi, yi in zip(done, x, y):
            ax.annotate(str(number), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("best val AUC (chooses the checkpoint)")
        ax.set_ylabel(f"{split} {metric}" + (" at the val-chosen threshold" if metric != "auc" else ""))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"val vs {split}: AUC", fontsize=10)
    axes[1].set_title(f"val AUC vs {split} specificity", fontsize=10)
    fig.suptitle("numbers = rank in report.md", fontsize=8)
    fig.tight_layout()
    return fig


def export_best(members: list[Member], best_root: Path, force: bool = False,
                top_k: int = 1) -> Optional[Path]:
    """Copy the member with the best val AUC into <best_root>/<sweep name>/ with a MindIR
    export, and the top_k members by val AUC into its members/1..top_k/ (for ensembles:
    `xray.evaluate ckpt=<folder> top_k=K`); an existing folder is only replaced by a better
    member, or with force. Returns the folder if written."""
    ranked = [m for m in rank(members, "best_val_auc") if m.status == "ok" and m.best_val_auc is not None
              and not math.isnan(m.best_val_auc) and (m.path / "checkpoints" / "best.ckpt").exists()]
    if not ranked:
        log.info("best: no finished member with a checkpoint yet")
        return None
    tasks = sorted({m.hparams.get("task", "binary") for m in ranked})
    if len(tasks) > 1:  # a 3-class macro AUC and a two-class AUC do not rank one another
        raise XrayError(f"best: the members train different tasks ({', '.join(tasks)}), whose val AUCs do "
                        "not compare; sweep one task at a time, or report with --no-best")
    winner = ranked[0]
    if top_k > len(ranked):
        raise XrayError(f"--top-k {top_k}: only {len(ranked)} members finished with a checkpoint")
    target = Path(best_root) / winner.sweep_name
    current_auc = -1.0
    if (target / "metrics.json").exists() and not force:
        current = json.loads((target / "metrics.json").read_text())
        current_auc = (current.get("best_val") or {}).get("auc") or -1.0
        current_task = (current.get("hparams") or {}).get("task", "binary")
        if current_task != tasks[0]:
            raise XrayError(f"best: {target} holds a task={current_task} model, this sweep trains "
                            f"task={tasks[0]}; give the sweep its own sweep_name, or --force to replace it")
    if winner.best_val_auc > current_auc:
        with atomic_dir(target) as tmp:
            copy_member(winner, tmp)
            cfg = OmegaConf.load(tmp / "config.yaml")
            manifest = Path(cfg.data.dir) / "manifest.json"
            if manifest.exists():
                shutil.copy2(manifest, tmp / "manifest.json")
            export_mindir(tmp / "best.ckpt", tmp / "model.mindir")  # (an older members/ goes with it)
            calibrate_export(tmp / "best.ckpt")
        log.info("best: %s (val AUC %.4f) -> %s", winner.name, winner.best_val_auc, target)
    else:
        log.info("best: %s keeps its model (val AUC %.4f >= %.4f of %s); --force replaces it",
                 target, current_auc, winner.best_val_auc, winner.name)
    if top_k > 1:  # (re)written whenever asked for: the sweep's top_k by val AUC
        with atomic_dir(target / "members") as tmp:
            for i, member in enumerate(ranked[:top_k], start=1):
                copy_member(member, tmp / str(i))
        log.info("best: top %d members by val AUC -> %s/members/1..%d", top_k, target, top_k)
    return target if winner.best_val_auc > current_auc or top_k > 1 else None


def calibrate_export(checkpoint: Path) -> None:
    """Temperature scaling fitted on val, stored beside the exported checkpoint; a data set
    that is gone only costs the calibration."""
    from xray.evaluate import calibrate_checkpoint

    try:
        calibrate_checkpoint(checkpoint)
    except XrayError as e:
        log.warning("best: not calibrated (%s)", e)


def copy_member(member: Member, folder: Path) -> None:
    """best.ckpt (a hard link where the file system allows: no second copy of 230 MB),
    config.yaml and metrics.json (with the member it came from) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    link_or_copy(member.path / "checkpoints" / "best.ckpt", folder / "best.ckpt")
    shutil.copy2(member.path / "config.yaml", folder / "config.yaml")
    write_json(folder / "metrics.json", {**member.metrics, "source": str(member.path)})


def link_or_copy(source, target) -> None:
    """A hard link (checkpoints are never modified in place, only replaced), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def export_mindir(checkpoint: Path, path: Path) -> None:
    """The network graph + weights as MindIR: loadable with mindspore.load, no xray code needed."""
    import mindspore as ms

    from xray.checkpoint import load_trained_model

    model = load_trained_model(checkpoint)
    s = model.spec
    example = ms.Tensor(np.zeros((1, s.channels, s.image_size, s.image_size), np.float32))
    ms.export(model.net, example, file_name=str(path.with_suffix("")), file_format="MINDIR")


def report(sweep_dir: Path, best_root: Optional[Path] = Path("outputs/best"), force: bool = False,
           out=None, rank_by: str = "best_val_auc", top_k: int = 1) -> list[Member]:
    """Print the ranking (by `rank_by`), write report.{csv,md}, the plots into the sweep folder,
    and export the best member by val AUC, whatever the ranking shown (unless best_root is
    None): the product chooses on validation only."""
    from xray.plots import save_figure

    out = out or sys.stdout
    sweep_dir = Path(sweep_dir)
    members = collect(sweep_dir, rank_by)
    text = table(members)
    out.write(text)
    counts = {s: sum(m.status == s for m in members) for s in ("ok", "diverged", "failed", "unfinished")}
    out.write(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (ranked by {rank_by})\n")
    write_csv(members, sweep_dir / "report.csv")
    write_text(sweep_dir / "report.md", f"# Sweep {sweep_dir.name}\n\nRanked by {rank_by}.\n\n"
               + table(members, markdown=True))
    if is_grid(members):
        if {"lr", "momentum"} & set(varying_hparams(members)):
            save_figure(heatmap_figure(members), sweep_dir / "heatmap_auc.png")
        save_figure(curves_figure(members), sweep_dir / "loss_curves.png")
    else:
        log.info("report: lr and momentum take more than %d values (a search, not a grid): no "
                 "heat map or loss-curve grid; read the table and TensorBoard", MAX_GRID_VALUES)
    for split in eval_splits(members):
        if split != "val":
            save_figure(val_vs_split_figure(members, split), sweep_dir / f"val_vs_{split}.png")
    if best_root is not None:
        from xray.device import setup_device

        setup_device("CPU")
        export_best(members, best_root, force, top_k)
    return members


# -- compare: named runs side by side ------------------------------------------------------------

def natural_key(path: Path) -> list:
    """Sorts 2_run before 10_run: run folders are often numbered in the order trained."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def run_folders(patterns: Sequence[str]) -> list[Path]:
    """The folders named, or matched by globs (in natural order), in the order given, each once."""
    folders: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = sorted((Path(p) for p in glob.glob(pattern) if Path(p).is_dir()), key=natural_key)
            if not matched:
                raise XrayError(f"--compare {pattern} matches no folder; check the path (and quote a glob, "
                                "e.g. 'outputs/runs/*', so the shell leaves it to the report)")
        elif Path(pattern).is_dir():
            matched = [Path(pattern)]
        else:
            raise XrayError(f"--compare {pattern}: no such folder; pass run folders (with eval_<split>.json, "
                            "which `python -m xray.evaluate` writes) or a glob of them")
        folders += [f for f in matched if f not in folders]
    return folders


@dataclass
class Decision:
    """One metric block of one run's evaluation: a K-class model's argmax, or a two-class
    decision (a two-class task's own, a subtype model's read-off) at one threshold."""
    run: Path
    split: str
    task: str
    name: str  # argmax, or the two-class decision's name
    at: str  # "argmax", "0.5", or the val-chosen threshold with its rule
    images: int
    metrics: dict  # {metric: {value, ci95}}

    def cells(self) -> dict:
        return {"run": str(self.run), "split": self.split, "task": self.task, "decision": self.name,
                "at": self.at, "images": self.images, **{m: with_ci(self.metrics.get(m)) for m in COMPARED}}


COMPARED = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")
COMPARE_COLUMNS = ["run", "split", "task", "decision", "at", "images", *COMPARED]


def with_ci(metric: Optional[dict]) -> Optional[str]:
    """0.943 (0.903-0.977): a value with its bootstrap 95 % CI."""
    if not metric or metric.get("value") is None:
        return None
    ci = metric.get("ci95")
    return f"{metric['value']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def decisions_of(run: Path, split: str, result: dict) -> list[Decision]:
    """Every metric block of an eval result (today's keys): a K-class model's argmax, and each
    two-class decision at the val-chosen threshold and at 0.5."""
    out = []
    if ARGMAX in result:
        out.append(Decision(run, split, result["task"], ARGMAX, "argmax", result["images"], result[ARGMAX]))
    for name, r in binary_results(result).items():
        at_val = r[AT_VAL_THRESHOLD]
        chosen = f"{at_val['threshold']:.3f} ({at_val['rule'] or 'rule not recorded'} on val)"
        out.append(Decision(run, split, result["task"], name, chosen, r["images"], at_val))
        out.append(Decision(run, split, result["task"], name, "0.5", r["images"], r[AT_HALF]))
    return out


def compare_decisions(folders: Sequence[Path], splits: Sequence[str],
                      names: Optional[Sequence[str]] = None) -> list[Decision]:
    """Every decision of every run on every split, from its eval_<split>.json (a run without
    one is left out, with a warning); `names` keeps only those named (e.g. argmax,
    bacterial_vs_viral: a bacterial_vs_viral model's own and a subtype model's read-off)."""
    out = []
    for folder in folders:
        for split in splits:
            path = folder / f"eval_{split}.json"
            if not path.exists():
                log.warning("compare: %s has no eval_%s.json, left out (python -m xray.evaluate "
                            "ckpt=%s/checkpoints/best.ckpt split=%s writes it)", folder, split, folder, split)
                continue
            out += [d for d in decisions_of(folder, split, read_eval(path)) if names is None or d.name in names]
    if not out:
        raise XrayError(f"--compare: no eval_<{'|'.join(splits)}>.json"
                        + (f" with decisions {', '.join(names)}" if names else "")
                        + " in the folders given; evaluate the runs first, or pick other --splits / --decisions")
    return out


def read_predictions(folder: Path, split: str, classes: Sequence[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(class ids, NxK class probabilities) from a run's predictions_<split>.csv (a two-class
    one holds p of class 1 only); None when the run has none."""
    path = folder / f"predictions_{split}.csv"
    if not path.exists():
        log.warning("compare: %s has no predictions_%s.csv; its ROC curve is left out", folder, split)
        return None
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        labels = np.array([int(r["label"]) for r in records])
        if len(classes) == 2:
            p = np.array([float(r[f"p_{classes[1].lower()}"]) for r in records])
            return labels, np.stack([1 - p, p], axis=1)
        return labels, np.array([[float(r[f"p_{c.lower()}"]) for c in classes] for r in records])
    except (KeyError, ValueError) as e:
        raise XrayError(f"{path} cannot be read ({type(e).__name__}: {e}); rerun `python -m xray.evaluate` "
                        "on that run's checkpoint, or delete the file") from None


def compare_figure(decisions: list[Decision], splits: Sequence[str]):
    """A row of panels per split: the ROC curves of each two-class decision, one curve per run
    (from its predictions), and, when K-class runs are compared, their per-class sensitivities."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(d.name for d in decisions if d.name != ARGMAX))
    with_bars = any(d.name == ARGMAX for d in decisions)
    runs = short_names(list(dict.fromkeys(d.run for d in decisions)))  # run -> its label, one colour each
    ncols = len(names) + with_bars
    fig, axes = plt.subplots(len(splits), ncols, figsize=(5.5 * ncols, 4.6 * len(splits)), dpi=100, squeeze=False)
    for panels, split in zip(axes, splits):
        here = [d for d in decisions if d.split == split]
        for ax, name in zip(panels, names):
            for run in dict.fromkeys(d.run for d in here if d.name == name):
                roc_curve_panel(ax, run, split, name, runs[run], f"C{list(runs).index(run) % 10}")
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}, {split}")
            if ax.get_legend_handles_labels()[0]:  # (no curve: no predictions file)
                ax.legend(fontsize=7, loc="lower right")
        if with_bars:
            sensitivity_bars(panels[-1], [d for d in here if d.name == ARGMAX], split, runs)
    fig.tight_layout()
    return fig


def short_names(runs: list[Path]) -> dict[Path, str]:
    """Each run's folder name, or as many of its last path parts as tell it from the others."""
    for parts in range(1, max(len(r.parts) for r in runs) + 1):
        labels = {r: str(Path(*r.parts[-parts:])) for r in runs}
        if len(set(labels.values())) == len(runs):
            return labels
    return {r: str(r) for r in runs}


def roc_curve_panel(ax, run: Path, split: str, name: str, label: str, colour: str) -> None:
    """One run's ROC curve of decision `name` on `split`, from its predictions."""
    result = read_eval(run / f"eval_{split}.json")
    predictions = read_predictions(run, split, result["classes"])
    if predictions is None:
        return
    y, p = binary_decisions(result["task"], *predictions)[name]
    fpr, tpr, _ = roc_curve(y, p)
    read_off = " (read off)" if result["task"] != name else ""
    ax.plot(fpr, tpr, lw=1.5, color=colour, label=f"{label}{read_off}: AUC {roc_auc(y, p):.3f}")


def sensitivity_bars(ax, argmax: list[Decision], split: str, runs: dict[Path, str]) -> None:
    """Each K-class run's per-class sensitivity (argmax), grouped by class."""
    classes = list(dict.fromkeys(k[len("sensitivity_"):] for d in argmax for k in d.metrics
                                 if k.startswith("sensitivity_")))
    width = 0.8 / len(argmax)
    for i, d in enumerate(argmax):
        values = [d.metrics.get(f"sensitivity_{c}", {}).get("value") or 0.0 for c in classes]
        bars = ax.bar(np.arange(len(classes)) + (i - (len(argmax) - 1) / 2) * width, values, width,
                      color=f"C{list(runs).index(d.run) % 10}",
                      label=f"{runs[d.run]} (accuracy {d.metrics['accuracy']['value']:.3f})")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(classes)), classes)
    ax.set(ylim=(0, 1.08), ylabel="sensitivity (argmax)", title=f"per class, {split}")
    ax.legend(fontsize=7, loc="lower left")


def compare(patterns: Sequence[str], splits: Sequence[str] = ("test",), names: Optional[Sequence[str]] = None,
            figure: Optional[Path] = None, markdown: bool = False, out=None) -> list[Decision]:
    """Print the decisions of the runs named or globbed by `patterns` on `splits` side by side,
    with their CIs (a markdown table with markdown=True); draw compare_figure into `figure`."""
    from xray.plots import save_figure

    decisions = compare_decisions(run_folders(patterns), splits, names)
    (out or sys.stdout).write(render(COMPARE_COLUMNS, [d.cells() for d in decisions], markdown))
    if figure is not None:
        shown = [s for s in splits if any(d.split == s for d in decisions)]
        save_figure(compare_figure(decisions, shown), figure)
        log.info("compare: -> %s", figure)
    return decisions

@one_line_errors
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xray.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="a sweep folder, e.g. outputs/multirun/<sweep>")
    parser.add_argument("--best-root", type=Path, default=Path("outputs/best"),
                        help="where the winner is copied (default outputs/best)")
    parser.add_argument("--no-best", action="store_true", help="only report, copy nothing")
    parser.add_argument("--force", action="store_true", help="replace the best folder even if not better")
    parser.add_argument("--rank-by", default="best_val_auc",
                        help="column to rank by, e.g. test_auc (default best_val_auc); the export "
                             "always takes the best by val AUC")
    parser.add_argument("--top-k", type=int, default=1,
                        help="also copy the K best members by val AUC into <best>/members/1..K")
    compare_options = parser.add_argument_group("compare runs (instead of a sweep)")
    compare_options.add_argument("--compare", nargs="+", metavar="RUN_OR_GLOB",
                                 help="run folders or quoted globs of them, e.g. 'outputs/subtype_cpu/*'")
    compare_options.add_argument("--splits", default="test", help="comma-separated splits (default test); "
                                 "a file tag works too, e.g. test_tta4")
    compare_options.add_argument("--decisions", help="comma-separated decisions to keep, e.g. "
                                 "bacterial_vs_viral,argmax (default all)")
    compare_options.add_argument("--figure", type=Path, help="also draw ROC curves and per-class sensitivities here")
    compare_options.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.compare is None):
        parser.error("pass a sweep folder, or --compare RUN_OR_GLOB [...]")
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compare:
        compare(args.compare, args.splits.split(","), args.decisions.split(",") if args.decisions else None,
                args.figure, args.markdown)
        return
    report(args.sweep_dir, None if args.no_best else args.best_root, args.force, rank_by=args.rank_by,
           top_k=args.top_k)


if __name__ == "__main__":
    main()
