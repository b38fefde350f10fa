"""xray.averaging: the exponential moving average of the weights (train.ema_decay) is what the
run validates, keeps as best.ckpt and evaluates; last.ckpt holds it beside the raw weights, so
a resumed run continues the same average."""
from __future__ import annotations

import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from helpers import TINY, make_cfg
from test_checkpoint import TinyNet
from xray.averaging import WeightAverage
from xray.checkpoint import TrainingState, read_checkpoint, read_state
from xray.errors import XrayError


def averaged_state(decay: float = 0.9) -> TrainingState:
    net = TinyNet()
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    return TrainingState(net, opt, None, {"task": "binary"}, average=WeightAverage(net, TinyNet(), decay))


def set_weights(net: nn.Cell, value: float) -> None:
    for p in net.get_parameters():
        p.set_data(ms.Tensor(np.full(p.shape, value, np.float32)))


@pytest.mark.unit
def test_the_average_follows_the_weights_and_the_twin_network_holds_it():
    state = averaged_state(decay=0.9)
    average = state.average
    assert [round(average.factor(n), 4) for n in (0, 1, 8, 100)] == [0.0, 0.5, 0.8889, 0.9]
    # (values set before the update compiles: MindSpore's jit does not see later host-side writes;
    # in training the optimizer's graph changes the weights, which it does see)
    set_weights(state.net, 1.0)
    for p in average.average:
        p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
    x = ms.Tensor(np.ones((1, 4), np.float32))
    for updates, expected in (([1, 100], 0.55), ([1], 0.775)):  # 0.5 * 0 + 0.5 * 1, 0.9 * 0.5 + 0.1 * 1; ...
        for n in updates:
            average.update(n)
        for p in average.average:  # batch-norm statistics too
            np.testing.assert_allclose(p.asnumpy(), expected, rtol=1e-6, err_msg=p.name)
        model = state.model()
        assert model is average.twin and model is not state.net
        assert {p.name for p in model.get_parameters()} == {p.name for p in state.net.get_parameters()}
        # the twin computes with the average now (batch norm in eval mode: its averaged statistics)
        model.set_train(False)
        fc = 4 * expected + expected
        bn = (fc - expected) / np.sqrt(expected + 1e-5) * expected + expected
        np.testing.assert_allclose(model(x).asnumpy(), bn, rtol=1e-5)
    np.testing.assert_array_equal(state.net.fc.weight.asnumpy(), 1.0)  # the trained network is untouched


@pytest.mark.unit
def test_an_average_every_few_steps_keeps_the_window():
    net = TinyNet()
    set_weights(net, 3.0)

    def zeroed() -> WeightAverage:  # (set before its update compiles: see above)
        average = WeightAverage(net, TinyNet(), 0.9, every=4)
        for p in average.average:
            p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
        return average

    average = zeroed()
    assert average.factor(100) == pytest.approx(0.9 ** 4)  # the same window in steps
    for step in (1, 2):  # not folded in
        average.update(step)
    np.testing.assert_array_equal(average.average[0].asnumpy(), 0.0)
    average.update(3)  # the 4th step is
    np.testing.assert_array_equal(average.average[0].asnumpy(), 3.0)
    first = zeroed()
    for step in (1, 2, 4, 5, 6):
        first.update(step)
    np.testing.assert_array_equal(first.average[0].asnumpy(), 0.0)
    first.update(0)  # the first step always is (a run shorter than `every` has an average)
    np.testing.assert_array_equal(first.average[0].asnumpy(), 3.0)


@pytest.mark.unit
def test_last_ckpt_holds_the_average_and_a_resume_restores_it(tmp_path):
    state = averaged_state()
    set_weights(state.net, 2.0)
    state.average.update(0)
    state.save(tmp_path / "last.ckpt")
    params = read_checkpoint(tmp_path / "last.ckpt")
    assert {f"ema.{p.name}" for p in state.net.get_parameters()} <= set(params)

    fresh = averaged_state()
    fresh.restore(read_state(tmp_path / "last.ckpt"))
    for saved, restored in zip(state.average.average, fresh.average.average):
        np.testing.assert_array_equal(restored.asnumpy(), saved.asnumpy())

    plain = averaged_state()
    plain.average = None
    plain.save(tmp_path / "plain.ckpt")  # a run without an average (or of format 2)
    with pytest.raises(XrayError, match=r"plain.ckpt does not hold this model's state .*ema\."):
        averaged_state().restore(read_state(tmp_path / "plain.ckpt"))


def test_best_ckpt_is_the_average_and_a_resumed_run_continues_it(sample_data, tmp_path):
    """One epoch: best.ckpt holds last.ckpt's ema.* weights, not its raw ones. Two epochs with an
    interruption after the first end with the same average as two without one."""
    from xray.train import train
    # warm-up + cosine: epoch 1 (all warm-up) has the same learning rates in a run of 1 epoch and in
    # one of 2, so the run of 1 stands for one of 2 stopped after its first (one-cycle's depend on
    # the run's length)
    args = TINY + [f"data.dir={sample_data}", "optim.schedule=cosine", "optim.warmup_epochs=1", "train.ema_decay=0.9",
                   "train.ema_every=1", "train.keep_last=true", "train.eval_splits=[]", "train.cam_images=0"]
    one = tmp_path / "one"
    assert train(make_cfg("config", args + ["epochs=1"]), one)["status"] == "ok"
    last, best = read_checkpoint(one / "checkpoints" / "last.ckpt"), read_checkpoint(one / "checkpoints" / "best.ckpt")
    weight = "fc3.weight"
    np.testing.assert_array_equal(best[weight].asnumpy(), last[f"ema.{weight}"].asnumpy())
    assert not np.array_equal(best[weight].asnumpy(), last[weight].asnumpy())
    trained, averaged = last[weight].asnumpy(), best[weight].asnumpy()
    ms.set_seed(42)  # the run's initial weights: the average has left them for the trained ones
    from xray.registry import create_model
    initial = create_model(make_cfg("config", args).model, 72, len(trained)).fc3.weight.asnumpy()  # (K classes)
    assert np.abs(averaged - trained).max() < 0.9 * np.abs(initial - trained).max()  # (the steps' mean: ~0.5)

    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    (resumed / "metrics.json").unlink()  # as if stopped after epoch 1 of 2
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(resumed / "config.yaml"), {"epochs": 2}), resumed / "config.yaml")
    assert train(make_cfg("config", args + ["epochs=2"]), resumed)["status"] == "ok"
    straight = tmp_path / "straight"
    assert train(make_cfg("config", args + ["epochs=2"]), straight)["status"] == "ok"
    a, b = read_checkpoint(resumed / "checkpoints" / "last.ckpt"), read_checkpoint(straight / "checkpoints" / "last.ckpt")
    for name in (weight, f"ema.{weight}", "ema.features.0.weight"):
        np.testing.assert_allclose(a[name].asnumpy(), b[name].asnumpy(), rtol=1e-5, atol=1e-7, err_msg=name)
