import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from omegaconf import OmegaConf

from helpers import make_cfg
from xray.checks import TRAIN, check
from xray.errors import XrayError
from xray.model import AlexNet, LocalResponseNorm, dropout_masks
from xray.registry import create_model

ms.set_device("CPU")


@pytest.mark.parametrize("in_channels", [1, 3])
def test_227_px_gives_the_papers_6x6_map_and_smaller_inputs_are_pooled_to_it(in_channels):
    net = AlexNet(num_classes=3, in_channels=in_channels)
    net.set_train(False)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.random((2, in_channels, 227, 227), np.float32))
    assert net.pool(net.features(x)).shape == (2, 256, 6, 6)  # the paper's layers, unpadded conv1
    x = ms.Tensor(rng.random((2, in_channels, 96, 96), np.float32))
    assert net.pool(net.features(x)).shape == (2, 256, 1, 1)  # adaptive pooling repeats it to 6x6
    logits = net(x).asnumpy()
    assert logits.shape == (2, 3) and not np.allclose(logits[0], logits[1])


@pytest.mark.unit
def test_dropout_masks_come_from_seed_and_step():
    a1, a2 = dropout_masks(0.5, 8, seed=1, step=3)
    b1, _ = dropout_masks(0.5, 8, seed=1, step=3)
    c1, _ = dropout_masks(0.5, 8, seed=1, step=4)
    assert a1.shape == a2.shape == (8, 4096) and a1.dtype == np.float32
    assert set(np.unique(a1)) == {0.0, 2.0} and 0.45 < (a1 == 0).mean() < 0.55
    assert np.array_equal(a1, b1) and not np.array_equal(a1, c1) and not np.array_equal(a1, a2)
    ones, _ = dropout_masks(0.0, 8, seed=1, step=3)
    assert np.all(ones == 1.0)


def test_dropout_masks_drop_units_in_training_only():
    net = AlexNet(norm="none")
    x = ms.Tensor(np.random.rand(2, 1, 96, 96).astype(np.float32))
    m1, m2 = dropout_masks(0.5, 2, seed=0, step=0)
    zeros = np.zeros_like(m1)
    dropped = net(x, ms.Tensor(zeros), ms.Tensor(m2)).asnumpy()
    bias_only = net.fc3(net.relu(net.fc2(ms.Tensor(zeros))) * ms.Tensor(m2)).asnumpy()  # fc1 dropped
    np.testing.assert_allclose(dropped, bias_only, rtol=1e-5, atol=1e-6)
    assert not np.allclose(net(x).asnumpy(), dropped)


@pytest.mark.unit
def test_inference_is_deterministic():
    net = AlexNet(norm="none")
    x = ms.Tensor(np.random.rand(2, 1, 96, 96).astype(np.float32))
    net.set_train(False)
    assert np.array_equal(net(x).asnumpy(), net(x).asnumpy())


@pytest.mark.unit
def test_lrn_is_the_papers_formula():
    """b_c = a_c / (k + alpha * sum_{|c'-c|<=2} a_c'^2)^beta, computed here in numpy."""
    a = np.random.rand(2, 16, 5, 5).astype(np.float32) * 30
    ours = LocalResponseNorm(16, size=5, k=2.0, alpha=1e-4, beta=0.75)(ms.Tensor(a)).asnumpy()
    expected = np.empty_like(a)
    for c in range(16):
        window = (a[:, max(0, c - 2):c + 3] ** 2).sum(axis=1)
        expected[:, c] = a[:, c] / (2.0 + 1e-4 * window) ** 0.75
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert not np.allclose(ours, a)  # it does normalize


@pytest.mark.unit
def test_too_small_input_is_a_config_error():
    cfg = make_cfg("config", ["data=sample"])
    with pytest.raises(XrayError, match="image_size=64 is too small"):
        create_model(cfg.model, 64, 2)
    net = create_model(cfg.model, 67, 2)
    net.set_train(False)
    assert net(ms.Tensor(np.zeros((1, 1, 67, 67), np.float32))).shape == (1, 2)







def test_training_steps_apply_dropout_and_inference_does_not():
    """The step the training loop runs draws its masks: the same batch and weights give another
    loss with dropout on than off (a loop that forgot the masks would not)."""
    from xray.losses import SoftmaxCrossEntropy
    from xray.registry import create_schedule
    from xray.step import build_optimizer, make_step
    x = ms.Tensor(np.random.default_rng(0).normal(size=(4, 1, 72, 72)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1, 0, 1], np.int32))
    losses = {}
    for p in (0.0, 0.5):
        cfg = make_cfg("config", ["data=sample", f"model.dropout={p}", "mode=pynative", "lr=1e-9"])
        ms.set_seed(0)
        net = create_model(cfg.model, 72, 2)
        step = make_step(cfg, net, SoftmaxCrossEntropy(), build_optimizer(net, cfg, create_schedule(1e-9, cfg.optim, 1, 1)))
        losses[p] = float(step(x, y, 0).asnumpy())
    assert losses[0.0] != pytest.approx(losses[0.5], abs=1e-6)


@pytest.mark.unit
def test_norm_switch_changes_the_layers():
    layers = lambda net: [type(c).__name__ for c in net.features.cells()]  # noqa: E731
    conv_relu = ["Conv2d", "ReLU"]
    assert layers(AlexNet(norm="lrn")) == [*conv_relu, "LocalResponseNorm", "MaxPool2d", *conv_relu,
                                           "LocalResponseNorm", "MaxPool2d", *conv_relu * 3]
    assert layers(AlexNet(norm="none")) == [*conv_relu, "MaxPool2d", *conv_relu, "MaxPool2d", *conv_relu * 3]
    batch = AlexNet(norm="batch")
    assert layers(batch).count("BatchNorm2d") == 5 and layers(batch)[:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert all(cell.bias is None for cell in batch.features.cells() if isinstance(cell, nn.Conv2d))


@pytest.mark.unit
def test_a_model_config_of_before_model_norm_builds_what_it_trained():
    """Checkpoints and config.yaml files of older runs record model.lrn (true | false)."""
    cfg = make_cfg("config", ["data=sample"]).model
    old = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("norm", "init")})
    for lrn, norm in ((True, "lrn"), (False, "none")):
        old.lrn = lrn
        net = create_model(old, 72, 2)
        assert [type(c).__name__ for c in net.features.cells()] == \
            [type(c).__name__ for c in AlexNet(norm=norm).features.cells()]


@pytest.mark.unit
@pytest.mark.parametrize("key,value", [("model.norm", "layer"), ("model.init", "xavier")])
def test_an_unknown_norm_or_init_is_one_line(key, value):
    with pytest.raises(XrayError, match=f"{key}={value} must be one of"):
        check(make_cfg("config", ["data=sample", f"{key}={value}"]), TRAIN)


@pytest.mark.unit
def test_he_init_gives_relu_layers_the_he_variance_and_zero_biases():
    ms.set_seed(0)
    net = AlexNet(norm="none", init="he")
    for cell in (net.features[3], net.fc1, net.fc2):  # conv2 (256 x 96 x 5 x 5), the hidden dense layers
        weight = cell.weight.asnumpy()
        fan_in = np.prod(weight.shape[1:])
        assert weight.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.02)
        assert np.all(cell.bias.asnumpy() == 0)
    default = AlexNet(norm="none").fc1.weight.asnumpy()  # HeUniform(sqrt(5)): std 1/sqrt(3 fan_in)
    assert default.std() == pytest.approx(1 / np.sqrt(3 * 256 * 36), rel=0.02)
    assert net.fc3.weight.asnumpy().std() == pytest.approx(1 / np.sqrt(3 * 4096), rel=0.05)  # fc3: default
