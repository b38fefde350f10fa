"""Learning-rate schedules, registered by their optim.schedule name: each gives the rate of every
step before warm-up (xray.registry.create_schedule adds the warm-up)."""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from xray.registry import SCHEDULES


@SCHEDULES.register("constant")
def constant(base_lr: float, optim: DictConfig, step: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    return np.full(len(step), base_lr)


@SCHEDULES.register("step")
def step_decay(base_lr: float, optim: DictConfig, step: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Times optim.gamma every optim.step_epochs epochs."""
    return base_lr * optim.gamma ** np.floor(step / steps_per_epoch / optim.step_epochs)


@SCHEDULES.register("cosine")
def cosine(base_lr: float, optim: DictConfig, step: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Half a cosine from base_lr down to 0 over the run."""
    return 0.5 * base_lr * (1 + np.cos(np.pi * step / max(len(step), 1)))
