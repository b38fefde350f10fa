"""The HParams schema: the keys every run reports (TensorBoard's HParams tab, metrics.json,
the sweep report). Light on purpose: the report ranks sweeps without importing MindSpore."""
from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

INTENSITY = ("brightness", "contrast", "gamma", "blur", "noise")  # data.augment strengths
TEST_METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def hparams_of(cfg: DictConfig) -> dict:
    """The run's hyper-parameters (same keys and types every run; a value that is not of its
    type, in a run that failed on it, is kept as its text)."""
    # defaults: what runs made before a key existed did
    get = lambda key, kind, default=None: _as(kind, OmegaConf.select(cfg, key, default=default))  # noqa: E731
    augment = bool(get("data.augment.enabled", bool))
    return {
        "task": get("task.name", str, "binary"),
        "lr": get("lr", float), "momentum": get("momentum", float), "loss": get("loss.name", str),
        "class_weighted": get("loss.class_weighted", bool),
        "label_smoothing": get("loss.label_smoothing", float, 0.0),
        "sampling": get("data.sampling", str, "shuffle"),
        "batch_size": get("batch_size", int), "epochs": get("epochs", int), "seed": get("seed", int),
        "schedule": get("optim.schedule", str), "warmup_epochs": get("optim.warmup_epochs", int),
        "weight_decay": get("optim.weight_decay", float), "image_size": get("data.image_size", int),
        "lrn": get("model.lrn", bool), "dropout": get("model.dropout", float), "augment": augment,
        **{f"augment_{k}": get(f"data.augment.{k}", float, 0.0) if augment else 0.0 for k in INTENSITY},
        "equalize": get("data.equalize", str, "none"), "data": get("data.name", str),
        "amp": get("train.amp", str, "O0"),
    }


def _as(kind: Callable, value: Any) -> Any:
    if kind is str:
        return str(value)
    if kind is bool:
        return bool(value) if isinstance(value, bool) else str(value).lower() == "true"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if kind is int:
        return int(number) if number.is_integer() else str(value)
    return number


def metrics_of(result: dict) -> dict:
    """The HParams metrics of a run's result (metrics.json): best val, final loss, diverged,
    and the val-chosen checkpoint on the test split at the val-chosen threshold."""
    best = result.get("best_val") or {}
    test_eval = (result.get("eval") or {}).get("test") or {}
    test = test_eval.get("youden") or test_eval.get("argmax") or {}  # two classes / more
    number = lambda v: float(v) if v is not None else float("nan")  # noqa: E731
    return {
        "hparam/best_val_auc": number(best.get("auc")),
        "hparam/best_val_accuracy": number(best.get("accuracy")),
        "hparam/final_train_loss": number(result.get("final_train_loss")),
        "hparam/diverged": float(result["status"] == "diverged"),
        **{f"hparam/test_{k}": number(test.get(k)) for k in TEST_METRICS},
    }


def write_hparams(writer, cfg: DictConfig, result: dict, step: int) -> None:
    """HParams into the run's own event file (tensorboardX's add_hparams would make a
    time-stamped sub-run); metrics that are undefined (nan) get no scalar."""
    from tensorboardX.summary import hparams as hparams_summary

    metrics = metrics_of(result)
    exp, ssi, sei = hparams_summary({**hparams_of(cfg), "status": result["status"]}, metrics)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        if math.isfinite(value):
            writer.add_scalar(tag, value, step)
