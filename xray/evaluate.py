"""Evaluate a checkpoint on a split, with bootstrap CIs, at the val-chosen threshold and 0.5.

    python -m xray.evaluate ckpt=<run>/checkpoints/best.ckpt split=test

Writes eval_<split>.json, predictions_<split>.csv, roc_<split>.png and confusion_<split>.png
into the checkpoint's run folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
from omegaconf import DictConfig

from xray import CONF_DIR
from xray.checkpoint import TrainedModel, load_trained_model
from xray.data import make_dataset, read_manifest, split_file
from xray.device import setup_device
from xray.errors import XrayError, one_line_errors
from xray.files import write_json, write_text
from xray.metrics import binary_metrics, bootstrap_ci, confusion, roc_curve, youden_threshold
from xray.plots import confusion_figure, roc_figure, save_figure

log = logging.getLogger(__name__)


def predict_records(model: TrainedModel, path: Path, batch_size: int, workers: int = 2
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file names, labels, p(pneumonia)) for every record of a .mindrecord file, in order."""
    dataset = make_dataset(path, model.spec, batch_size, train=False, workers=workers,
                           with_names=True)
    names, labels, probs = [], [], []
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        probs.append(model.probabilities(batch["image"]))
        labels.append(batch["label"])
        names.extend(str(n) for n in batch["file_name"])
    return names, np.concatenate(labels), np.concatenate(probs)


def metrics_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    """Every metric as {value, ci95} plus the confusion matrix, at one threshold."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, lambda yy, pp: binary_metrics(yy, pp, threshold), n=n_boot, seed=seed)
    out = {"threshold": threshold}
    out.update({k: {"value": v, "ci95": ci[k]} for k, v in point.items()})
    out["confusion_matrix"] = confusion(y, p, threshold).tolist()
    return out


def evaluate(checkpoint: Path, split: str = "test", data_dir: Optional[Path] = None,
             batch_size: int = 64, bootstrap: int = 1000, seed: int = 0, workers: int = 2) -> dict:
    """Evaluate `checkpoint` on `split`; writes the result files beside the run and returns
    the eval_<split>.json content."""
    model = load_trained_model(checkpoint)
    data_dir = Path(data_dir or model.cfg.data.dir)
    manifest = read_manifest(data_dir)
    if manifest["short_side"] != model.spec.short_side:
        raise XrayError(f"data.dir={data_dir} was converted at short_side={manifest['short_side']} "
                        f"but the model was trained on short_side={model.spec.short_side}")
    names, y, p = predict_records(model, split_file(data_dir, manifest, split), batch_size, workers)
    if split == "val":
        y_val, p_val = y, p
    else:
        _, y_val, p_val = predict_records(model, split_file(data_dir, manifest, "val"),
                                          batch_size, workers)
    threshold = youden_threshold(y_val, p_val)
    result = {
        "split": split,
        "checkpoint": str(model.checkpoint),
        "data_dir": str(data_dir),
        "images": int(len(y)),
        "positives": int(y.sum()),
        "bootstrap": {"resamples": bootstrap, "level": 0.95, "unit": "image"},
        "youden": metrics_with_ci(y, p, threshold, bootstrap, seed),
        "at_0.5": metrics_with_ci(y, p, 0.5, bootstrap, seed),
    }
    result["youden"]["chosen_on"] = "val"
    out = model.run_dir
    write_json(out / f"eval_{split}.json", result)
    write_text(out / f"predictions_{split}.csv", "file_name,label,p_pneumonia\n" + "".join(
        f"{n},{int(t)},{q:.6f}\n" for n, t, q in zip(names, y, p)))
    fpr, tpr, _ = roc_curve(y, p)
    cm = np.array(result["youden"]["confusion_matrix"])
    sens, spec = result["youden"]["sensitivity"]["value"], result["youden"]["specificity"]["value"]
    auc = result["youden"]["auc"]["value"]
    save_figure(roc_figure(fpr, tpr, auc, f"{split}: ROC ({len(y)} images)", (1 - spec, sens)),
                out / f"roc_{split}.png")
    save_figure(confusion_figure(cm, f"{split}, threshold {threshold:.3f} (Youden on val)"),
                out / f"confusion_{split}.png")
    _log_summary(result)
    return result


def _log_summary(result: dict) -> None:
    log.info("%s: %d images (%d pneumonia), checkpoint %s", result["split"], result["images"],
             result["positives"], result["checkpoint"])
    for key in ("youden", "at_0.5"):
        r = result[key]
        log.info("  threshold %.3f (%s):", r["threshold"], "Youden on val" if key == "youden" else "fixed")
        for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv"):
            lo, hi = r[name]["ci95"]
            log.info("    %-18s %.3f  [%.3f, %.3f]", name, r[name]["value"], lo, hi)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if cfg.ckpt is None:
        raise XrayError("ckpt is not set; e.g. ckpt=outputs/train/<run>/checkpoints/best.ckpt")
    setup_device(cfg.device_target, cfg.mode)
    evaluate(Path(cfg.ckpt), cfg.split, cfg.data_dir, cfg.batch_size, cfg.bootstrap, cfg.seed,
             cfg.workers)


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.evaluate import main as entrypoint

    entrypoint()
