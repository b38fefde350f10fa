"""The keys every run reports: its hyper-parameters and metrics (TensorBoard's HParams tab,
metrics.json, the sweep report), and the result keys of eval_<split>.json, read the same way
for runs written before a key was renamed. Light on purpose: the report ranks sweeps and
jobs.status reads results without importing MindSpore."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from xray.errors import XrayError

INTENSITY = ("brightness", "contrast", "gamma", "blur", "noise")  # data.augment strengths
TEST_METRICS = ("auc", "accuracy", "sensitivity", "specificity")
NORMS = ("lrn", "batch", "none")  # model.norm: the paper's LRN after conv1 and conv2 | batch norm
#                                   after every conv | none (torchvision's AlexNet)
INITS = ("mindspore", "he")  # model.init: MindSpore's default HeUniform(sqrt(5)) | He normal, ReLU gain


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
        **model_keys(cfg),
        "dropout": get("model.dropout", float), "augment": augment,
        **{f"augment_{k}": get(f"data.augment.{k}", float, 0.0) if augment else 0.0 for k in INTENSITY},
        "equalize": get("data.equalize", str, "none"), "data": get("data.name", str),
        "amp": get("train.amp", str, "O0"), "ema_decay": get("train.ema_decay", float, 0.0),
        "ema_every": get("train.ema_every", int, 16),
    }


def with_current_model_keys(model: dict) -> dict:
    """A model config (or a checkpoint identity's `model`) with today's keys: before model.norm
    (lrn | batch | none) there was the boolean model.lrn; before model.init, MindSpore's."""
    out = {k: v for k, v in model.items() if k != "lrn"}
    out.setdefault("norm", "lrn" if _as(bool, model.get("lrn", True)) else "none")
    out.setdefault("init", "mindspore")
    return out


def model_keys(cfg: DictConfig) -> dict:
    """norm and init of a run's config, whichever xray wrote it."""
    model = OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.select(cfg, "model") else {}
    model = with_current_model_keys(model)
    return {"norm": str(model["norm"]), "init": str(model["init"])}


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


# The metric blocks of an evaluation: a two-class decision at the threshold its rule chose on
# val (the bacterial-vs-viral `prior` rule: from the training, still under this key) and at 0.5;
# a K-class task's argmax decision.
AT_VAL_THRESHOLD, AT_HALF, ARGMAX = "at_val_threshold", "at_0.5", "argmax"
OLD_AT_VAL_THRESHOLD = "youden"  # its name before it was renamed, whatever the rule
NO_RULE = "0.5: val has one class only"  # the `rule` of a threshold that val could not choose
PRIOR = "prior"  # the `rule` of a bacterial-vs-viral threshold set by the training prior, not on val


def short_rule(rule: Optional[str]) -> str:
    """How a table cell names a threshold's rule: youden on val, sensitivity>=0.93 on val,
    training prior, no val."""
    if rule == NO_RULE:
        return "val had one class"
    if rule == PRIOR:
        return "training prior, no val"
    return f"{rule} on val" if rule else "rule not recorded"


def with_current_keys(result: dict) -> dict:
    """An eval_<split>.json, or one split of metrics.json's `eval` summary, with today's keys.
    Files written before the rename hold `at_val_threshold` as `youden` (whatever the rule),
    with the rule in `chosen_on`; a summary of then does not name it (`rule`: null)."""
    out = dict(_renamed(result))  # (a copy: the caller's dict stays as read)
    if "read_off" in out:  # a subtype model's two-class read-offs
        out["read_off"] = {name: _renamed(block) for name, block in out["read_off"].items()}
    return out


def _renamed(block: dict) -> dict:
    if OLD_AT_VAL_THRESHOLD not in block:
        return block
    out = dict(block)
    old = out.pop(OLD_AT_VAL_THRESHOLD)
    out[AT_VAL_THRESHOLD] = {"rule": rule_of_chosen_on(old.get("chosen_on")),
                             **{k: v for k, v in old.items() if k != "chosen_on"}}
    return out


def rule_of_chosen_on(chosen_on: Optional[str]) -> Optional[str]:
    """The `rule` an old file's `chosen_on` meant: "val" (Youden's J), "val: sensitivity >= 0.93",
    "none: val has one class only, 0.5 used"."""
    if chosen_on is None:
        return None
    if chosen_on == "val":
        return "youden"
    if chosen_on.startswith("val: sensitivity >= "):
        return "sensitivity>=" + chosen_on[len("val: sensitivity >= "):]
    if chosen_on.startswith("none:"):
        return NO_RULE
    return chosen_on


def read_predictions_csv(path: Path, classes) -> tuple:
    """(class ids, NxK class probabilities) of a predictions_<split>.csv written by evaluate (a
    two-class one holds p of class 1 only). Raises OSError, KeyError or ValueError."""
    import csv

    import numpy as np

    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in records])
    if len(classes) == 2:
        p = np.array([float(r[f"p_{classes[1].lower()}"]) for r in records])
        return labels, np.stack([1 - p, p], axis=1)
    return labels, np.array([[float(r[f"p_{c.lower()}"]) for c in classes] for r in records])


def read_eval(path: Path) -> dict:
    """An eval_<split>.json with today's keys (with_current_keys); an unreadable one is one line."""
    try:
        result = json.loads(Path(path).read_text())
        if not isinstance(result, dict):
            raise ValueError(f"it holds a JSON {type(result).__name__}, not an evaluation")
        return with_current_keys(result)
    except (OSError, ValueError) as e:
        raise XrayError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); rerun "
                        "`python -m xray.evaluate` on that run's checkpoint, or delete the file") from None


def decision_metrics(result: dict) -> dict:
    """The block that says how a model decides, from an eval result or summary with today's
    keys: a two-class task's `at_val_threshold`, a K-class task's `argmax` ({} if neither)."""
    return result.get(AT_VAL_THRESHOLD) or result.get(ARGMAX) or {}


def binary_results(result: dict) -> dict[str, dict]:
    """The two-class decisions of an eval result with today's keys, {name: its block}: a
    two-class task's own (the result itself, named after the task), a subtype model's read-offs."""
    own = {result.get("task", "binary"): result} if AT_VAL_THRESHOLD in result else {}  # (the first files: binary)
    return {**own, **result.get("read_off", {})}


def metrics_of(result: dict) -> dict:
    """The HParams metrics of a run's result (metrics.json): best val, final loss, diverged,
    and the val-chosen checkpoint on the test split at the val-chosen threshold (K classes: argmax)."""
    best = result.get("best_val") or {}
    test = decision_metrics(with_current_keys((result.get("eval") or {}).get("test") or {}))
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
