"""A model card: one page that says what a trained model (or seed ensemble) is, how good it is,
on whom, and where it fails -- as model_card.md and as ONE self-contained model_card.html
(figures embedded as base64 PNG, no other file needed: it opens from a cluster file share).

    write_model_card(folder, checkpoints, {"val": eval_val, "test": eval_test})

`folder` holds what `xray.evaluate` wrote for those checkpoints (eval_<split>.json, whose
contents are `results`; predictions_<split>.csv, cam_errors_<split>.png, calibration.json),
beside the run's config.yaml and metrics.json (a run folder, or a best folder). The sections:
intended use and limits; data set and split (counts, patients, the data set's fingerprint);
metrics with their CIs on each split and the threshold rule; PPV and NPV at a stated prevalence;
ROC and confusion; calibration; subgroups; a Grad-CAM gallery of the most confident errors;
the recipe (the resolved config); provenance; caveats (the recipe's own `caveats`, and what the
card can tell from the results). Reading and drawing need no MindSpore; only a missing Grad-CAM
gallery is computed with it (gallery=True).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tabulate import tabulate

from xray.files import write_text
from xray.hparams import (ARGMAX, AT_HALF, AT_VAL_THRESHOLD, NO_RULE, PRIOR, binary_results, read_predictions_csv,
                          short_rule, with_current_keys)

log = logging.getLogger(__name__)

CARD_MD, CARD_HTML = "model_card.md", "model_card.html"
PREVALENCE = 0.10  # the stated prevalence of the PPV/NPV table (a clinic's, not the test half's)
GALLERY_IMAGES = 3  # per row of a computed Grad-CAM gallery
METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv")
POSITIVE = {"binary": "pneumonia", "pneumonia_vs_normal": "pneumonia", "bacterial_vs_viral": "bacterial"}
SECTIONS = {  # id -> title, in page order (the browser check looks for these ids)
    "summary": "Summary", "intended-use": "Intended use and limits", "caveats": "Caveats",
    "data": "Data set and split",
    "metrics": "Metrics", "prevalence": "PPV and NPV at a stated prevalence", "roc": "ROC and confusion",
    "calibration": "Calibration", "subgroups": "Subgroups", "gallery": "Grad-CAM: the most confident errors",
    "recipe": "Recipe", "provenance": "Provenance",
}
TASK_USE = {
    "binary": "tells a NORMAL chest X-ray from one with PNEUMONIA (bacterial or viral together); it gives "
              "p(pneumonia) and a yes/no call at the threshold chosen on validation",
    "subtype": "tells NORMAL, BACTERIAL and VIRAL pneumonia apart on a chest X-ray (argmax of three "
               "probabilities), and is read as pneumonia vs normal and bacterial vs viral",
    "bacterial_vs_viral": "tells BACTERIAL from VIRAL pneumonia on a chest X-ray already known to show "
                          "pneumonia (it was never shown a normal one)",
}


# -- the page's content, format-free --------------------------------------------------------------

@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Link:
    """A relative link (a table cell or a paragraph of its own)."""
    text: str
    href: str


@dataclass
class Figure:
    title: str
    png: bytes
    file: Optional[Path] = None  # the same figure as a file in the folder (the markdown links it)


@dataclass
class Section:
    id: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Table, Figure, ("pre", text), ("list", [..])
    title: Optional[str] = None  # (default: SECTIONS[id])

    @property
    def heading(self) -> str:
        return self.title or SECTIONS.get(self.id, self.id)


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: 0.912, 0.912 (0.880-0.940) for {value, ci95}, - for nothing."""
    if isinstance(value, Link):
        return value.text
    if isinstance(value, dict) and "value" in value:
        v, ci = value.get("value"), value.get("ci95")
        if not _finite(v):
            return "-"
        ok_ci = ci and len(ci) == 2 and all(_finite(c) for c in ci)
        return f"{v:.{digits}f}" + (f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ok_ci else "")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == 0 or 0.01 <= abs(value) < 1e4 else f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ppv_npv(sensitivity: float, specificity: float, prevalence: float) -> tuple[Optional[float], Optional[float]]:
    """(PPV, NPV) of a test with this sensitivity and specificity where `prevalence` of those
    tested have the condition (Bayes; None where undefined)."""
    s, c, p = float(sensitivity), float(specificity), float(prevalence)
    true_pos, false_pos = s * p, (1 - c) * (1 - p)
    true_neg, false_neg = c * (1 - p), (1 - s) * p
    ppv = true_pos / (true_pos + false_pos) if true_pos + false_pos > 0 else None
    npv = true_neg / (true_neg + false_neg) if true_neg + false_neg > 0 else None
    return ppv, npv


def at_prevalence(block: dict, prevalence: float) -> tuple[dict, dict]:
    """({value, ci95} of PPV, of NPV) at `prevalence` from a decision block's sensitivity and
    specificity; the range is that of the ends of their CIs (PPV and NPV grow with both), not a
    joint CI."""
    sens, spec = block.get("sensitivity") or {}, block.get("specificity") or {}
    if not (_finite(sens.get("value")) and _finite(spec.get("value"))):
        return {"value": None, "ci95": None}, {"value": None, "ci95": None}
    ppv, npv = ppv_npv(sens["value"], spec["value"], prevalence)
    s_ci, c_ci = sens.get("ci95"), spec.get("ci95")
    if s_ci and c_ci and all(_finite(v) for v in (*s_ci, *c_ci)):
        lo, hi = ppv_npv(s_ci[0], c_ci[0], prevalence), ppv_npv(s_ci[1], c_ci[1], prevalence)
        ci = [[lo[i], hi[i]] if None not in (lo[i], hi[i]) else None for i in (0, 1)]
    else:
        ci = [None, None]
    return {"value": ppv, "ci95": ci[0]}, {"value": npv, "ci95": ci[1]}


def subgroup_tables(subgroups: Any) -> list[Table]:
    """The `subgroups` of an eval result as tables, whatever its nesting: one table per top
    entry (e.g. per decision), a row per innermost entry (e.g. a subtype, a file-name family),
    labelled by its path below the top; the top entry's own scalars (threshold, rule) are the
    table's caption."""
    if isinstance(subgroups, list):
        subgroups = {str(item.get("name", i)) if isinstance(item, dict) else str(i): item
                     for i, item in enumerate(subgroups)}
    if not isinstance(subgroups, dict):
        return []
    tables = []
    for name, node in subgroups.items():
        if not isinstance(node, (dict, list)):
            continue
        rows = list(_leaf_rows(node, []))
        if not rows:
            continue
        depth = max(len(path) for path, _ in rows)
        # path parts that are the same in every row (e.g. "by") say nothing
        keep = [i for i in range(depth) if len({path[i] if i < len(path) else "" for path, _ in rows}) > 1]
        keep = keep or [depth - 1]
        labels = ["group" if i == keep[-1] else ("by" if i == keep[0] else f"level {i}") for i in keep]
        cells = list(dict.fromkeys(k for _, row in rows for k in row))  # scalars, metrics, then lists
        cells.sort(key=lambda c: next((1 if _is_metric(row[c]) else 2 if isinstance(row[c], list) else 0)
                                      for _, row in rows if c in row))
        table_rows = [[path[i] if i < len(path) else "" for i in keep] + [fmt(row.get(c)) for c in cells]
                      for path, row in rows]
        caption = ", ".join(f"{k} {fmt(v)}" for k, v in node.items() if _scalar(v)) if isinstance(node, dict) else ""
        tables.append(Table(labels + cells, table_rows, f"{name}" + (f": {caption}" if caption else "")))
    return tables


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_metric(v: Any) -> bool:
    return isinstance(v, dict) and "value" in v


def _leaf_rows(node: Any, path: list[str]):
    """(path, {cell: value}) of every entry whose values are scalars, metrics or lists only."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            label = str(item.get("name", i)) if isinstance(item, dict) else str(i)
            yield from _leaf_rows(item, path + [label])
        return
    if not isinstance(node, dict):
        return
    children = {k: v for k, v in node.items() if isinstance(v, (dict, list)) and not _is_metric(v)
                and not (isinstance(v, list) and all(not isinstance(x, dict) for x in v))}
    if not children:
        if path:
            yield path, node
        return
    for key, child in children.items():
        yield from _leaf_rows(child, path + [str(key)])


# -- reading what the folder holds ----------------------------------------------------------------

def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/best.ckpt -> <run>; a checkpoint beside its config.yaml -> its folder
    (as xray.checkpoint.run_dir_of, without importing MindSpore)."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix != ".ckpt":
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def checkpoint_digest(checkpoint: Path) -> Optional[str]:
    """The checkpoint's sha256: the one best.json records beside it when it is that file's,
    else computed; None when the file is gone."""
    checkpoint = Path(checkpoint)
    record = _read_json(checkpoint.with_suffix(".json")) or {}
    if record.get("checkpoint") == checkpoint.name and record.get("sha256"):
        return record["sha256"]
    if not checkpoint.is_file():
        return None
    import hashlib

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def predictions_file(folder: Path, key: str, result: dict) -> Optional[Path]:
    """The predictions_<tag>.csv evaluate wrote beside eval_<tag>.json (tag = key, or the split
    with its tta suffix; else the only predictions file of the split)."""
    split, tta = result.get("split", key), int(result.get("tta") or 1)
    for tag in (key, split + (f"_tta{tta}" if tta > 1 else "")):
        if (Path(folder) / f"predictions_{tag}.csv").is_file():
            return Path(folder) / f"predictions_{tag}.csv"
    found = sorted(Path(folder).glob(f"predictions_{split}*.csv"))
    return found[0] if len(found) == 1 else None


def read_predictions(path: Path, classes: Sequence[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(class ids, NxK probabilities as evaluate wrote them: through the temperature) of a
    predictions csv (a two-class one holds p of class 1 only); None if unreadable."""
    try:
        return read_predictions_csv(path, classes)
    except (OSError, KeyError, ValueError) as e:
        log.warning("card: %s cannot be read (%s); its figures are left out", path, e)
        return None


def _split_order(results: dict) -> list[str]:
    return sorted(results, key=lambda k: (results[k].get("split", k) != "val", results[k].get("split", k) != "test", k))


def config_of(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the run's config.yaml as a dict, its text), or (None, None)."""
    path = Path(run_dir) / "config.yaml"
    try:
        text = path.read_text()
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.create(text), resolve=False), text
    except Exception:  # noqa: BLE001 - a card without the recipe is still a card
        return None, None


def caveats_of(cfg: Optional[dict]) -> list[str]:
    """The `caveats` a recipe carries (a list of sentences, or one), [] when it has none."""
    raw = (cfg or {}).get("caveats") or []
    return [str(raw)] if isinstance(raw, str) else [str(c) for c in raw]


# -- figures --------------------------------------------------------------------------------------

def png_of(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _file(folder: Path, name: str) -> Optional[Path]:
    return Path(folder) / name if (Path(folder) / name).is_file() else None


def roc_and_confusion(folder: Path, key: str, result: dict, predictions) -> list[Figure]:
    """The ROC curve(s) of a split from its predictions (a two-class decision with its
    val-chosen operating point; a K-class model's one-vs-rest curves and its read-offs) and
    the confusion matrix at the val-chosen threshold (K classes: argmax) from the result."""
    from xray.labels import binary_decisions
    from xray.metrics import roc_curve
    from xray.plots import confusion_figure, roc_figure

    figures, classes, n = [], result["classes"], result.get("images")
    if predictions is not None:
        y, probs = predictions
        if len(classes) > 2 and ARGMAX in result:
            r = result[ARGMAX]
            curves = {c: (*roc_curve(y == i, probs[:, i])[:2], (r.get(f"auc_{c}") or {}).get("value") or float("nan"))
                      for i, c in enumerate(classes)}
            figures.append(Figure(f"{key}: one-vs-rest ROC", png_of(roc_figure(
                None, None, r["auc"]["value"], f"{key}: one-vs-rest ROC ({n} images)", more=curves)),
                _file(folder, f"roc_{key}.png")))
        decisions = binary_decisions(result["task"], y, probs)
        for name, block in binary_results(result).items():
            if name not in decisions:
                continue
            yy, pp = decisions[name]
            at = block[AT_VAL_THRESHOLD]
            fpr, tpr, _ = roc_curve(yy, pp)
            point = (1 - at["specificity"]["value"], at["sensitivity"]["value"]) if (
                at.get("specificity") or {}).get("value") is not None and (
                at.get("sensitivity") or {}).get("value") is not None else None
            title = f"{key}: {name} ROC ({block.get('images', len(yy))} images)"
            own = name == result["task"]
            figures.append(Figure(title, png_of(roc_figure(fpr, tpr, at["auc"]["value"], title, point)),
                                  _file(folder, f"roc_{key}.png") if own else None))
    for name, block in binary_results(result).items():
        at = block[AT_VAL_THRESHOLD]
        if at.get("confusion_matrix"):
            names = ("NORMAL", "PNEUMONIA") if name == "pneumonia_vs_normal" else (
                ("VIRAL", "BACTERIAL") if name == "bacterial_vs_viral" else tuple(classes))
            title = f"{key}: {name} at {at['threshold']:.3f}"
            figures.append(Figure(title, png_of(confusion_figure(np.array(at["confusion_matrix"]), title, names)),
                                  _file(folder, f"confusion_{key}.png") if name == result["task"] else None))
    if ARGMAX in result and result[ARGMAX].get("confusion_matrix"):
        title = f"{key}: argmax"
        figures.append(Figure(title, png_of(confusion_figure(np.array(result[ARGMAX]["confusion_matrix"]),
                                                             title, classes)), _file(folder, f"confusion_{key}.png")))
    return figures


def reliability(folder: Path, key: str, result: dict, predictions) -> Optional[Figure]:
    """The reliability diagram of a split: p(class 1) of a two-class model (K classes: the top
    class's confidence), as trained and through its temperature when it has one."""
    from xray.calibration import reliability_figure, scale

    if predictions is None:
        return None
    y, probs = predictions
    temperature = (result.get("calibration") or {}).get("temperature")
    single_t = temperature if isinstance(temperature, (int, float)) and temperature > 0 else None
    title = f"{key}: reliability ({len(y)} images)"
    if probs.shape[1] == 2:
        p = probs[:, 1]
        curves = {"as trained": scale(p, 1.0 / single_t), "temperature-scaled": p} if single_t else {
            ("as evaluated" if temperature else "as trained"): p}
        return Figure(title, png_of(reliability_figure(y, curves, title)), _file(folder, f"reliability_{key}.png"))
    try:
        from xray.calibration import scale_probs, top_class
    except ImportError:  # (K-class calibration: a later xray)
        return None
    right, confidence = top_class(y, probs)
    curves = {"top class": confidence}
    if single_t:
        raw_right, raw_conf = top_class(y, scale_probs(probs, 1.0 / single_t))
        curves = {"as trained": raw_conf, "temperature-scaled": confidence}
        right = raw_right  # (the argmax does not change with the temperature)
    return Figure(title, png_of(reliability_figure(right, curves, title)), _file(folder, f"reliability_{key}.png"))


def computed_gallery(checkpoint: Path, folder: Path, key: str, result: dict, predictions, out_dir: Path,
                     n: int = GALLERY_IMAGES) -> Optional[Path]:
    """cam_errors_<key>.png drawn now (xray.explain, through evaluate's explain_errors): the n
    most confident false positives and false negatives of a two-class model at its val-chosen
    threshold (K classes: the most confident wrong calls of each class). None when the model
    or its data cannot be loaded."""
    try:
        from xray.checkpoint import load_trained_model
        from xray.data import read_manifest, split_file, task_records
        from xray.evaluate import class_picks, error_picks, explain_errors

        model = load_trained_model(Path(checkpoint))
        data_dir = Path(result.get("data_dir") or model.cfg.data.dir)
        records = task_records(split_file(data_dir, read_manifest(data_dir), result["split"]), model.task)
        y, probs = predictions
        with open(predictions_file(folder, key, result), newline="") as f:
            names = [r["file_name"] for r in csv.DictReader(f)]
        if probs.shape[1] == 2:
            picks = error_picks(y, probs[:, 1], result[AT_VAL_THRESHOLD]["threshold"], n)
            picks = {k: v for k, v in picks.items() if k in ("false positives", "false negatives") and v}
            p = probs[:, 1]
        else:
            picks = {k: v for k, v in class_picks(y, probs, model.classes, n).items() if "wrongly" in k and v}
            p = probs
        if not picks:
            log.info("card: %s has no errors at its threshold: no Grad-CAM gallery", key)
            return None
        path = Path(out_dir) / f"cam_errors_{key}.png"
        explain_errors(model, records, names, y, p, picks, path)
        return path
    except Exception as e:  # noqa: BLE001 - the card stands without its gallery
        log.warning("card: no Grad-CAM gallery for %s (%s: %s)", key, type(e).__name__, str(e).splitlines()[0][:200])
        return None


# -- the sections ---------------------------------------------------------------------------------

def build_sections(folder: Path, checkpoints: Sequence[Path], results: dict, gallery: bool,
                   prevalence: float, out_dir: Optional[Path] = None) -> tuple[str, list[Section]]:
    folder = Path(folder)
    results = {k: with_current_keys(v) for k, v in results.items()}
    keys = _split_order(results)
    first = results[keys[0]]
    task, classes = first.get("task", "binary"), first.get("classes") or []
    run_dirs = [run_dir_of(c) for c in checkpoints] or [folder]
    cfg, cfg_text = config_of(run_dirs[0]) if (run_dirs[0] / "config.yaml").is_file() else config_of(folder)
    metrics = [_read_json(d / "metrics.json") or {} for d in run_dirs]
    if not any(metrics):
        metrics = [_read_json(folder / "metrics.json") or {}]
    predictions = {}
    for key in keys:
        path = predictions_file(folder, key, results[key])
        predictions[key] = read_predictions(path, classes) if path else None
    name = f"{task} model" + (f", an ensemble of {len(checkpoints)}" if len(checkpoints) > 1 else "")
    title = f"Model card: {name} ({folder.name})"
    sections = [
        summary_section(task, classes, checkpoints, results, keys, metrics),
        intended_use_section(task, cfg),
        Section("caveats", [("list", caveats_of(cfg) + known_caveats(results, keys, cfg, metrics, checkpoints))]),
        data_section(folder, results, keys, cfg),
        metrics_section(results, keys),
        prevalence_section(results, keys, prevalence),
        Section("roc", [b for key in keys for b in roc_and_confusion(folder, key, results[key], predictions[key])]
                or ["No predictions file beside the results: no figures."]),
        calibration_section(folder, run_dirs, results, keys, predictions),
        Section("subgroups", subgroup_blocks(results, keys)),
        gallery_section(folder, checkpoints, results, keys, predictions, gallery, Path(out_dir or folder)),
        recipe_section(cfg_text, metrics),
        provenance_section(checkpoints, run_dirs, metrics),
    ]
    return title, sections


def summary_section(task: str, classes, checkpoints, results: dict, keys: list[str], metrics: list[dict]) -> Section:
    rows = [["task", f"{task} ({', '.join(classes)})"]]
    for key in keys:
        r = results[key]
        for name, block in binary_results(r).items():
            at = block[AT_VAL_THRESHOLD]
            rows.append([f"{key}: {name}", f"AUC {fmt(at.get('auc'))}; at {at['threshold']:.3f} "
                         f"({rule_text(at.get('rule'))}): sensitivity {fmt(at.get('sensitivity'))}, "
                         f"specificity {fmt(at.get('specificity'))}"])
        if ARGMAX in r:
            a = r[ARGMAX]
            rows.append([f"{key}: argmax", f"macro AUC {fmt(a.get('auc'))}; accuracy {fmt(a.get('accuracy'))}, "
                         f"balanced accuracy {fmt(a.get('balanced_accuracy'))}"])
    best = [m.get("best_val") or {} for m in metrics if m]
    if best:
        rows.append(["checkpoint chosen by", "best val AUC over the epochs: " + ", ".join(
            f"{fmt(b.get('auc'))} (epoch {m.get('best_epoch')})" for b, m in zip(best, metrics))])
    rows.append(["checkpoint" + ("s" if len(checkpoints) > 1 else ""), ", ".join(str(c) for c in checkpoints)])
    return Section("summary", [Table([], rows), "Figures in brackets are 95 % bootstrap CIs."])


def rule_text(rule: Optional[str]) -> str:
    if not rule:
        return "threshold rule not recorded"
    if rule == "youden":
        return "chosen on val by Youden's J"
    if rule.startswith("sensitivity>="):
        return f"the highest threshold keeping val sensitivity >= {rule[len('sensitivity>='):]}"
    if rule == NO_RULE:
        return "0.5: val had one class only, no threshold could be chosen"
    if rule == PRIOR:
        return "the training's bacterial share among pneumonia images (0.5 after balanced sampling), not chosen on val"
    return rule


def intended_use_section(task: str, cfg: Optional[dict]) -> Section:
    data = ((cfg or {}).get("data") or {}).get("name", "kermany")
    use = TASK_USE.get(task, f"was trained for task={task}")
    return Section("intended-use", [
        f"<b>Intended use.</b> Research only. This model {use}, for frontal (antero-posterior) chest X-rays of "
        "children like those it was trained on: the Kermany et al. (2018) set, children aged one to five at "
        "Guangzhou Women and Children's Medical Center" + (" (here its 60-image sample shipped with xray)"
                                                             if data == "sample" else "") + ".",
        "<b>Not for.</b> Diagnosis or triage of patients: it is not a medical device and has not been "
        "validated prospectively. Not for adults, other hospitals, scanners or image processing, lateral "
        "views, or other findings (effusion, tuberculosis, COVID-19, tubes and lines): it was never shown them "
        "and will still answer. Its p is calibrated (if at all) on the validation split of the same hospital; "
        "at another prevalence the meaning of a positive call changes (see PPV and NPV).",
    ])


def data_section(folder: Path, results: dict, keys: list[str], cfg: Optional[dict]) -> Section:
    manifest = _read_json(folder / "manifest.json")
    data_dir = next((r.get("data_dir") for r in results.values() if r.get("data_dir")), None)
    if manifest is None and data_dir:
        manifest = _read_json(Path(data_dir) / "manifest.json")
    blocks: list = []
    if manifest and manifest.get("splits"):
        rows = []
        for split, s in manifest["splits"].items():
            classes = ", ".join(f"{c} {n}" for c, n in (s.get("classes") or {}).items())
            subtypes = ", ".join(f"{c} {n}" for c, n in (s.get("subtypes") or {}).items())
            rows.append([split, s.get("images"), s.get("patients"), classes, subtypes])
        blocks.append(Table(["split", "images", "patients", "classes", "subtypes"], rows,
                            f"the data set ({manifest.get('source', data_dir)}), split by patient "
                            f"(val_source {manifest.get('val_source')}, val_fraction {manifest.get('val_fraction')}, "
                            f"seed {manifest.get('seed')})"))
    rows = []
    for key in keys:
        r = results[key]
        per_class = r.get("per_class") or ({r["classes"][1]: r.get("positives"),
                                           r["classes"][0]: (r.get("images") or 0) - (r.get("positives") or 0)}
                                          if r.get("positives") is not None and len(r.get("classes", [])) == 2 else {})
        rows.append([key, r.get("images"), r.get("patients"), ", ".join(f"{c} {n}" for c, n in per_class.items()),
                     r.get("tta"), (r.get("bootstrap") or {}).get("unit")])
    blocks.append(Table(["evaluated on", "images", "patients", "per class", "test-time views", "CIs resample"],
                        rows, "what the metrics below were computed on"))
    fingerprints = [(key, results[key]["data"]) for key in keys if isinstance(results[key].get("data"), dict)]
    if fingerprints:
        rows = []
        for key, d in fingerprints:
            for split, s in (d.get("splits") or {}).items():
                rows.append([key, d.get("dir"), d.get("manifest_sha256"), split, s.get("images"), s.get("digest"),
                             d.get("overlap_with_train")])
        blocks.append(Table(["result", "data dir", "manifest sha256", "split", "images", "images digest",
                             "images also in train"], rows, "the data set's fingerprint (equal digests: the same images)"))
    else:
        blocks.append("The results record no data-set fingerprint (evaluated before xray recorded one).")
    return Section("data", blocks)


def metrics_section(results: dict, keys: list[str]) -> Section:
    rows = []
    for key in keys:
        r = results[key]
        if ARGMAX in r:
            a = r[ARGMAX]
            rows.append([key, "argmax", "argmax", r.get("images"), *[fmt(a.get(m)) for m in METRICS]])
        for name, block in binary_results(r).items():
            at = block[AT_VAL_THRESHOLD]
            rows.append([key, name, f"{at['threshold']:.3f} ({short_rule(at.get('rule'))})", block.get("images"),
                         *[fmt(at.get(m)) for m in METRICS]])
            half = block.get(AT_HALF) or {}
            if half:
                rows.append([key, name, "0.5", block.get("images"), *[fmt(half.get(m)) for m in METRICS]])
    boot = next((r.get("bootstrap") for r in results.values() if r.get("bootstrap")), {}) or {}
    note = (f"95 % CIs from {boot.get('resamples')} bootstrap resamples of {boot.get('unit', 'image')}s. "
            if boot else "") + ("Each threshold is chosen before the split is scored (on val, or the "
                                "training prior) and applied unchanged to every other split; val's own numbers at a "
                                "threshold chosen on val are optimistic. Rules: " + "; ".join(
                                    f"{short_rule(r)}: {rule_text(r)}" for r in rules_of(results)) + ".")
    return Section("metrics", [Table(["split", "decision", "threshold", "images", *METRICS], rows), note])


def rules_of(results: dict) -> list[str]:
    return list(dict.fromkeys(b[AT_VAL_THRESHOLD].get("rule") for r in results.values()
                              for b in binary_results(r).values() if b[AT_VAL_THRESHOLD].get("rule")))


def prevalence_section(results: dict, keys: list[str], prevalence: float) -> Section:
    rows = []
    for key in keys:
        if results[key].get("split", key) == "val":
            continue
        for name, block in binary_results(results[key]).items():
            at = block[AT_VAL_THRESHOLD]
            own = (block.get("positives") / block["images"]) if block.get("images") and block.get("positives") is not None else None
            for label, p in ((f"stated: {prevalence:.0%}", prevalence), (f"{key}'s own: {own:.0%}" if own is not None else None, own)):
                if p is None:
                    continue
                ppv, npv = at_prevalence(at, p)
                rows.append([key, name, POSITIVE.get(name, "class 1"), label, fmt(ppv), fmt(npv)])
    blocks: list = [Table(["split", "decision", "positive", "prevalence", "PPV", "NPV"], rows)] if rows else []
    blocks.append("PPV and NPV from the split's sensitivity and specificity at its chosen threshold by Bayes' "
                  "rule; the ranges come from the ends of their CIs (not a joint CI). The test half of the "
                  "Kermany set is about 62 % pneumonia; a clinic's share is usually far lower, and so is the PPV.")
    return Section("prevalence", blocks)


def calibration_section(folder: Path, run_dirs, results: dict, keys: list[str], predictions: dict) -> Section:
    rows = []
    for key in keys:
        c = results[key].get("calibration") or {}
        if not c:
            continue
        before = c.get("uncalibrated") or {}
        rows.append([key, c.get("of", "p(class 1)"), fmt(c.get("temperature")), fmt(before.get("ece")), fmt(c.get("ece")),
                     fmt(before.get("brier")), fmt(c.get("brier")), fmt(before.get("nll")), fmt(c.get("nll"))])
    blocks: list = []
    if rows:
        blocks.append(Table(["split", "of", "temperature", "ECE as trained", "ECE evaluated", "Brier as trained",
                             "Brier evaluated", "NLL as trained", "NLL evaluated"], rows,
                            "evaluated = through the temperature, when the checkpoint has one"))
    fits = [(d, _read_json(Path(d) / "calibration.json")) for d in dict.fromkeys([folder, *run_dirs])]
    fit_rows = [[str(d.name), fmt(f.get("temperature")), f.get("fitted_on"), fmt((f.get("val_before") or {}).get("ece")),
                 fmt((f.get("val_after") or {}).get("ece"))] for d, f in fits if f]
    if fit_rows:
        blocks.append(Table(["folder", "temperature", "fitted on", "ECE before", "ECE after"], fit_rows,
                            "temperature scaling (calibration.json)"))
    else:
        blocks.append("No temperature was fitted (no calibration.json): the probabilities are as trained.")
    blocks += [f for key in keys if (f := reliability(folder, key, results[key], predictions[key])) is not None]
    return Section("calibration", blocks)


def subgroup_blocks(results: dict, keys: list[str]) -> list:
    blocks: list = []
    for key in keys:
        if results[key].get("subgroups"):
            for table in subgroup_tables(results[key]["subgroups"]):
                table.caption = f"{key}, {table.caption}"
                blocks.append(table)
    if not blocks:
        return ["The results hold no subgroup metrics (evaluated before xray computed them)."]
    return blocks + ["Each subgroup is scored at the same threshold as the whole split; sensitivity only where "
                     "the subgroup has positives, specificity only where it has negatives."]


def gallery_section(folder: Path, checkpoints, results: dict, keys: list[str], predictions: dict,
                    gallery: bool, out_dir: Path) -> Section:
    blocks: list = []
    for key in [k for k in keys if results[k].get("split", k) != "val"] or keys:
        path = folder / f"cam_errors_{key}.png"
        if not path.is_file() and (Path(out_dir) / path.name).is_file():
            path = Path(out_dir) / path.name
        if not path.is_file() and gallery and checkpoints and predictions.get(key) is not None:
            path = computed_gallery(checkpoints[0], folder, key, results[key], predictions[key], out_dir) or path
        if path.is_file():
            blocks.append(Figure(f"{key}: Grad-CAM of the most confident errors (and right calls, where evaluate "
                                 "drew them)", path.read_bytes(), path))
    if not blocks:
        return Section("gallery", ["No Grad-CAM gallery: evaluate with explain=4 (python -m xray.evaluate ckpt=... "
                                   "split=test explain=4) to draw one."])
    if len(checkpoints) > 1:
        blocks.append("An ensemble: the images are picked by the ensemble's probabilities, the maps are its first "
                      "member's.")
    return Section("gallery", blocks + ["Red = where the score of the class named rose most. Maps are coarse "
                                        "(the last conv block is a few cells wide): which part of the chest, not which rib."])


def recipe_section(cfg_text: Optional[str], metrics: list[dict]) -> Section:
    blocks: list = []
    hp = next((m.get("hparams") for m in metrics if m.get("hparams")), None)
    if hp:
        seeds = [m.get("hparams", {}).get("seed") for m in metrics if m.get("hparams")]
        shown = {**hp, **({"seed": ", ".join(str(s) for s in seeds)} if len(seeds) > 1 else {})}
        pairs = [[k, fmt(v)] for k, v in shown.items()]
        per_row = 4
        rows = [sum(pairs[i:i + per_row], []) + [""] * 2 * (per_row - len(pairs[i:i + per_row]))
                for i in range(0, len(pairs), per_row)]
        blocks.append(Table(["hyper-parameter", "value"] * per_row, rows, "the run's hyper-parameters"))
    if cfg_text:
        blocks.append("The resolved config (config.yaml: what the run was trained with):")
        blocks.append(("pre", cfg_text))
    return Section("recipe", blocks or ["The run's config.yaml is not beside the checkpoint."])


def provenance_section(checkpoints, run_dirs, metrics: list[dict]) -> Section:
    rows = []
    for checkpoint, run_dir, m in zip(checkpoints or [None], run_dirs, metrics):
        p = (m or {}).get("provenance") or {}
        git, versions = p.get("git") or {}, p.get("versions") or {}
        digest = checkpoint_digest(checkpoint) if checkpoint is not None else None
        rows.append([str((m or {}).get("source") or run_dir), (git.get("commit") or "-")[:12]
                     + (" (uncommitted changes)" if git.get("dirty") else ""),
                     ", ".join(f"{k} {v}" for k, v in versions.items() if v), p.get("host"), p.get("device_target"),
                     p.get("slurm_job_id") or "-", (digest or "-")[:16]])
    return Section("provenance", [
        Table(["trained in", "commit", "versions", "host", "device", "Slurm job", "checkpoint sha256"], rows),
        f"Card written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {os.uname().nodename}."])


def known_caveats(results: dict, keys: list[str], cfg: Optional[dict], metrics: list[dict], checkpoints) -> list[str]:
    """What the card itself can tell from the results and the recipe."""
    out = []
    if ((cfg or {}).get("data") or {}).get("name") == "sample":
        out.append("Trained on the 60-image sample shipped with xray: a demonstration of the pipeline, not a model "
                   "to use.")
    if any((r.get("bootstrap") or {}).get("unit", "image") == "image" for r in results.values()):
        out.append("CIs resample images, not patients: images of one patient are correlated, so they are too narrow.")
    for key in keys:
        r = results[key]
        if any(b[AT_VAL_THRESHOLD].get("rule") == NO_RULE for b in binary_results(r).values()):
            out.append(f"{key}: val had one class only; the threshold is 0.5, not chosen.")
        overlap = (r.get("data") or {}).get("overlap_with_train") if isinstance(r.get("data"), dict) else None
        if isinstance(overlap, int) and overlap > 0:
            out.append(f"{key}: {overlap} of its images are in the training split: its metrics are optimistic.")
        elif overlap == "unknown":
            out.append(f"{key}: whether its images were trained on is not known (the run recorded no "
                       "train_images.txt).")
        if r.get("images") is not None and r.get("split", key) != "val" and r["images"] < 200:
            out.append(f"{key}: {r['images']} images only: wide CIs.")
    if any(((m.get("provenance") or {}).get("git") or {}).get("dirty") for m in metrics):
        out.append("Trained from a checkout with uncommitted changes: the commit alone does not reproduce it.")
    if len(checkpoints) > 1:
        out.append(f"An ensemble: p is the mean of its {len(checkpoints)} members' (calibrated) probabilities.")
    return out


# -- writing --------------------------------------------------------------------------------------

def write_model_card(folder: Path, checkpoints: list[Path], results: dict[str, dict], *,
                     out_dir: Optional[Path] = None, name: str = "model_card", gallery: bool = True,
                     prevalence: float = PREVALENCE) -> list[Path]:
    """Write <name>.md and <name>.html (self-contained) into out_dir (default: folder) from the
    evaluation `results` ({split or file tag: eval result}) of `checkpoints` (one model, or an
    ensemble's members), whose files (predictions, calibration, Grad-CAM, config.yaml,
    metrics.json) are in `folder` or beside the checkpoints. gallery=False never computes a
    missing Grad-CAM gallery (no MindSpore). Returns the two paths."""
    from xray.errors import XrayError

    if not results:
        raise XrayError("a model card needs at least one evaluation result (eval_<split>.json)")
    folder, out_dir = Path(folder), Path(out_dir or folder)
    checkpoints = [Path(c) for c in checkpoints]
    out_dir.mkdir(parents=True, exist_ok=True)
    title, sections = build_sections(folder, checkpoints, results, gallery, prevalence, out_dir)
    md, page = out_dir / f"{name}.md", out_dir / f"{name}.html"
    write_text(md, to_markdown(title, sections, out_dir))
    write_text(page, to_html(title, sections))
    return [md, page]


def to_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.heading}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines += [tabulate([[_md_cell(c) for c in row] for row in block.rows],
                                   headers=block.columns or [""] * len(block.rows[0]) if block.rows else (),
                                   tablefmt="github", disable_numparse=True), ""]
            elif isinstance(block, Figure):
                if block.file is not None:
                    lines += [f"![{block.title}]({os.path.relpath(block.file, out_dir)})", ""]
                else:
                    lines += [f"*{block.title}: in {CARD_HTML}*", ""]
            elif isinstance(block, tuple) and block[0] == "pre":
                lines += ["```yaml", block[1].rstrip(), "```", ""]
            elif isinstance(block, Link):
                lines += [_md_cell(block), ""]
            elif isinstance(block, tuple) and block[0] == "list":
                lines += [f"- {item}" for item in block[1]] or ["None known."]
                lines.append("")
            else:
                lines += [_strip_tags(str(block)), ""]
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return f"[{value.text}]({value.href})" if isinstance(value, Link) else fmt(value)


def _strip_tags(text: str) -> str:
    return text.replace("<b>", "**").replace("</b>", "**")


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1150px;
       padding: 16px 24px 48px; color: #1b1f23; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
nav a { margin-right: .8em; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .85em; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafbfc; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; color: #57606a; }
figure { display: inline-block; margin: 6px 10px 10px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { font-size: .8em; color: #57606a; max-width: 560px; }
pre { background: #f6f8fa; padding: 10px; font-size: .8em; max-height: 420px; overflow: auto; }
.figures { display: flex; flex-wrap: wrap; }
.note { color: #57606a; font-size: .9em; }
div.table { overflow-x: auto; max-width: 100%; }
"""


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f'<div class="table"><table>{caption}{head}<tbody>{body}</tbody></table></div>'


def _cell(value: Any) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.href)}">{html.escape(value.text)}</a>'
    return html.escape(fmt(value))


def html_figure(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def to_html(title: str, sections: list[Section], extra_head: str = "") -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.heading)}</a>' for s in sections)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style>{extra_head}</head><body>", f"<h1>{html.escape(title)}</h1>", f"<nav>{nav}</nav>"]
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{html.escape(section.heading)}</h2>')
        figures: list[str] = []
        for block in section.blocks:
            if isinstance(block, Figure):
                figures.append(html_figure(block.title, block.png))
                continue
            if figures:
                parts.append('<div class="figures">' + "".join(figures) + "</div>")
                figures = []
            if isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, tuple) and block[0] == "pre":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif isinstance(block, tuple) and block[0] == "list":
                items = "".join(f"<li>{html.escape(item)}</li>" for item in block[1])
                parts.append(f"<ul>{items}</ul>" if items else '<p class="note">None known.</p>')
            elif isinstance(block, Link):
                parts.append(f"<p>{_cell(block)}</p>")
            else:
                parts.append(f"<p>{_safe_paragraph(str(block))}</p>")
        if figures:
            parts.append('<div class="figures">' + "".join(figures) + "</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _safe_paragraph(text: str) -> str:
    """Escape a paragraph but keep its <b>...</b> emphasis."""
    return html.escape(text).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>")
