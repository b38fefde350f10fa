"""Learning-rate schedules: the learning rate of every step of a run, from the optim config group."""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from xray.errors import XrayError


def lr_schedule(base_lr: float, optim: DictConfig, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """Learning rate of every step: warm-up from base_lr/10, then constant, step or cosine."""
    total = epochs * steps_per_epoch
    step = np.arange(total, dtype=np.float64)
    epoch = step / steps_per_epoch
    if optim.schedule == "constant":
        lr = np.full(total, base_lr)
    elif optim.schedule == "step":
        lr = base_lr * optim.gamma ** np.floor(epoch / optim.step_epochs)
    elif optim.schedule == "cosine":
        lr = 0.5 * base_lr * (1 + np.cos(np.pi * step / max(total, 1)))
    else:
        raise XrayError(f"optim.schedule={optim.schedule} is unknown; use constant, step or cosine")
    warmup = optim.warmup_epochs * steps_per_epoch
    if warmup > 0:
        lr = np.where(step < warmup, base_lr * (0.1 + 0.9 * step / warmup), lr)
    return lr.astype(np.float32)

