"""xray.schedules: the learning rate of every step, warm-up included (xray.registry.create_schedule)."""
import numpy as np
import pytest

from helpers import make_cfg
from xray.registry import create_schedule

pytestmark = pytest.mark.unit


def test_cosine_after_a_linear_warm_up_and_step_decay():
    cfg = make_cfg("config", ["optim.schedule=cosine", "optim.warmup_epochs=1"])
    lr = create_schedule(0.1, cfg.optim, epochs=4, steps_per_epoch=10)
    assert len(lr) == 40 and lr[0] == pytest.approx(0.01) and max(lr) <= 0.1 + 1e-7
    assert lr[-1] < 0.01  # cosine decays to ~0
    step = create_schedule(0.1, make_cfg("config", ["optim.schedule=step", "optim.step_epochs=2",
                                                    "optim.warmup_epochs=0"]).optim, 4, 10)
    assert step[0] == pytest.approx(0.1) and step[25] == pytest.approx(0.01)


def test_one_cycle_rises_to_lr_then_anneals_to_almost_nothing_and_ignores_warm_up():
    """torch's OneCycleLR (cos annealing, pct_start 0.3, div 25, final div 1e4) over 100 steps:
    4e-3 at step 0, the peak 0.1 at step 29, 4e-7 at step 99."""
    cfg = make_cfg("config", ["optim.schedule=onecycle", "optim.warmup_epochs=3"])
    lr = create_schedule(0.1, cfg.optim, epochs=10, steps_per_epoch=10)
    assert lr[0] == pytest.approx(0.1 / 25) and lr[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-4)
    assert int(np.argmax(lr)) == 29 and lr[29] == pytest.approx(0.1)
    assert np.all(np.diff(lr[:30]) > 0) and np.all(np.diff(lr[29:]) < 0)
    assert lr[15] == pytest.approx(0.004 + (0.1 - 0.004) * (1 - np.cos(np.pi * 15 / 29)) / 2, rel=1e-5)
