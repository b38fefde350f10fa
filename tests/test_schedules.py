"""xray.schedules: the learning rate of every step, warm-up included (xray.registry.create_schedule)."""
import pytest

from helpers import make_cfg
from xray.registry import create_schedule

pytestmark = pytest.mark.unit


def test_cosine_after_a_linear_warm_up_and_step_decay():
    cfg = make_cfg("config", ["optim.warmup_epochs=1"])
    lr = create_schedule(0.1, cfg.optim, epochs=4, steps_per_epoch=10)
    assert len(lr) == 40 and lr[0] == pytest.approx(0.01) and max(lr) <= 0.1 + 1e-7
    assert lr[-1] < 0.01  # cosine decays to ~0
    step = create_schedule(0.1, make_cfg("config", ["optim.schedule=step", "optim.step_epochs=2",
                                                    "optim.warmup_epochs=0"]).optim, 4, 10)
    assert step[0] == pytest.approx(0.1) and step[25] == pytest.approx(0.01)
