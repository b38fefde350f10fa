"""Every user-set value is checked here, once, before any work starts: a bad one is one line
naming the key and what it may be (exit code 2), never a traceback from deep inside a library
or a run that trains on nonsense (lr=-1 is gradient ascent) and says `ok`."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

from omegaconf import DictConfig, OmegaConf

from xray.errors import XrayError
from xray.hparams import INITS, NORMS
from xray.labels import TASKS
from xray.registry import LOSSES, MODELS, SCHEDULES, Registry

# key -> (kind, test, what it must be); kind: "int", "number", "choice", "pair", "bool", "val_or_number"
Rule = tuple[str, Callable[[Any], bool], Union[str, Callable[[], str]]]


def _int(low: int, high: Optional[int] = None) -> Rule:
    what = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return "int", lambda v: v >= low and (high is None or v <= high), what


def _number(test: Callable[[float], bool], what: str) -> Rule:
    return "number", test, f"a number {what}"


def _choice(*options: str) -> Rule:
    return "choice", lambda v: v in options, f"one of {', '.join(options)}"


def _registered(registry: Registry) -> Rule:
    """One of the registry's names, listed when a value is checked, not at import: listing them
    imports their module (MindSpore), which xray.convert's workers must not pay for."""
    return "choice", lambda v: v in registry.names(), lambda: f"one of {', '.join(registry.names())}"


POSITIVE = _number(lambda v: v > 0, "> 0")
NON_NEGATIVE = _number(lambda v: v >= 0, ">= 0")
FRACTION = _number(lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY = _number(lambda v: 0 <= v <= 1, "in [0, 1]")
VAL_OR_PROBABILITY = "val_or_number", lambda v: 0 <= v <= 1, "val or a number in [0, 1]"
DEVICE = "choice", lambda v: str(v).lower() in ("cpu", "gpu", "ascend"), "one of CPU, GPU, Ascend"
MODE = _choice("graph", "pynative")
AMP_LEVELS = ("O0", "O1", "O2", "O3")   # train.amp: MindSpore's mixed-precision levels
TTA = _int(1, 5)
THRESHOLD_RULE = _choice("youden", "sensitivity")
BACTERIAL_VS_VIRAL_RULE = _choice("youden", "prior")
SENSITIVITY = _number(lambda v: 0 < v <= 1, "in (0, 1]")

TRAIN: dict[str, Rule] = {
    "lr": POSITIVE,
    "momentum": FRACTION,
    "epochs": _int(1),
    "batch_size": _int(1),
    "seed": _int(0),
    "device_target": DEVICE,
    "mode": MODE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.schedule": _registered(SCHEDULES),
    "optim.warmup_epochs": _int(0),
    "optim.step_epochs": _int(1),
    "optim.gamma": _number(lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.pct_start": _number(lambda v: 0 < v < 1, "in (0, 1)"),
    "optim.div_factor": _number(lambda v: v >= 1, ">= 1"),
    "optim.final_div_factor": _number(lambda v: v >= 1, ">= 1"),
    "task.name": _choice(*TASKS),
    "model.name": _registered(MODELS),
    "loss.name": _registered(LOSSES),
    "loss.label_smoothing": FRACTION,
    "model.dropout": FRACTION,
    "model.norm": _choice(*NORMS),
    "model.init": _choice(*INITS),
    "model.in_channels": ("int", lambda v: v in (1, 3), "1 or 3"),
    "data.image_size": ("int", lambda v: v >= 67, "an integer >= 67 (AlexNet's pooling needs it)"),
    "data.workers": _int(1),
    "data.equalize": _choice("none", "hist", "clahe"),
    "data.sampling": _choice("shuffle", "balanced"),
    "data.augment.scale": ("pair", lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1"),
    "data.augment.ratio": ("pair", lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    "data.augment.degrees": _number(lambda v: 0 <= v <= 180, "in [0, 180]"),
    "data.augment.brightness": FRACTION,
    "data.augment.contrast": FRACTION,
    "data.augment.gamma": NON_NEGATIVE,
    "data.augment.blur": NON_NEGATIVE,
    "data.augment.noise": NON_NEGATIVE,
    "train.log_every": _int(1),
    "train.max_steps_per_epoch": _int(1),
    "train.eval_bootstrap": _int(0),
    "train.cam_images": _int(0),
    "train.amp": _choice(*AMP_LEVELS),
    "train.ema_decay": FRACTION,
    "train.ema_every": _int(1),
    "train.threshold_rule": THRESHOLD_RULE,
    "train.target_sensitivity": SENSITIVITY,
    "train.bacterial_vs_viral_rule": BACTERIAL_VS_VIRAL_RULE,
}
EVALUATE: dict[str, Rule] = {
    "batch_size": _int(1), "bootstrap": _int(0), "seed": _int(0), "workers": _int(1),
    "tta": TTA, "top_k": _int(1), "explain": _int(0), "device_target": DEVICE, "mode": MODE,
    "calibrate": ("bool", lambda v: True, "true or false"), "card": ("bool", lambda v: True, "true or false"),
    "bootstrap_unit": _choice("patient", "image"),
    "threshold_rule": THRESHOLD_RULE, "target_sensitivity": SENSITIVITY,
    "bacterial_vs_viral_rule": BACTERIAL_VS_VIRAL_RULE,
}
PREDICT: dict[str, Rule] = {
    "threshold": VAL_OR_PROBABILITY, "tta": TTA, "top_k": _int(1), "max_pixels": _int(1),
    "plot": ("bool", lambda v: True, "true or false"), "explain": ("bool", lambda v: True, "true or false"),
    "device_target": DEVICE, "mode": MODE,
}
CONVERT: dict[str, Rule] = {
    "data.short_side": _int(32), "data.val_fraction": _number(lambda v: 0 < v < 1, "in (0, 1)"),
    "data.val_source": _choice("patients", "official"), "data.seed": _int(0),
    "data.stratify": _choice("subtype", "label"),
    "data.max_pixels": _int(1), "workers": _int(0),
    "max_aspect_ratio": _number(lambda v: v >= 1, ">= 1 (long side / short side)"),
}


def check(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Raise XrayError for the first value that breaks its rule (null means "not set" and
    passes: the code's own default applies)."""
    for key, (kind, test, what) in rules.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if not _valid(kind, value, test):
            raise XrayError(f"{key}={_show(value)} must be {what() if callable(what) else what}")


def _valid(kind: str, value: Any, test: Callable[[Any], bool]) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "choice":
        return isinstance(value, str) and test(value)
    if kind == "pair":
        value = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
        return (value is not None and len(value) == 2 and all(_is_number(v) for v in value)
                and test([float(v) for v in value]))
    if kind == "val_or_number":
        return value == "val" or (_is_number(value) and test(float(value)))
    if kind == "int":
        return _is_number(value) and float(value).is_integer() and test(int(value))
    return _is_number(value) and test(float(value))


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _show(value: Any) -> str:
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else str(value)
