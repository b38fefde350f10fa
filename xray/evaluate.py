"""Evaluate a checkpoint (or an ensemble) on a split, with bootstrap CIs, at the
val-chosen threshold and 0.5.

    python -m xray.evaluate ckpt=<run>/checkpoints/best.ckpt split=test [tta=4]
    python -m xray.evaluate ckpt=[<run1>/checkpoints/best.ckpt,<run2>/...] split=test
    python -m xray.evaluate ckpt=outputs/best/<sweep> top_k=3 split=test

Writes eval_<split>.json, predictions_<split>.csv, roc_<split>.png and confusion_<split>.png
(with tta > 1: eval_<split>_tta<K>.json, ...) into the checkpoint's run folder; an ensemble
writes them into this command's own output folder (outputs/evaluate/<time>/).
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Optional, Sequence

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from xray import CONF_DIR
from xray.checks import EVALUATE, check
from xray.checkpoint import TrainedModel, load_trained_model, resolve_checkpoints
from xray.data import make_eval_dataset, read_labels, read_manifest, split_file
from xray.device import setup_device
from xray.errors import XrayError, one_line_errors
from xray.files import write_json, write_text
from xray.metrics import binary_metrics, bootstrap_ci, confusion, roc_curve, youden_threshold
from xray.plots import confusion_figure, roc_figure, save_figure

log = logging.getLogger(__name__)


def predict_records(model: TrainedModel, path: Path, batch_size: int, workers: int = 2,
                    tta: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file names, labels, p(pneumonia)) for every record of a .mindrecord file, in order."""
    dataset = make_eval_dataset(path, model.spec, batch_size, workers=workers, with_names=True,
                                tta=tta)
    names, labels, probs = [], [], []
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        probs.append(model.probabilities(batch["image"]))
        labels.append(batch["label"])
        names.extend(str(n) for n in batch["file_name"])
    return names, np.concatenate(labels), np.concatenate(probs)


def predict_split(models: Sequence[TrainedModel], data_dir: Path, manifest: dict, split: str,
                  batch_size: int, workers: int, tta: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The models' mean p(pneumonia) on a split, each model through its own preprocessing."""
    path = split_file(data_dir, manifest, split)
    read_labels(path)  # a damaged file is one line, not a traceback from the pipeline
    runs = [predict_records(m, path, batch_size, workers, tta) for m in models]
    names, y, _ = runs[0]
    return names, y, np.mean([p for _, _, p in runs], axis=0)


def metrics_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    """Every metric as {value, ci95} plus the confusion matrix, at one threshold (n_boot = 0:
    no CI, ci95 null)."""
    point = binary_metrics(y, p, threshold)
    ci = (bootstrap_ci(y, p, lambda yy, pp: binary_metrics(yy, pp, threshold), n=n_boot, seed=seed)
          if n_boot > 0 else {})
    out = {"threshold": threshold}
    out.update({k: {"value": v, "ci95": ci.get(k)} for k, v in point.items()})
    out["confusion_matrix"] = confusion(y, p, threshold).tolist()
    return out


def evaluate(checkpoints: Sequence[Path], split: str = "test", data_dir: Optional[Path] = None,
             batch_size: int = 64, bootstrap: int = 1000, seed: int = 0, workers: int = 2,
             tta: int = 1, out_dir: Optional[Path] = None, threshold: Optional[float] = None) -> dict:
    """Evaluate one checkpoint, or the mean probability of several (an ensemble), on `split`,
    with tta test-time views per image, at `threshold` (default: chosen on val by Youden's J)
    and at 0.5. Writes eval_<split>.json, predictions, ROC and confusion PNGs into the run
    folder (one checkpoint) or `out_dir`, and returns the JSON."""
    models = [load_trained_model(Path(c)) for c in checkpoints]
    if not models:
        raise XrayError("ckpt is empty; pass a checkpoint, a list [a.ckpt,b.ckpt] or a best folder")
    data_dir = Path(data_dir or models[0].cfg.data.dir)
    manifest = read_manifest(data_dir)
    for model in models:
        if manifest["short_side"] != model.spec.short_side:
            raise XrayError(f"data.dir={data_dir} was converted at short_side={manifest['short_side']} "
                            f"but {model.checkpoint} was trained on short_side={model.spec.short_side}")
    names, y, p = predict_split(models, data_dir, manifest, split, batch_size, workers, tta)
    if threshold is None and split == "val":
        threshold = youden_threshold(y, p)
    elif threshold is None:
        _, y_val, p_val = predict_split(models, data_dir, manifest, "val", batch_size, workers, tta)
        threshold = youden_threshold(y_val, p_val)
    result = {
        "split": split,
        "checkpoint": str(models[0].checkpoint) if len(models) == 1 else [str(m.checkpoint) for m in models],
        "tta": tta,
        "data_dir": str(data_dir),
        "images": int(len(y)),
        "positives": int(y.sum()),
        "bootstrap": {"resamples": bootstrap, "level": 0.95, "unit": "image"},
        "youden": metrics_with_ci(y, p, threshold, bootstrap, seed),
        "at_0.5": metrics_with_ci(y, p, 0.5, bootstrap, seed),
    }
    result["youden"]["chosen_on"] = "val"
    if len(models) == 1:
        out = models[0].run_dir
    elif out_dir is None:
        raise XrayError("an ensemble's results need a folder of their own; pass out_dir")
    else:
        out = Path(out_dir)
    tag = split + (f"_tta{tta}" if tta > 1 else "")
    write_json(out / f"eval_{tag}.json", result)
    write_text(out / f"predictions_{tag}.csv", predictions_csv(names, y, p))
    fpr, tpr, _ = roc_curve(y, p)
    cm = np.array(result["youden"]["confusion_matrix"])
    sens, spec = result["youden"]["sensitivity"]["value"], result["youden"]["specificity"]["value"]
    auc = result["youden"]["auc"]["value"]
    what = f"{split}" + (f", {len(models)} models" if len(models) > 1 else "") + (f", tta {tta}" if tta > 1 else "")
    save_figure(roc_figure(fpr, tpr, auc, f"{what}: ROC ({len(y)} images)", (1 - spec, sens)),
                out / f"roc_{tag}.png")
    save_figure(confusion_figure(cm, f"{what}, threshold {threshold:.3f} (Youden on val)"),
                out / f"confusion_{tag}.png")
    _log_summary(result)
    log.info("  -> %s", out / f"eval_{tag}.json")
    return result


def predictions_csv(names: Sequence[str], labels: np.ndarray, probs: np.ndarray) -> str:
    """file_name,label,p_pneumonia per image (the csv module quotes names with commas)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "label", "p_pneumonia"])
    writer.writerows([name, int(t), f"{q:.6f}"] for name, t, q in zip(names, labels, probs))
    return buf.getvalue()


def summary(result: dict) -> dict:
    """The point values of an eval_<split>.json: {youden: {metric: value}, at_0.5: {...}}."""
    return {key: {"threshold": result[key]["threshold"],
                  **{k: v["value"] for k, v in result[key].items() if isinstance(v, dict) and "value" in v}}
            for key in ("youden", "at_0.5")}


def _log_summary(result: dict) -> None:
    log.info("%s: %d images (%d pneumonia), checkpoint %s", result["split"], result["images"],
             result["positives"], result["checkpoint"])
    for key in ("youden", "at_0.5"):
        r = result[key]
        log.info("  threshold %.3f (%s):", r["threshold"], "Youden on val" if key == "youden" else "fixed")
        for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv"):
            ci = r[name]["ci95"]
            log.info("    %-18s %.3f%s", name, r[name]["value"], f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    check(cfg, EVALUATE)
    checkpoints = resolve_checkpoints(cfg.ckpt, cfg.top_k)
    setup_device(cfg.device_target, cfg.mode)
    evaluate(checkpoints, cfg.split, cfg.data_dir, cfg.batch_size, cfg.bootstrap, cfg.seed,
             cfg.workers, cfg.tta, out_dir=Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.evaluate import main as entrypoint

    entrypoint()
