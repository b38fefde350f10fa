"""Models, losses and learning-rate schedules by name (mindcv's `create_model` pattern).

A component is declared once, where it is written, with its registry's decorator:

    @MODELS.register("alexnet")          # xray/model.py
    def alexnet(cfg, image_size, num_classes): ...

and is then selectable by its config key (`model.name`, `loss.name`, `optim.schedule`); the
check of that key (xray.checks) lists the registry's names, so the two cannot disagree. A
config group file (conf/model/<name>.yaml, conf/loss/<name>.yaml) is what makes `model=<name>`
work on the command line.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np

from xray.errors import XrayError


class Registry:
    """Named builders of one kind. `home` is the module whose import registers them: `names()`
    imports it, so that xray.checks can list them without importing MindSpore up front."""

    def __init__(self, key: str, home: str) -> None:
        self.key, self.home = key, home  # key: the config key that selects one, e.g. "loss.name"
        self._builders: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(builder: Callable) -> Callable:
            if name in self._builders:
                raise ValueError(f"{self.key}: {name} is registered twice")
            self._builders[name] = builder
            return builder
        return add

    def names(self) -> list[str]:
        importlib.import_module(self.home)
        return list(self._builders)  # in the order they are written

    def get(self, name: str) -> Callable:
        names = self.names()
        if name not in names:
            raise XrayError(f"{self.key}={name} must be one of {', '.join(names)}")
        return self._builders[name]


MODELS = Registry("model.name", "xray.model")
LOSSES = Registry("loss.name", "xray.losses")
SCHEDULES = Registry("optim.schedule", "xray.schedules")


def create_model(cfg, image_size: int, num_classes: int):
    """The network of the model config group (cfg.model) for an input size; the head has one
    output per class of the task (never a key of its own that could disagree)."""
    return MODELS.get(cfg.name)(cfg, image_size, num_classes)


def create_loss(cfg, num_classes: int, class_counts: Sequence[int]):
    """The loss of the loss config group (cfg.loss), class-weighted from the train split's class
    counts if cfg.class_weighted."""
    from xray.losses import class_weights

    weights = class_weights(class_counts) if cfg.class_weighted else None
    smoothing = float(cfg.get("label_smoothing", 0.0))
    if not 0 <= smoothing < 1:
        raise XrayError(f"loss.label_smoothing={smoothing} must be in [0, 1)")
    return LOSSES.get(cfg.name)(num_classes, weights, smoothing)


def create_schedule(base_lr: float, optim_cfg, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every step of a run (float32): the optim group's schedule
    (optim.schedule), with a linear warm-up from base_lr/10 over optim.warmup_epochs."""
    step = np.arange(epochs * steps_per_epoch, dtype=np.float64)
    schedule = SCHEDULES.get(optim_cfg.schedule)
    lr = schedule(base_lr, optim_cfg, step, steps_per_epoch)
    warmup = 0 if getattr(schedule, "warms_up", False) else optim_cfg.warmup_epochs * steps_per_epoch
    if warmup > 0:
        lr = np.where(step < warmup, base_lr * (0.1 + 0.9 * step / warmup), lr)
    return lr.astype(np.float32)
