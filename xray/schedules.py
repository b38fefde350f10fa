"""Learning-rate schedules, registered by their optim.schedule name: each gives the rate of every
step before warm-up (xray.registry.create_schedule adds the warm-up, except to a schedule that
warms up by itself: `warms_up = True`)."""
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


@SCHEDULES.register("onecycle")
def one_cycle(base_lr: float, optim: DictConfig, step: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Smith's one-cycle policy as torch.optim.lr_scheduler.OneCycleLR (cosine annealing): from
    lr / optim.div_factor up to lr over the first optim.pct_start of the run, then down to
    lr / div_factor / optim.final_div_factor at its end. Its rise is the warm-up (optim.warmup_epochs
    does not apply); the momentum stays fixed."""
    last = max(len(step) - 1, 1)
    peak = max(float(optim.pct_start) * len(step) - 1, 1.0)  # (OneCycleLR's step of the peak)
    start, end = base_lr / optim.div_factor, base_lr / optim.div_factor / optim.final_div_factor

    def anneal(a: float, b: float, t: np.ndarray) -> np.ndarray:
        return b + (a - b) / 2 * (1 + np.cos(np.pi * np.clip(t, 0, 1)))

    return np.where(step <= peak, anneal(start, base_lr, step / peak),
                    anneal(base_lr, end, (step - peak) / max(last - peak, 1)))


one_cycle.warms_up = True
