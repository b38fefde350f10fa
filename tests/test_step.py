"""xray.step: the optimizer, and mixed precision (train.amp): an overflowing fp16 step is
skipped and the loss scale lowered, the fp16 step follows the fp32 one, and a mixed-precision
run's checkpoint keeps its loss scale and serves fp32 evaluation."""
import json

import mindspore as ms
import numpy as np
import pytest

from helpers import TINY, make_cfg
from xray.losses import SoftmaxCrossEntropy
from xray.registry import create_model, create_schedule
from xray.step import build_optimizer, build_training, loss_scaler, make_step, mixed_precision, release_compiled


def _batch():
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(4, 1, 72, 72)).astype(np.float32))
    return x, ms.Tensor(np.array([0, 1, 0, 1], np.int32))


def _weights(net) -> np.ndarray:
    return np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])


class ConvDense(ms.nn.Cell):
    """Weights and biases, as AlexNet's layers have them, without AlexNet's cost to build."""

    def __init__(self):
        super().__init__()
        self.conv = ms.nn.Conv2d(1, 2, 3, has_bias=True)
        self.fc = ms.nn.Dense(4, 2)


@pytest.mark.unit
@pytest.mark.parametrize("override", ["momentum=0", "optim.weight_decay=0", "optim.weight_decay=0.001"])
def test_the_optimizer_takes_integer_sweep_values_and_decays_weights_only(override):
    """Hydra parses momentum=0 as an int, which nn.Momentum rejects; weight decay applies to
    the weights, not to the biases."""
    cfg = make_cfg("config", TINY + [override])
    net = ConvDense()
    opt = build_optimizer(net, cfg, create_schedule(float(cfg.lr), cfg.optim, 2, 4))
    assert float(opt.momentum.asnumpy()) == pytest.approx(float(cfg.momentum))
    decay = {p.name: d for p, d in zip(opt.parameters, opt.group_weight_decay)}
    assert decay == {"conv.weight": pytest.approx(cfg.optim.weight_decay), "conv.bias": 0.0,
                     "fc.weight": pytest.approx(cfg.optim.weight_decay), "fc.bias": 0.0}


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_an_overflowing_step_is_skipped_and_the_scale_halved(level, tmp_path, monkeypatch):
    # the step as training compiles it (jit, graph mode), whatever earlier tests left set
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = make_cfg("config", ["data=sample", "mode=graph", f"train.amp={level}"])
    ms.set_seed(0)
    net = create_model(cfg.model, 72, 2)
    optimizer = build_optimizer(net, cfg, create_schedule(0.01, cfg.optim, 1, 10))
    scaler = loss_scaler(level)
    monkeypatch.chdir(tmp_path)
    step = make_step(cfg, mixed_precision(net, level), SoftmaxCrossEntropy(), optimizer, scaler)
    assert list(tmp_path.iterdir()) == []  # O1's rewritten source does not land in the user's folder
    x, y = _batch()

    # in place: a compiled graph keeps reading the parameter's memory, which set_data would replace
    ms.ops.assign(scaler.scale_value, ms.Tensor(2.0 ** 100, ms.float32))  # fp16 gradients overflow
    before = _weights(net)
    loss = float(step(x, y, 0).asnumpy())
    assert np.isfinite(loss)
    assert np.array_equal(_weights(net), before), "a step with inf gradients changed the weights"
    assert float(scaler.scale_value.asnumpy()) == 2.0 ** 99

    ms.ops.assign(scaler.scale_value, ms.Tensor(1024.0, ms.float32))
    step(x, y, 1)
    assert not np.array_equal(_weights(net), before), "a clean step left the weights alone"
    assert all(p.dtype == ms.float32 for p in net.trainable_params())  # master weights stay fp32


def test_a_mixed_precision_step_follows_the_fp32_step():
    """Same weights, same batch: the O2 loss is the fp32 loss to fp16 precision."""
    x, y = _batch()
    losses = {}
    for level in ("O0", "O2"):
        cfg = make_cfg("config", ["data=sample", "mode=pynative", "model.dropout=0"])
        ms.set_seed(0)
        net = create_model(cfg.model, 72, 2)
        optimizer = build_optimizer(net, cfg, create_schedule(0.01, cfg.optim, 1, 10))
        step = make_step(cfg, mixed_precision(net, level), SoftmaxCrossEntropy(), optimizer,
                         loss_scaler(level))
        losses[level] = float(step(x, y, 0).asnumpy())
    assert losses["O2"] == pytest.approx(losses["O0"], rel=1e-2)
    assert losses["O2"] != losses["O0"]  # it did compute in fp16


@pytest.mark.slow
def test_a_mixed_precision_run_saves_its_loss_scale_and_evaluates_in_fp32(sample_data, tmp_path):
    from xray.checkpoint import load_trained_model, read_checkpoint, read_state
    from xray.train import train

    run_dir = tmp_path / "amp"
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "train.amp=O2", "epochs=1",
                                     "train.keep_last=true", "train.eval_splits=[]", "train.cam_images=0"])
    result = train(cfg, run_dir)
    assert result["status"] == "ok" and np.isfinite(result["best_val"]["auc"])
    # the scale is part of the resumable state: 2^16 at the start, halved by any overflow
    scale = read_state(run_dir / "checkpoints" / "last.ckpt").run.loss_scale
    assert scale in [2.0 ** k for k in range(17)]
    assert json.loads((run_dir / "metrics.json").read_text())["hparams"]["amp"] == "O2"
    # fp32 master weights: the checkpoint serves the fp32 model of evaluation and predict
    model = load_trained_model(run_dir / "checkpoints" / "best.ckpt")
    params = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert {params[p.name].dtype for p in model.net.get_parameters()} == {ms.float32}


def _alive(name: str) -> int:
    """How many Parameter objects named `name` this process still holds."""
    import gc

    count = 0
    for obj in gc.get_objects():
        try:
            count += isinstance(obj, ms.Parameter) and obj.name == name
        except ReferenceError:  # (a weak proxy whose object is gone)
            pass
    return count


@pytest.mark.unit
def test_a_finished_training_lets_its_network_go():
    """Each training in one process (a multirun's members, the tests) builds a network of 0.2 GB
    and an optimizer as large; MindSpore keeps both of a compiled step alive until
    release_compiled (xray.train calls it when a run ends)."""
    cfg = make_cfg("config", TINY)
    x, y = _batch()
    release_compiled()
    before = _alive("fc1.weight")  # (networks other tests of this process still hold)
    for _ in range(2):
        net, _, _, _, step = build_training(cfg, 72, [5, 5], np.full(4, 0.01, np.float32))
        step(x, y, 0)
        assert _alive("fc1.weight") == before + 1
        del net, step
        release_compiled()
        assert _alive("fc1.weight") == before
