"""Two recipes compared paired: the same seeds, the same images, one bootstrap for both.

    python -m xray.report --compare NEW_s42 NEW_s7 --baseline OLD_s42 OLD_s7 [--splits test] [--markdown]

Each run of `--compare` is paired with the `--baseline` run of the same `seed` (config.yaml).
Per two-class decision both runs answer (a binary model's own decision counts as pneumonia vs
normal, so a binary and a 3-class recipe compare on it), each run is read at its own threshold,
the one its eval_<split>.json chose before the split was seen (`at_val_threshold`), from its
predictions_<split>.csv. The difference candidate - baseline is averaged over the seed pairs; its
95 % CI resamples the split's patients (the same resample for every run, which is what pairing
buys: the images' own difficulty cancels out). The CI is over patients only: with two or three
seeds, how much another seed would move the difference is shown by the per-seed differences, not
by an interval.
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xray.errors import XrayError
from xray.hparams import AT_VAL_THRESHOLD, binary_results, read_eval, read_predictions_csv
from xray.labels import binary_decisions, decision_rows, parse_file_name
from xray.metrics import binary_metrics, resampler, roc_auc

METRICS = ("auc", "accuracy", "sensitivity", "specificity")
SCREENING = "pneumonia_vs_normal"  # a binary model's own decision is this one
RESAMPLES = 1000


@dataclass
class Read:
    """One run's two-class decision on a split: per image (sorted by file name) its target and p,
    and the threshold its rule chose before the split was seen."""

    run: Path
    seed: int
    names: np.ndarray
    y: np.ndarray
    p: np.ndarray
    threshold: float
    rule: str  # how that threshold was chosen (`rule` of at_val_threshold)

    def metrics(self, idx: np.ndarray) -> np.ndarray:
        y, p = self.y[idx], self.p[idx]
        at = binary_metrics(y, p, self.threshold)
        return np.array([roc_auc(y, p), *(at[m] for m in METRICS[1:])], dtype=float)


def read_decisions(run: Path, split: str, side: str) -> tuple[int, dict[str, Read]]:
    """(seed, {decision: Read}) of a run folder's evaluation on `split`; one line naming the
    option (`side`) and the folder when a file is missing or unreadable."""
    try:
        seed = int(OmegaConf.load(run / "config.yaml").seed)
        result = read_eval(run / f"eval_{split}.json")
        path = run / f"predictions_{split}.csv"
        labels, probs = read_predictions_csv(path, result["classes"])
        with open(path, newline="") as f:
            names = np.array([row["file_name"] for row in csv.DictReader(f)])
    except (OSError, KeyError, ValueError, TypeError, OmegaConfBaseException, XrayError) as e:
        raise XrayError(f"{side}: {run} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); pass "
                        f"training run folders evaluated on {split} (config.yaml with its seed, eval_{split}.json, "
                        f"predictions_{split}.csv)") from None
    blocks = binary_results(result)
    rows = decision_rows(result["task"], labels)
    out = {}
    for name, (y, p) in binary_decisions(result["task"], labels, probs).items():
        order = np.argsort(names[rows[name]], kind="stable")
        at = blocks[name][AT_VAL_THRESHOLD]
        out[SCREENING if name == "binary" else name] = Read(
            run, seed, names[rows[name]][order], np.asarray(y)[order], np.asarray(p)[order],
            float(at["threshold"]), str(at.get("rule")))
    return seed, out


def pairs_by_seed(candidates: Sequence[Path], baselines: Sequence[Path], split: str) -> list[tuple[dict, dict]]:
    """[(baseline's decisions, candidate's decisions)] matched by seed, in the baseline's order."""
    new_seeds, new = zip(*[read_decisions(r, split, "--compare") for r in candidates]) if candidates else ((), ())
    old_seeds, old = zip(*[read_decisions(r, split, "--baseline") for r in baselines]) if baselines else ((), ())
    new_seeds, old_seeds = list(new_seeds), list(old_seeds)
    for seeds, what in ((new_seeds, "--compare"), (old_seeds, "--baseline")):
        if len(set(seeds)) != len(seeds):
            raise XrayError(f"{what}: two runs share a seed ({seeds}); pass one run per seed")
    if not new_seeds or sorted(new_seeds) != sorted(old_seeds):
        raise XrayError(f"--compare seeds {sorted(new_seeds)} and --baseline seeds {sorted(old_seeds)} differ; "
                        "a paired comparison needs the same seeds on both sides")
    return [(o, new[new_seeds.index(s)]) for o, s in zip(old, old_seeds)]


def patients_of(names: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """Each image's patient, from its file name (the folder label: pneumonia for a positive of
    pneumonia vs normal and for every image of bacterial vs viral)."""
    folder = lambda t: "PNEUMONIA" if (t or name != SCREENING) else "NORMAL"  # noqa: E731
    return np.array([parse_file_name(n, folder(t))[1] for n, t in zip(names, y)])


def paired(candidates: Sequence[Path], baselines: Sequence[Path], split: str = "test",
           resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """One row per decision both sides answer and metric: the baseline's and the candidate's mean
    over seeds, their mean difference with a patient-resampled 95 % CI, and each seed's difference."""
    pairs = pairs_by_seed(candidates, baselines, split)
    shared = [n for n in pairs[0][0] if all(n in o and n in c for o, c in pairs)]
    if not shared:
        raise XrayError("--baseline: the runs share no two-class decision")
    rows = []
    for name in shared:
        reads = [r for pair in pairs for r in (pair[0][name], pair[1][name])]
        first = reads[0]
        for r in reads[1:]:
            if not np.array_equal(r.names, first.names) or not np.array_equal(r.y, first.y):
                raise XrayError(f"--baseline: {r.run} and {first.run} were evaluated on different {split} images "
                                f"({name}); a paired comparison needs the same images (the same data set)")
        everything = np.arange(len(first.y))
        point = np.array([[pair[1][name].metrics(everything), pair[0][name].metrics(everything)] for pair in pairs])
        draw = resampler(len(first.y), patients_of(first.names, first.y, name))
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(resamples):
            idx = draw(rng)
            samples.append(np.mean([pair[1][name].metrics(idx) - pair[0][name].metrics(idx) for pair in pairs], axis=0))
        with warnings.catch_warnings():  # a metric undefined in a resample (one class) stays nan
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(np.array(samples), [2.5, 97.5], axis=0)
        for i, metric in enumerate(METRICS):
            rows.append({"decision": name, "metric": metric, "baseline": point[:, 1, i].mean(),
                         "candidate": point[:, 0, i].mean(), "difference": point[:, 0, i].mean() - point[:, 1, i].mean(),
                         "ci95": [float(low[i]), float(high[i])],
                         "per_seed": {pair[1][name].seed: float(point[k, 0, i] - point[k, 1, i])
                                      for k, pair in enumerate(pairs)},
                         "images": int(len(first.y)),
                         "rule": rule_change(sorted({p[0][name].rule for p in pairs}), sorted({p[1][name].rule for p in pairs}))})
    return rows


def rule_change(old: list[str], new: list[str]) -> str:
    """How the two sides chose their thresholds: one rule, or `baseline's -> candidate's` when
    they differ (then part of the difference is the rule's, not the recipe's)."""
    return ", ".join(old) if old == new else f"{', '.join(old)} -> {', '.join(new)}"


def cells(rows: list[dict]) -> list[dict]:
    """The rows as table cells."""
    return [{"decision": r["decision"], "metric": r["metric"], "baseline": f"{r['baseline']:.3f}",
             "candidate": f"{r['candidate']:.3f}", "difference [95% CI]":
             f"{r['difference']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
             "per seed": ", ".join(f"{s}: {d:+.3f}" for s, d in r["per_seed"].items()),
             "threshold rule": r["rule"], "images": r["images"]} for r in rows]


def note(rows: list[dict], split: str, resamples: Optional[int] = RESAMPLES) -> str:
    seeds = len(rows[0]["per_seed"]) if rows else 0
    mixed = sorted({r["decision"] for r in rows if "->" in r["rule"]})
    return (f"\n{split}: means over {seeds} seed pair(s), each run at its own threshold chosen before the split was "
            f"seen; 95 % CIs of the difference from {resamples} resamples of the split's patients, the same for "
            "every run (seed-to-seed spread: the per-seed column, not the CI).\n"
            + (f"{', '.join(mixed)}: the two sides' thresholds come from different rules, so the differences at "
               "the threshold are partly the rule's (AUC is not).\n" if mixed else ""))
