"""Rank a sweep's members, plot them and export the best checkpoint; or compare named runs.

    python -m xray.report outputs/multirun/<sweep>            # table + report.{csv,md,html} + PNGs
    python -m xray.report outputs/multirun/<sweep> --force    # replace outputs/best/<name> even if not better
    python -m xray.report outputs/multirun/<sweep> --rank-by test_auc --top-k 3
    python -m xray.report outputs/multirun/<sweep> --ensemble # export the best configuration's seeds together
    python -m xray.report --compare 'outputs/subtype_cpu/*' <run> --splits test,val \
        [--decisions bacterial_vs_viral,argmax] [--figure compare.png] [--markdown]
    python -m xray.report --compare NEW_s42 NEW_s7 --baseline OLD_s42 OLD_s7   # paired by seed (xray.paired)

Works on a sweep that is still running or partly failed: members without metrics.json are
`unfinished`; a member whose training raised is `failed`; one whose files cannot be read (a
metrics.json cut by a node failure) is `unreadable`, with the reason. Members that differ only
by `seed` form one configuration: the report adds a table of configurations ranked by their
mean over seeds (mean +- sd and a t-interval 95 % CI), and the export takes the best
configuration by mean, then its best member (--ensemble: all its members). report.html is the
sweep on one self-contained page, with links to each member's model card (cards/<member>.html).
--compare reads each run folder's
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
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from tabulate import tabulate

from xray.errors import XrayError, one_line_errors
from xray.files import atomic_dir, write_json, write_text
from xray.hparams import (ARGMAX, AT_HALF, AT_VAL_THRESHOLD, binary_results, decision_metrics, hparams_of, read_eval,
                          read_predictions_csv, short_rule)
from xray.hparams import TEST_METRICS  # the same keys TensorBoard's HParams tab shows
from xray.labels import binary_decisions
from xray.metrics import roc_auc, roc_curve
from xray.signals import RunPoint, held_out, study, study_figure, val_signals

log = logging.getLogger(__name__)

EVAL_METRICS = TEST_METRICS  # per evaluated split, at the val-chosen threshold
LOWER_IS_BETTER = {"final_train_loss", "wall_time_s", "val_log_loss", "val_ece"}


@dataclass
class Member:
    name: str
    path: Path
    status: str  # ok | diverged | failed | unfinished | unreadable
    hparams: dict
    sweep_name: str
    metrics: dict = field(default_factory=dict)
    evals: dict = field(default_factory=dict)  # split -> eval_<split>.json of its best.ckpt
    reason: Optional[str] = None  # why it is unreadable, or why a member without a result ended

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "best.ckpt"

    @property
    def best_val_auc(self) -> Optional[float]:
        return (self.metrics.get("best_val") or {}).get("auc")

    @cached_property
    def val_signals(self) -> dict:
        """What else val says of the screening decision (xray.signals): val_log_loss, ...; read once."""
        return val_signals(self.path, self.evals["val"]) if "val" in self.evals else {}

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
        out.update({k: v for k, v in self.val_signals.items() if k != "val_auc"})
        out.update({"best_epoch": self.metrics.get("best_epoch"),
                    "final_train_loss": self.metrics.get("final_train_loss"),
                    "wall_time_s": self.metrics.get("wall_time_s")})
        return out


def collect(sweep_dir: Path, rank_by: str = "best_val_auc") -> list[Member]:
    """Every member folder (one with .hydra/config.yaml) of a sweep, ranked by `rank_by`
    (best val AUC by default; e.g. test_auc when the members were evaluated on test). A member
    whose config, metrics.json or eval_<split>.json cannot be read is `unreadable` (its reason
    recorded), never an error: the others are still ranked."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise XrayError(f"{sweep_dir} is not a folder; pass a sweep folder, e.g. outputs/multirun/<sweep>")
    members = [read_member(config.parent.parent) for config in sorted(sweep_dir.glob("*/.hydra/config.yaml"))]
    if not members:
        raise XrayError(f"{sweep_dir} has no sweep members (no */.hydra/config.yaml); "
                        "pass the folder a `python -m xray.train -m ...` wrote")
    return rank(members, rank_by)


def read_member(path: Path) -> Member:
    """A member folder as the report sees it; `unreadable` (with the reason) when one of its
    files is cut or damaged (e.g. by a node failure mid-write)."""
    problems, hparams, sweep_name = [], {}, "sweep"
    try:
        cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
        hparams, sweep_name = hparams_of(cfg), str(cfg.get("sweep_name", "sweep"))
    except Exception as e:  # noqa: BLE001 - yaml's and OmegaConf's errors: any is a damaged file
        problems.append(f".hydra/config.yaml: {type(e).__name__}: {_first_line(e)}")
    metrics = {}
    if (path / "metrics.json").exists():
        try:
            metrics = json.loads((path / "metrics.json").read_text())
            if not isinstance(metrics, dict):
                raise ValueError(f"holds a {type(metrics).__name__}, not an object")
        except (OSError, ValueError) as e:
            metrics = {}
            problems.append(f"metrics.json: {type(e).__name__}: {_first_line(e)}")
    evals = {}
    for f in sorted(path.glob("eval_*.json")):
        if "_tta" in f.stem:
            continue
        try:
            evals[f.stem[len("eval_"):]] = read_eval(f)
        except XrayError as e:
            problems.append(f"{f.name}: {str(e).split(' cannot be read ', 1)[-1].split('; rerun')[0].strip('()')}")
    # a finished run's own record first: a rerun of it (with a typo) rewrites .hydra/, not that
    hparams = {**hparams, **(metrics.get("hparams") or {})}
    if problems:
        return Member(path.name, path, "unreadable", hparams, sweep_name, {}, {}, "; ".join(problems))
    if "status" not in metrics:
        killed = killed_writer(path)
        if killed:
            return Member(path.name, path, "failed", hparams, sweep_name, {"status": "failed", "error": killed},
                          evals, killed)
    return Member(path.name, path, metrics.get("status", "unfinished"), hparams, sweep_name, metrics, evals)


def killed_writer(path: Path) -> Optional[str]:
    """Why a member without a result is not running any more: its run folder's lock names a
    writer that is gone (e.g. kill -9), or None (still running, or never started)."""
    from xray.run_lock import FolderLock, read_holder

    holder = read_holder(path)
    if holder is None:
        return None
    verdict, why = FolderLock(path, rank=0).judge(holder)
    return f"killed ({why}); rerunning it resumes from its last.ckpt" if verdict == "stale" else None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


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
    """The hyper-parameters that tell the members apart (the sweep's levers); unreadable
    members, whose record may be partial, do not count."""
    members = [m for m in members if m.status != "unreadable"] or members
    keys = list(dict.fromkeys(k for m in members for k in m.hparams if k != "status"))
    return [k for k in keys if len({repr(m.hparams.get(k)) for m in members}) > 1]


def eval_splits(members: list[Member]) -> list[str]:
    """The splits other than val some member was evaluated on, test first."""
    found = {s for m in members for s, r in m.evals.items() if s != "val" and decision_metrics(r)}
    return sorted(found, key=lambda s: (s != "test", s))


def rows(members: list[Member], rank_by: str = "best_val_auc") -> tuple[list[str], list[dict]]:
    """(columns, one dict per member in rank order); the column ranked by is shown too."""
    levers = varying_hparams(members)
    split_cols = [f"{s}_{m}" for s in eval_splits(members) for m in EVAL_METRICS]
    shown = ["best_val_auc", "best_val_accuracy", *split_cols, "best_epoch", "final_train_loss", "wall_time_s"]
    columns = (["rank", "member", "status", *levers, *([rank_by] if rank_by not in shown else []), *shown,
                "checkpoint"])
    out = []
    for i, m in enumerate(members):
        out.append({"rank": i + 1, "member": m.name, "status": m.status,
                    **{k: m.hparams.get(k) for k in levers}, **m.values(),
                    "checkpoint": str(m.checkpoint) if m.checkpoint.exists() else None})
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


def table(members: list[Member], markdown: bool = False, rank_by: str = "best_val_auc") -> str:
    columns, data = rows(members, rank_by)
    return render(columns if markdown else [c for c in columns if c != "checkpoint"], data, markdown)


def unreadable_lines(members: list[Member]) -> list[str]:
    """One line per member the report could not read, with the reason."""
    return [f"unreadable: {m.name}: {m.reason}" for m in members if m.status == "unreadable"]


def write_csv(members: list[Member], path: Path, rank_by: str = "best_val_auc") -> None:
    columns, data = rows(members, rank_by)
    _write_csv(columns, data, path)


def _write_csv(columns: list[str], data: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(data)
    write_text(path, buf.getvalue())


# -- configurations: the members that differ only by seed -----------------------------------------

SEED = "seed"


@dataclass
class Stat:
    """A column over a configuration's seeds: n values, their mean, sd (n - 1) and the
    t-interval 95 % CI of the mean (None with one value)."""
    n: int
    mean: Optional[float] = None
    sd: Optional[float] = None
    ci95: Optional[tuple[float, float]] = None

    def text(self) -> Optional[str]:
        """0.912 ± 0.010 (0.887-0.937), or the value alone for one seed."""
        if self.mean is None:
            return None
        if self.sd is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.3f} ± {self.sd:.3f} ({self.ci95[0]:.3f}-{self.ci95[1]:.3f})"


def seed_stat(values: Sequence[Optional[float]]) -> Stat:
    """mean, sd and the 95 % t-interval over the seeds' values (missing and NaN left out)."""
    finite = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(finite)
    if n == 0:
        return Stat(0)
    mean = float(np.mean(finite))
    if n == 1:
        return Stat(1, mean)
    from scipy.stats import t

    sd = float(np.std(finite, ddof=1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return Stat(n, mean, sd, (mean - half, mean + half))


@dataclass
class Configuration:
    """Members whose hyper-parameters are the same but for the seed; `members` best first."""
    levers: dict  # the sweep's varying hyper-parameters but the seed -> this configuration's values
    members: list[Member]

    @property
    def finished(self) -> list[Member]:
        return [m for m in self.members if m.status == "ok"]

    def stat(self, column: str) -> Stat:
        """The column over the configuration's finished (ok) members."""
        return seed_stat([m.values().get(column) for m in self.finished])

    @property
    def best(self) -> Optional[Member]:
        """Its finished member with the best val AUC."""
        done = [m for m in self.finished if m.best_val_auc is not None and not math.isnan(m.best_val_auc)]
        return max(done, key=lambda m: m.best_val_auc) if done else None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.levers.items()) or "the recipe"


def configurations(members: list[Member], by: str = "best_val_auc") -> list[Configuration]:
    """The members grouped by their hyper-parameters but the seed (unreadable ones left out),
    ranked by the mean of `by` over each configuration's finished members (best first; those
    without a value last)."""
    readable = [m for m in members if m.status != "unreadable"]
    levers = [k for k in varying_hparams(readable) if k != SEED]
    groups: dict[str, list[Member]] = {}
    for m in readable:
        key = repr(sorted((k, repr(v)) for k, v in m.hparams.items() if k not in (SEED, "status")))
        groups.setdefault(key, []).append(m)
    configs = [Configuration({k: ms[0].hparams.get(k) for k in levers}, rank(ms, "best_val_auc"))
               for ms in groups.values()]
    sign = 1.0 if by in LOWER_IS_BETTER else -1.0

    def key(c: Configuration) -> tuple:
        mean = c.stat(by).mean
        return (mean is None, sign * (mean or 0.0), c.label)

    return sorted(configs, key=key)


def seeds_vary(members: list[Member]) -> bool:
    """True when some configuration has more than one member (a sweep over seeds)."""
    return any(len(c.members) > 1 for c in configurations(members))


def aggregated_columns(members: list[Member]) -> list[str]:
    """What the configuration table gives over seeds: best val AUC and the metrics at the
    val-chosen threshold on every other evaluated split."""
    return ["best_val_auc", *[f"{s}_{m}" for s in eval_splits(members) for m in EVAL_METRICS]]


def config_rows(configs: list[Configuration], members: list[Member]) -> tuple[list[str], list[dict], list[str]]:
    """(display columns, one dict per configuration in rank order, csv columns): each aggregated
    column as "mean ± sd (CI)" for the terminal and markdown, and as numbers for the csv."""
    levers = list(configs[0].levers) if configs else []
    aggregated = aggregated_columns(members)
    columns = ["rank", *levers, "seeds", "ok", *aggregated, "best_member"]
    numeric = ["rank", *levers, "seeds", "ok", *[f"{c}_{s}" for c in aggregated
                                                  for s in ("mean", "sd", "ci95_low", "ci95_high", "n")], "best_member"]
    out = []
    for i, c in enumerate(configs):
        seeds = sorted((m.hparams.get(SEED) for m in c.members), key=lambda v: (not isinstance(v, (int, float)), str(v)
                                                                              if not isinstance(v, (int, float)) else v))
        row = {"rank": i + 1, **c.levers, "seeds": ",".join(str(v) for v in seeds),
               "ok": f"{len(c.finished)}/{len(c.members)}", "best_member": c.best.name if c.best else None}
        for column in aggregated:
            stat = c.stat(column)
            row[column] = stat.text()
            row.update({f"{column}_mean": stat.mean, f"{column}_sd": stat.sd, f"{column}_n": stat.n,
                        f"{column}_ci95_low": stat.ci95[0] if stat.ci95 else None,
                        f"{column}_ci95_high": stat.ci95[1] if stat.ci95 else None})
        out.append(row)
    return columns, out, numeric


def config_table(configs: list[Configuration], members: list[Member], markdown: bool = False) -> str:
    columns, data, _ = config_rows(configs, members)
    return render(columns, data, markdown)


# -- figures --------------------------------------------------------------------------------------

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
    """A member's levers other than lr, momentum and the seed as one label (e.g. "mse,
    image_size=72"): the heat map's panels and the loss curves' colours, so members that differ
    in more than lr and momentum never share a cell or a colour (and the seeds of one
    configuration always do)."""
    levers = [k for k in varying_hparams(members) if k not in ("lr", "momentum", SEED)] or ["loss"]
    if len(levers) > 2:  # too many to spell out: the member's own levers, seed left out
        return lambda m: ", ".join(f"{k}={m.hparams.get(k)}" for k in levers)
    return lambda m: ", ".join(f"{m.hparams.get(k)}" if k == "loss" else f"{k}={m.hparams.get(k)}" for k in levers)


def _g(value) -> str:
    """A lever's value on an axis: 0.01, or as written when it is not a number (a failed run's)."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _levels(values) -> list:
    """A lever's distinct values in order, numbers first (a failed run may hold one as text)."""
    return sorted(set(values), key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))


MAX_GRID_VALUES = 8  # lr or momentum values beyond which the lr x momentum figures are unreadable


def is_grid(members: list[Member]) -> bool:
    """True when lr and momentum each take a few values (a grid sweep), so that one heat-map
    cell or loss-curve panel per (lr, momentum) is readable; an Optuna search draws a new lr
    for every member."""
    return all(len({m.hparams.get(k) for m in members}) <= MAX_GRID_VALUES for k in ("lr", "momentum"))


def heatmap_figure(members: list[Member]):
    """Best val AUC over lr x momentum, one panel per setting of the other levers (per loss in
    a loss x lr x momentum sweep), the mean over a cell's seeds (± their sd, and how many);
    diverged/failed cells say so."""
    import matplotlib.pyplot as plt

    members = [m for m in members if m.status != "unreadable"]
    setting = setting_of(members)
    panels = sorted({setting(m) for m in members})
    lrs = _levels(m.hparams["lr"] for m in members)
    moms = _levels(m.hparams["momentum"] for m in members)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * len(lrs) * len(panels), 1.2 + 0.8 * len(moms)),
                             dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        grid = np.full((len(moms), len(lrs)), np.nan)
        cells: dict[tuple[int, int], list[Member]] = {}
        for m in members:
            if setting(m) == panel:
                cells.setdefault((moms.index(m.hparams["momentum"]), lrs.index(m.hparams["lr"])), []).append(m)
        labels = [["" for _ in lrs] for _ in moms]
        for (i, j), here in cells.items():
            stat = seed_stat([m.best_val_auc for m in here])
            if stat.mean is not None:
                grid[i, j] = stat.mean
            text = "" if stat.mean is None else f"{stat.mean:.3f}" + (
                f"\n±{stat.sd:.3f} n={stat.n}" if stat.sd is not None else "")
            statuses = sorted({m.status for m in here} - {"ok"})
            labels[i][j] = text + ("\n" + ",".join(statuses) if statuses else "")
        image = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
        for i in range(len(moms)):
            for j in range(len(lrs)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8,
                        color="white" if np.isnan(grid[i, j]) or grid[i, j] < 0.8 else "black")
        ax.set_xticks(range(len(lrs)), [_g(v) for v in lrs])
        ax.set_yticks(range(len(moms)), [_g(v) for v in moms])
        ax.set_xlabel("lr")
        if ax is axes[0][0]:
            ax.set_ylabel("momentum")
        ax.set_title(f"{panel}: best val AUC", fontsize=9)
        ax.set_facecolor("#444444")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return fig


def curves_figure(members: list[Member]):
    """Training-loss curves, one panel per (lr, momentum), the members' other levers overlaid
    (one colour per setting, e.g. per loss; see setting_of): each member a line, its seeds in
    the same colour."""
    import matplotlib.pyplot as plt

    members = [m for m in members if m.status != "unreadable"]
    lrs = _levels(m.hparams["lr"] for m in members)
    moms = _levels(m.hparams["momentum"] for m in members)
    fig, axes = plt.subplots(len(moms), len(lrs), figsize=(4.0 * len(lrs), 3.0 * len(moms)),
                             dpi=100, squeeze=False, sharex=True)
    setting = setting_of(members)
    settings = sorted({setting(m) for m in members})
    limits: dict[int, tuple[float, float]] = {}  # per panel: a blow-up spike must not flatten the rest
    labelled: set = set()
    for m in members:
        ax = axes[moms.index(m.hparams["momentum"])][lrs.index(m.hparams["lr"])]
        steps, loss = train_loss_curve(m)
        window = max(1, min(len(loss), len(loss) // 25))  # light smoothing: a moving average
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) else loss
        label = setting(m) + ("" if m.status == "ok" else f" ({m.status})")
        # one colour per setting in every panel; a member without a curve still gets its legend entry;
        # a setting's other seeds add no second entry
        shown = label if (id(ax), label) not in labelled else "_nolegend_"
        labelled.add((id(ax), label))
        ax.plot(steps[window - 1:] if len(loss) else [], smooth, lw=1.5, label=shown,
                color=f"C{settings.index(setting(m)) % 10}")
        if len(smooth):
            lo, hi = limits.get(id(ax), (np.inf, -np.inf))
            limits[id(ax)] = (min(lo, 0.9 * float(np.percentile(smooth, 1))),
                              max(hi, 1.2 * float(np.percentile(smooth, 95))))
    for i, mom in enumerate(moms):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            ax.set_title(f"lr={_g(lr)}, momentum={_g(mom)}", fontsize=9)
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
    point per member: how much validation says about new patients. With seeds, a configuration's
    members share a colour and its mean (± sd) is a cross."""
    import matplotlib.pyplot as plt

    done = [(i + 1, m) for i, m in enumerate(members)
            if m.values().get(f"{split}_auc") is not None and m.best_val_auc is not None]
    configs = configurations([m for _, m in done]) if done else []
    grouped = any(len(c.members) > 1 for c in configs)
    colour = {id(m): f"C{k % 10}" if grouped else "C0" for k, c in enumerate(configs) for m in c.members}
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
    x = [m.best_val_auc for _, m in done]
    for ax, metric in zip(axes, ("auc", "specificity")):
        y = [m.values().get(f"{split}_{metric}") for _, m in done]
        y = [np.nan if v is None else v for v in y]  # (no overall specificity with more classes)
        ax.scatter(x, y, s=30, color=[colour[id(m)] for _, m in done])
        for (number, _), xi, yi in zip(done, x, y):
            ax.annotate(str(number), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if grouped:
            for k, c in enumerate(configs):
                sx, sy = c.stat("best_val_auc"), c.stat(f"{split}_{metric}")
                if sx.mean is not None and sy.mean is not None:
                    ax.errorbar(sx.mean, sy.mean, xerr=sx.sd or 0, yerr=sy.sd or 0, fmt="x", ms=9, lw=1,
                                color=f"C{k % 10}", label=f"#{k + 1} {c.label}"[:40] if k < 10 else "_nolegend_")
        ax.set_xlabel("best val AUC (chooses the checkpoint)")
        ax.set_ylabel(f"{split} {metric}" + (" at the val-chosen threshold" if metric != "auc" else ""))
        ax.grid(alpha=0.3)
    if grouped:
        axes[0].legend(fontsize=6, title="configuration: mean ± sd", title_fontsize=6)
    axes[0].set_title(f"val vs {split}: AUC", fontsize=10)
    axes[1].set_title(f"val AUC vs {split} specificity", fontsize=10)
    fig.suptitle("numbers = rank in report.md", fontsize=8)
    fig.tight_layout()
    return fig


def seeds_figure(configs: list[Configuration], columns: Sequence[str]):
    """One panel per column: the configurations in rank order, each member a point, the mean and
    its t-interval 95 % CI as a bar."""
    import matplotlib.pyplot as plt

    shown = configs[:30]  # (a longer sweep: the 30 best)
    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 0.45 * len(shown) + 1.5) * len(columns) / 1.6, 3.8),
                             dpi=100, squeeze=False)
    rng = np.random.default_rng(0)  # a fixed jitter: the same figure every time
    for ax, column in zip(axes[0], columns):
        for k, c in enumerate(shown):
            values = [m.values().get(column) for m in c.finished]
            values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            ax.scatter(k + 0.85 + rng.uniform(-0.1, 0.1, len(values)), values, s=18, color="C0", alpha=0.8, zorder=3)
            stat = c.stat(column)
            if stat.mean is not None:
                err = [[stat.mean - stat.ci95[0]], [stat.ci95[1] - stat.mean]] if stat.ci95 else None
                ax.errorbar(k + 1.15, stat.mean, yerr=err, fmt="_", ms=12, color="C3", lw=1.5, capsize=3, zorder=2)
        ax.set_xticks(range(1, len(shown) + 1), [str(k) for k in range(1, len(shown) + 1)])
        ax.set_xlim(0.5, len(shown) + 0.5)
        ax.set_xlabel("configuration (rank)")
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("members (blue), mean and 95 % CI (red)")
    fig.tight_layout()
    return fig


# -- the best model: export with its card ---------------------------------------------------------

@dataclass
class Choice:
    """What the export takes: the best configuration by its mean best val AUC over seeds, its
    best member, and the members exported (the winner, or with ensemble all of its seeds)."""
    eligible: list[Member]
    configuration: Configuration
    winner: Member
    exported: list[Member]

    @property
    def value(self) -> float:
        return self.configuration.stat("best_val_auc").mean

    def record(self, ensemble: bool) -> dict:
        stat = self.configuration.stat("best_val_auc")
        return {"by": "mean best val AUC over the configuration's seeds", "value": stat.mean, "sd": stat.sd,
                "ci95": list(stat.ci95) if stat.ci95 else None, "seeds": stat.n,
                "configuration": self.configuration.levers, "ensemble": ensemble,
                "members": [str(m.path) for m in self.exported]}


def choose(members: list[Member], ensemble: bool = False) -> Optional[Choice]:
    """The export's choice among the finished members with a checkpoint (None: none yet);
    refuses (one line) a sweep of several tasks and an ensemble of one."""
    eligible = [m for m in rank(members, "best_val_auc") if m.status == "ok" and m.best_val_auc is not None
                and not math.isnan(m.best_val_auc) and m.checkpoint.exists()]
    if not eligible:
        return None
    tasks = sorted({m.hparams.get("task", "binary") for m in eligible})
    if len(tasks) > 1:  # a 3-class macro AUC and a two-class AUC do not rank one another
        raise XrayError(f"best: the members train different tasks ({', '.join(tasks)}), whose val AUCs do "
                        "not compare; sweep one task at a time, or report with --no-best")
    best = configurations(eligible, "best_val_auc")[0]
    if ensemble and len(best.finished) < 2:
        raise XrayError(f"--ensemble: the best configuration ({best.label}) has {len(best.finished)} finished "
                        "member; an ensemble needs its seeds (sweep seed=1,2,3 or +sweep=seeds), or drop --ensemble")
    return Choice(eligible, best, best.best, best.finished if ensemble else [best.best])


def export_best(members: list[Member], best_root: Path, force: bool = False,
                top_k: int = 1, ensemble: bool = False) -> Optional[Path]:
    """Copy the best member of the best configuration (by mean best val AUC over its seeds; with
    one member per configuration, the member with the best val AUC) into
    <best_root>/<sweep name>/ with a MindIR export; with `ensemble`, all of that configuration's
    members too, as members/1..K (`xray.evaluate ckpt=<folder> top_k=K`). Then calibrate it on
    val, evaluate it on val and the other eval splits, and write its model card and ONNX file
    (export_deliverables). top_k copies the top_k members by val AUC into members/1..top_k/
    (not with ensemble). An existing folder is only replaced by a better choice (or with force).
    Returns the folder if written."""
    if ensemble and top_k > 1:
        raise XrayError("--ensemble exports the best configuration's seeds as members/1..K; it does not "
                        "combine with --top-k")
    choice = choose(members, ensemble)
    if choice is None:
        log.info("best: no finished member with a checkpoint yet")
        return None
    winner, task = choice.winner, choice.winner.hparams.get("task", "binary")
    if top_k > len(choice.eligible):
        raise XrayError(f"--top-k {top_k}: only {len(choice.eligible)} members finished with a checkpoint")
    target = Path(best_root) / winner.sweep_name
    current_value = -1.0
    if (target / "metrics.json").exists() and not force:
        current = json.loads((target / "metrics.json").read_text())
        current_value = ((current.get("selection") or {}).get("value")
                         or (current.get("best_val") or {}).get("auc") or -1.0)
        current_task = (current.get("hparams") or {}).get("task", "binary")
        if current_task != task:
            raise XrayError(f"best: {target} holds a task={current_task} model, this sweep trains "
                            f"task={task}; give the sweep its own sweep_name, or --force to replace it")
    written = False
    if choice.value > current_value:
        with atomic_dir(target) as tmp:
            copy_member(winner, tmp, choice.record(ensemble))
            cfg = OmegaConf.load(tmp / "config.yaml")
            manifest = Path(cfg.data.dir) / "manifest.json"
            if manifest.exists():
                shutil.copy2(manifest, tmp / "manifest.json")
            export_mindir(tmp / "best.ckpt", tmp / "model.mindir")  # (an older members/ goes with it)
            calibrate_export(tmp / "best.ckpt")
            checkpoints = [tmp / "best.ckpt"]
            if ensemble:
                checkpoints = []
                for i, member in enumerate(choice.exported, start=1):
                    copy_member(member, tmp / "members" / str(i))
                    calibrate_export(tmp / "members" / str(i) / "best.ckpt")
                    checkpoints.append(tmp / "members" / str(i) / "best.ckpt")
            export_deliverables(tmp, target, checkpoints, cfg, winner)
        written = True
        what = (f"{len(choice.exported)} seeds of {choice.configuration.label}" if ensemble else winner.name)
        log.info("best: %s (mean val AUC %.4f over %d seed(s); member val AUC %.4f) -> %s", what, choice.value,
                 choice.configuration.stat("best_val_auc").n, winner.best_val_auc, target)
    else:
        log.info("best: %s keeps its model (val AUC %.4f >= %.4f of %s); --force replaces it",
                 target, current_value, choice.value, choice.configuration.label)
    if top_k > 1:  # (re)written whenever asked for: the sweep's top_k by val AUC
        with atomic_dir(target / "members") as tmp:
            for i, member in enumerate(choice.eligible[:top_k], start=1):
                copy_member(member, tmp / str(i))
        log.info("best: top %d members by val AUC -> %s/members/1..%d", top_k, target, top_k)
    return target if written or top_k > 1 else None


CARD_EXPLAIN = 3  # Grad-CAM images per row of the exported model's gallery (evaluate explain=N)


def export_deliverables(folder: Path, target: Path, checkpoints: list[Path], cfg, winner: Member) -> None:
    """The exported model (one checkpoint, or an ensemble's members) evaluated on val and on the
    other eval splits of its run (through its temperature: calibrate first), its model card
    and its ONNX file(s), all in `folder` (the temp folder that becomes `target`). A data set
    that is gone costs the evaluation (the card then shows the member's own results), a missing
    onnx package the ONNX file: each a warning."""
    from xray.card import write_model_card

    results, source = evaluate_export(folder, checkpoints, cfg), folder
    if not results:
        results, source = dict(winner.evals), winner.path
        log.warning("best: the card shows %s's own evaluation (as trained, no temperature)", winner.name)
    if results:
        write_model_card(source, [Path(c) for c in checkpoints] if source == folder else [winner.checkpoint],
                         results, out_dir=folder)
    else:
        log.warning("best: no evaluation of %s at all: no model card", winner.name)
    onnx_targets = [folder / "best.ckpt"] + ([Path(c) for c in checkpoints] if len(checkpoints) > 1 else [])
    for checkpoint in onnx_targets:
        export_onnx_beside(checkpoint, target)
    retarget(folder, target)


def evaluate_export(folder: Path, checkpoints: list[Path], cfg) -> dict:
    """{split: eval result} of the exported model on val and then on each other split of its
    run's train.eval_splits that its data set has (thresholds chosen on val); {} with a warning
    when it cannot be evaluated (e.g. its data set is gone)."""
    from xray.evaluate import chosen_thresholds, evaluate

    wanted = list(OmegaConf.select(cfg, "train.eval_splits", default=None) or ["val", "test"])
    splits = ["val"] + [s for s in wanted if s != "val"]
    options = dict(batch_size=int(OmegaConf.select(cfg, "batch_size", default=64)),
                   bootstrap=int(OmegaConf.select(cfg, "train.eval_bootstrap", default=1000)),
                   workers=int(OmegaConf.select(cfg, "data.workers", default=2)), out_dir=folder)
    results: dict = {}
    try:
        manifest = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
        present = [s for s in splits if (manifest.get("splits", {}).get(s) or {}).get("file")]
        if "val" not in present:
            raise XrayError(f"{cfg.data.dir} has no val split to choose the threshold on")
        thresholds = None
        for split in present:
            explain = CARD_EXPLAIN if split != "val" and len(checkpoints) == 1 else 0
            results[split] = evaluate(checkpoints, split, val_thresholds=thresholds, explain=explain, **options)
            if split == "val":
                thresholds = chosen_thresholds(results[split])
    except (XrayError, OSError, ValueError) as e:
        log.warning("best: the exported model was not evaluated (%s)", _first_line(e))
        return {}
    return results


def export_onnx_beside(checkpoint: Path, target: Path) -> None:
    """model.onnx beside the checkpoint (xray.export, after its calibration: the temperature is
    in its metadata); without the onnx packages a warning, not a failure."""
    from xray.export import export_onnx

    try:
        export_onnx(checkpoint, checkpoint.parent / "model.onnx")
    except XrayError as e:
        log.warning("best: no ONNX export of %s (%s)", checkpoint.name, e)


def retarget(folder: Path, target: Path) -> None:
    """The results written in the temp folder name it: name the folder it becomes instead (JSON,
    markdown, HTML, and the ONNX files' `checkpoint` metadata)."""
    old, new = str(folder), str(target)
    for path in [*folder.glob("*"), *folder.glob("members/*/*")]:
        if path.suffix in (".json", ".md", ".html") and path.is_file():
            text = path.read_text()
            if old in text or folder.name in text:
                write_text(path, text.replace(old, new).replace(folder.name, target.name))
        elif path.suffix == ".onnx":
            try:
                import onnx
            except ImportError:
                continue
            proto = onnx.load(str(path))
            for entry in proto.metadata_props:
                entry.value = entry.value.replace(old, new)
            onnx.save(proto, str(path))


def calibrate_export(checkpoint: Path) -> None:
    """Temperature scaling fitted on val, stored beside the exported checkpoint; a data set
    that is gone only costs the calibration."""
    from xray.evaluate import calibrate_checkpoint

    try:
        calibrate_checkpoint(checkpoint)
    except XrayError as e:
        log.warning("best: not calibrated (%s)", e)


def copy_member(member: Member, folder: Path, selection: Optional[dict] = None) -> None:
    """best.ckpt (a hard link where the file system allows: no second copy of 230 MB) with its
    best.json, config.yaml and metrics.json (with the member it came from, and how it was
    chosen) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    link_or_copy(member.checkpoint, folder / "best.ckpt")
    for source, name in ((member.checkpoint.with_suffix(".json"), "best.json"),  # its sha256 and identity
                         (member.path / "train_images.txt", "train_images.txt")):  # what evaluate checks leaks against
        if source.is_file():
            shutil.copy2(source, folder / name)
    shutil.copy2(member.path / "config.yaml", folder / "config.yaml")
    write_json(folder / "metrics.json", {**member.metrics, "source": str(member.path),
                                         **({"selection": selection} if selection else {})})


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


# -- the sweep's page and its members' cards ------------------------------------------------------

CARDS = "cards"  # <sweep>/cards/<member>.html: the members' model cards


def write_member_cards(members: list[Member], sweep_dir: Path) -> dict[str, str]:
    """A model card of each finished, evaluated member into <sweep>/cards/<member>.{html,md}
    (its own folder is left as training wrote it); an existing card newer than the member's
    results is kept. No MindSpore: a member's Grad-CAM gallery is its own cam_errors_<split>.png.
    Returns {member name: the card's link relative to the sweep folder}."""
    from urllib.parse import quote

    from xray.card import write_model_card

    out = Path(sweep_dir) / CARDS
    links = {}
    for m in members:
        if m.status != "ok" or not m.evals:
            continue
        page = out / f"{m.name}.html"
        inputs = [p for pattern in ("metrics.json", "config.yaml", "calibration.json", "eval_*.json",
                                    "predictions_*.csv", "cam_errors_*.png") for p in m.path.glob(pattern)]
        newest = max((p.stat().st_mtime for p in inputs), default=0.0)
        if not (page.is_file() and page.stat().st_mtime >= newest and page.with_suffix(".md").is_file()):
            try:
                write_model_card(m.path, [m.checkpoint], m.evals, out_dir=out, name=m.name, gallery=False)
            except Exception as e:  # noqa: BLE001 - one member's odd files must not cost the report
                log.warning("report: no model card for %s (%s: %s)", m.name, type(e).__name__, _first_line(e))
                continue
        links[m.name] = f"{CARDS}/{quote(m.name)}.html"
    return links


def sweep_page(sweep_dir: Path, members: list[Member], rank_by: str, card_links: dict[str, str],
               best: Optional[Path] = None) -> Path:
    """report.html: the sweep on one self-contained page (figures embedded): the configurations
    ranked over seeds, the members with links to their cards, the unreadable ones and why, the
    heat map, loss curves and val vs test figures the report drew."""
    from xray.card import Figure, Link, Section, Table, to_html

    sweep_dir = Path(sweep_dir)
    counts = status_counts(members)
    summary = [f"{len(members)} members: {counts} (ranked by {rank_by}). Folder: {sweep_dir}."]
    if best is not None:
        card = best / "model_card.html"
        if card.is_file():
            summary.append(Link(f"The exported best model's card ({best})", os.path.relpath(card, sweep_dir)))
        else:
            summary.append(f"The best model is exported to {best}.")
    if not seeds_vary(members) and sum(m.status != "unreadable" for m in members) > 1:
        summary.append(ONE_SEED_NOTE)
    sections = [Section("summary", summary, "Summary")]
    if seeds_vary(members):
        configs = configurations(members, rank_by)
        columns, data, _ = config_rows(configs, members)
        blocks: list = [Table(columns, [[_fmt(r.get(c)) for c in columns] for r in data],
                              f"members that differ only by seed, ranked by the mean of {rank_by}; "
                              "mean ± sd (95 % t-interval CI) over the finished seeds")]
        if (sweep_dir / "seeds.png").is_file():
            blocks.append(Figure("each member a point; the mean and its CI in red", (sweep_dir / "seeds.png").read_bytes()))
        sections.append(Section("configurations", blocks, "Configurations over seeds"))
    columns, data = rows(members, rank_by)
    columns = [c for c in columns if c != "checkpoint"]
    columns.insert(columns.index("member") + 1, "card")
    table_rows = [[(Link("card", card_links[r["member"]]) if r["member"] in card_links else None) if c == "card"
                   else _fmt(r.get(c)) for c in columns] for r in data]
    sections.append(Section("members", [Table(columns, table_rows, "every member, ranked by " + rank_by)], "Members"))
    unreadable = [(m.name, m.reason) for m in members if m.status == "unreadable"]
    if unreadable:
        sections.append(Section("unreadable", [Table(["member", "reason"], [list(u) for u in unreadable],
                                                     "members whose files cannot be read: not ranked, not exported")],
                                "Unreadable members"))
    figures = [Figure(title, (sweep_dir / name).read_bytes()) for name, title in (
        ("heatmap_auc.png", "best val AUC over lr x momentum"), ("loss_curves.png", "training loss"),
        *[(p.name, p.stem.replace("_", " ")) for p in sorted(sweep_dir.glob("val_vs_*.png"))]) if (sweep_dir / name).is_file()]
    sections.append(Section("figures", figures or ["No figures (no member finished with a grid of lr x momentum)."],
                            "Figures"))
    page = sweep_dir / "report.html"
    write_text(page, to_html(f"Sweep {sweep_dir.name}", sections))
    return page


# what docs/results/ranking.md found: no val signal measurably tracks the test half across runs
ONE_SEED_NOTE = ("One seed per configuration: across this project's runs no validation signal tracked the "
                 "test half measurably (docs/results/ranking.md), so this order is close to a random pick "
                 "for new patients; sweep seeds too (+sweep=seeds or seed=1,2,3) and rank configurations "
                 "by their mean.")


def status_counts(members: list[Member]) -> str:
    counts = {s: sum(m.status == s for m in members) for s in ("ok", "diverged", "failed", "unfinished", "unreadable")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def report(sweep_dir: Path, best_root: Optional[Path] = Path("outputs/best"), force: bool = False,
           out=None, rank_by: str = "best_val_auc", top_k: int = 1, ensemble: bool = False,
           cards: bool = True) -> list[Member]:
    """Print the ranking (by `rank_by`; with seeds, the configurations ranked by their mean too),
    write report.{csv,md,html} (and report_seeds.csv), the plots and the members' model cards
    into the sweep folder, and export the best configuration by mean val AUC (its best member,
    or with `ensemble` all its seeds), whatever the ranking shown (unless best_root is None):
    the product chooses on validation only."""
    from xray.plots import save_figure

    if ensemble and top_k > 1:
        raise XrayError("--ensemble exports the best configuration's seeds as members/1..K; it does not "
                        "combine with --top-k")
    out = out or sys.stdout
    sweep_dir = Path(sweep_dir)
    members = collect(sweep_dir, rank_by)
    text = table(members, rank_by=rank_by)
    out.write(text)
    for line in unreadable_lines(members):
        out.write(line + "\n")
    out.write(f"{status_counts(members)} (ranked by {rank_by})\n")
    markdown = f"# Sweep {sweep_dir.name}\n\nRanked by {rank_by}.\n\n" + table(members, markdown=True, rank_by=rank_by)
    if unreadable_lines(members):
        markdown += "\n" + "".join(f"- {line}\n" for line in unreadable_lines(members))
    write_csv(members, sweep_dir / "report.csv", rank_by)
    readable = [m for m in members if m.status != "unreadable"]
    if seeds_vary(members):
        configs = configurations(members, rank_by)
        out.write(f"\nconfigurations over seeds, ranked by the mean of {rank_by} (mean ± sd (95 % CI)):\n")
        out.write(config_table(configs, members))
        markdown += (f"\n## Configurations over seeds\n\nRanked by the mean of {rank_by}; mean ± sd (95 % t-interval "
                     "CI) over each configuration's finished seeds.\n\n" + config_table(configs, members, markdown=True))
        _, data, numeric = config_rows(configs, members)
        _write_csv(numeric, data, sweep_dir / "report_seeds.csv")
        save_figure(seeds_figure(configs, aggregated_columns(members)), sweep_dir / "seeds.png")
    elif len(readable) > 1:
        out.write(ONE_SEED_NOTE + "\n")
        markdown += f"\n{ONE_SEED_NOTE}\n"
    write_text(sweep_dir / "report.md", markdown)
    if readable and is_grid(readable):
        if {"lr", "momentum"} & set(varying_hparams(readable)):
            save_figure(heatmap_figure(readable), sweep_dir / "heatmap_auc.png")
        save_figure(curves_figure(readable), sweep_dir / "loss_curves.png")
    elif readable:
        log.info("report: lr and momentum take more than %d values (a search, not a grid): no "
                 "heat map or loss-curve grid; read the table and TensorBoard", MAX_GRID_VALUES)
    for split in eval_splits(members):
        if split != "val":
            save_figure(val_vs_split_figure(members, split), sweep_dir / f"val_vs_{split}.png")
    links = write_member_cards(members, sweep_dir) if cards else {}
    sweep_page(sweep_dir, members, rank_by, links)
    if best_root is not None:
        choice = choose(members, ensemble)  # (an ensemble of one is refused before MindSpore starts)
        from xray.device import setup_device

        setup_device("CPU")
        best = export_best(members, best_root, force, top_k, ensemble)
        target = best or (Path(best_root) / choice.winner.sweep_name if choice else None)
        if target is not None and target.is_dir():
            sweep_page(sweep_dir, members, rank_by, links, target)
    log.info("report: %s", sweep_dir / "report.html")
    return members


# -- compare: named runs side by side ------------------------------------------------------------

def natural_key(path: Path) -> list:
    """Sorts 2_run before 10_run: run folders are often numbered in the order trained."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def run_folders(patterns: Sequence[str], option: str = "--compare") -> list[Path]:
    """The folders named, or matched by globs (in natural order), in the order given, each once
    (`option`: the command-line option that named them, for the errors)."""
    folders: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = sorted((Path(p) for p in glob.glob(pattern) if Path(p).is_dir()), key=natural_key)
            if not matched:
                raise XrayError(f"{option} {pattern} matches no folder; check the path (and quote a glob, "
                                "e.g. 'outputs/runs/*', so the shell leaves it to the report)")
        elif Path(pattern).is_dir():
            matched = [Path(pattern)]
        else:
            raise XrayError(f"{option} {pattern}: no such folder; pass run folders (with eval_<split>.json, "
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
        chosen = f"{at_val['threshold']:.3f} ({short_rule(at_val['rule'])})"
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
        return read_predictions_csv(path, classes)
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

# -- cost: what a run spent to reach a val target -------------------------------------------------

def cost_to_target(folder: Path, target: float) -> dict:
    """The first epoch whose val AUC reached `target` (history.jsonl), the training images seen
    and the training minutes (the epochs' time_s: validation and evaluation left out) until then;
    epoch None when the run never reached it."""
    try:
        history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]
        cfg = OmegaConf.load(folder / "config.yaml")
        images = sum(1 for line in (folder / "train_images.txt").read_text().splitlines() if line.strip())
    except (OSError, ValueError) as e:
        raise XrayError(f"--val-target: {folder} cannot be read ({type(e).__name__}: {_first_line(e)}); "
                        "pass training run folders (history.jsonl, config.yaml, train_images.txt)") from None
    steps = images // int(cfg.batch_size)
    cap = OmegaConf.select(cfg, "train.max_steps_per_epoch")
    per_epoch = (min(steps, int(cap)) if cap else steps) * int(cfg.batch_size)
    reached = next((h for h in history if (h.get("val_auc") or 0) >= target), None)
    epoch = reached["epoch"] if reached else None
    minutes = sum(h.get("time_s") or 0 for h in history if epoch and h["epoch"] <= epoch) / 60
    return {"run": str(folder), "val_target": target, "epoch": epoch, "images": epoch * per_epoch if epoch else None,
            "train_min": round(minutes, 1) if epoch else None,
            "best_val_auc": max((h.get("val_auc") or 0 for h in history), default=None)}


def costs(patterns: Sequence[str], target: float, markdown: bool = False, out=None) -> list[dict]:
    """Print cost_to_target of every run named or globbed by `patterns`."""
    folders = [f for f in run_folders(patterns) if (f / "history.jsonl").is_file() and (f / "config.yaml").is_file()]
    if not folders:
        raise XrayError("--val-target: no run folder with history.jsonl and config.yaml among those given")
    rows = [cost_to_target(f, target) for f in folders]
    names = short_names([Path(r["run"]) for r in rows])
    for r in rows:
        r["run"] = names[Path(r["run"])]
    (out or sys.stdout).write(render(list(rows[0]), rows, markdown))
    return rows


def paired_comparison(candidates: Sequence[str], baselines: Sequence[str], splits: Sequence[str] = ("test",),
                      markdown: bool = False, out=None) -> dict[str, list[dict]]:
    """Print the paired comparison (xray.paired) of the runs `candidates` name or glob against
    those `baselines` do, seed by seed, on each of `splits`."""
    from xray.paired import cells, note, paired

    out = out or sys.stdout
    results = {}
    for split in splits:
        rows = paired(run_folders(candidates), run_folders(baselines, "--baseline"), split)
        out.write(render(list(cells(rows)[0]), cells(rows), markdown) + note(rows, split))
        results[split] = rows
    return results


# -- signals: which val signal tracks the held-out figures ---------------------------------------

def signal_points(folders: Sequence[Path]) -> list[RunPoint]:
    """The study's runs: every folder with a screening decision evaluated on val and test."""
    members = [read_member(f) for f in folders if (f / ".hydra" / "config.yaml").is_file()]
    members = [m for m in members if m.status == "ok" and {"val", "test"} <= set(m.evals)]
    levers = [k for k in varying_hparams(members) if k != SEED]
    points = []
    for m in members:
        signals, targets = m.val_signals, held_out(m.evals["test"])
        if signals and targets["auc"] is not None:
            label = ", ".join(f"{k}={m.hparams.get(k)}" for k in levers) or "one configuration"
            points.append(RunPoint(m.name, label, signals, targets))
    return points


def signals(patterns: Sequence[str], figure: Optional[Path] = None, markdown: bool = False, out=None) -> list[dict]:
    """Print Spearman's rho (permutation p-value; a 95 % CI from 10 runs on) of every val signal
    against every held-out figure, across the runs named or globbed by `patterns` and across
    their configurations' seed means; draw one panel per pair into `figure`."""
    from xray.plots import save_figure

    points = signal_points(run_folders(patterns, "--signals"))
    if len(points) < 3:
        raise XrayError(f"--signals: {len(points)} finished runs with eval_val.json and eval_test.json of a "
                        "screening decision in the folders given; the study needs at least 3")
    rows = study(points)
    fmt = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
    cells = [{"level": r["level"], "signal": r["signal"], "held-out": r["target"], "n": r["n"],
              "rho (better by signal)": fmt(r["rho"]), "p": "-" if r["p"] is None else f"{r['p']:.3f}",
              "95 % CI": "-" if r["ci95"][0] is None else f"{fmt(r['ci95'][0])} to {fmt(r['ci95'][1])}"} for r in rows]
    (out or sys.stdout).write(render(list(cells[0]), cells, markdown))
    if figure is not None:
        save_figure(study_figure(points), figure)
        log.info("signals: -> %s", figure)
    return rows


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
                             "always takes the best configuration by mean val AUC over its seeds")
    parser.add_argument("--top-k", type=int, default=1,
                        help="also copy the K best members by val AUC into <best>/members/1..K")
    parser.add_argument("--ensemble", action="store_true",
                        help="export the best configuration's seeds together (<best>/members/1..K, evaluated "
                             "and carded as one ensemble) instead of its best member")
    parser.add_argument("--no-cards", action="store_true",
                        help="write no model card per member (<sweep>/cards/); report.html then links none")
    compare_options = parser.add_argument_group("compare runs (instead of a sweep)")
    compare_options.add_argument("--compare", nargs="+", metavar="RUN_OR_GLOB",
                                 help="run folders or quoted globs of them, e.g. 'outputs/subtype_cpu/*'")
    compare_options.add_argument("--splits", default="test", help="comma-separated splits (default test); "
                                 "a file tag works too, e.g. test_tta4")
    compare_options.add_argument("--decisions", help="comma-separated decisions to keep, e.g. "
                                 "bacterial_vs_viral,argmax (default all)")
    compare_options.add_argument("--figure", type=Path, help="also draw ROC curves and per-class sensitivities here")
    compare_options.add_argument("--markdown", action="store_true", help="print a markdown table")
    compare_options.add_argument("--val-target", type=float, metavar="AUC",
                                 help="with --compare: instead, the epochs, training images and minutes each run "
                                      "took until its val AUC first reached AUC (history.jsonl)")
    compare_options.add_argument("--baseline", nargs="+", metavar="RUN_OR_GLOB",
                                 help="with --compare: the runs of the recipe to compare against, paired with the "
                                      "--compare runs by seed: differences with patient-resampled CIs")
    compare_options.add_argument("--signals", nargs="+", metavar="RUN_OR_GLOB",
                                 help="which val signal tracks the test figures across these runs "
                                      "(Spearman's rho with CIs; --figure draws them)")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.sweep_dir, args.compare, args.signals)) != 1:
        parser.error("pass a sweep folder, or --compare RUN_OR_GLOB [...], or --signals RUN_OR_GLOB [...]")
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if (args.val_target is not None or args.baseline) and not args.compare:
        parser.error("--val-target and --baseline go with --compare RUN_OR_GLOB [...]")
    if args.val_target is not None and args.baseline:
        parser.error("--val-target and --baseline are two different reports; pass one of them")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.signals:
        signals(args.signals, args.figure, args.markdown)
        return
    if args.compare and args.val_target is not None:
        costs(args.compare, args.val_target, args.markdown)
        return
    if args.compare and args.baseline:
        paired_comparison(args.compare, args.baseline, args.splits.split(","), args.markdown)
        return
    if args.compare:
        compare(args.compare, args.splits.split(","), args.decisions.split(",") if args.decisions else None,
                args.figure, args.markdown)
        return
    report(args.sweep_dir, None if args.no_best else args.best_root, args.force, rank_by=args.rank_by,
           top_k=args.top_k, ensemble=args.ensemble, cards=not args.no_cards)


if __name__ == "__main__":
    main()
