import mindspore as ms
import numpy as np
import pytest

from conftest import make_cfg
from xray.errors import XrayError
from xray.losses import SoftmaxCrossEntropy, SoftmaxMSE, class_weights
from xray.model import AlexNet, LocalResponseNorm, dropout_masks
from xray.registry import create_model

ms.set_device("CPU")


@pytest.mark.unit
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
def test_switches_change_the_layers():
    layers = lambda net: [type(c).__name__ for _, c in net.cells_and_names()]  # noqa: E731
    assert layers(AlexNet(lrn=True)).count("LocalResponseNorm") == 2
    assert "LocalResponseNorm" not in layers(AlexNet(lrn=False))


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


@pytest.mark.unit
def test_dropout_masks_drop_units_in_training_only():
    net = AlexNet(lrn=False)
    x = ms.Tensor(np.random.rand(2, 1, 96, 96).astype(np.float32))
    m1, m2 = dropout_masks(0.5, 2, seed=0, step=0)
    zeros = np.zeros_like(m1)
    dropped = net(x, ms.Tensor(zeros), ms.Tensor(m2)).asnumpy()
    bias_only = net.fc3(net.relu(net.fc2(ms.Tensor(zeros))) * ms.Tensor(m2)).asnumpy()  # fc1 dropped
    np.testing.assert_allclose(dropped, bias_only, rtol=1e-5, atol=1e-6)
    assert not np.allclose(net(x).asnumpy(), dropped)


@pytest.mark.unit
def test_inference_is_deterministic():
    net = AlexNet(lrn=False)
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


@pytest.mark.unit
def test_softmax_mse_is_mse_of_probabilities_and_one_hot():
    logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(2)[labels]
    expected = ((p - onehot) ** 2).sum(1).mean()
    got = SoftmaxMSE(2)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx(expected, rel=1e-5)
    w = [0.5, 2.0]
    per = ((p - onehot) ** 2).sum(1) * np.array(w)[labels]
    got_w = SoftmaxMSE(2, w)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got_w == pytest.approx(per.sum() / np.array(w)[labels].sum(), rel=1e-5)


@pytest.mark.unit
def test_cross_entropy_and_class_weights():
    logits = np.array([[2.0, -1.0], [0.5, 0.5]], np.float32)
    labels = np.array([0, 1], np.int32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[[0, 1], labels].mean()
    got = SoftmaxCrossEntropy()(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx(expected, rel=1e-5)
    assert class_weights([1000, 3000]) == pytest.approx([2.0, 2 / 3])
    with pytest.raises(XrayError, match="empty class"):
        class_weights([0, 10])


@pytest.mark.unit
def test_the_losses_and_class_weights_for_three_classes():
    logits = np.array([[2.0, -1.0, 0.5], [0.5, 0.5, 0.5], [-3.0, 1.0, 2.0], [0.0, 1.0, -1.0]], np.float32)
    labels = np.array([0, 1, 2, 2], np.int32)
    w, s = [0.5, 2.0, 1.0], 0.1
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = (1 - s) * np.eye(3)[labels] + s / 3  # label smoothing spreads s over the K classes
    weight = np.array(w)[labels]
    # cross-entropy weights each class's term by its own weight (PyTorch's and MindSpore's
    # convention), averaged over the weights of the targets
    ce = (1 - s) * weight * -np.log(p[np.arange(4), labels]) + s / 3 * -(np.log(p) * w).sum(1)
    got = SoftmaxCrossEntropy(w, label_smoothing=s)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx(ce.sum() / weight.sum(), rel=1e-5)
    mse = ((p - target) ** 2).sum(1)
    got = SoftmaxMSE(3, w, label_smoothing=s)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx((mse * weight).sum() / weight.sum(), rel=1e-5)
    assert class_weights([1200, 2000, 1100]) == pytest.approx([4300 / 3600, 4300 / 6000, 4300 / 3300])


@pytest.mark.unit
def test_gpu_requested_on_a_node_without_one_fails_fast():
    """device_target=GPU must never fall back to training on the CPU silently."""
    import mindspore as ms
    from xray.device import setup_device
    if ms.hal.is_available("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(XrayError, match="device_target=GPU but MindSpore cannot see a GPU"):
        setup_device("GPU")
    with pytest.raises(XrayError, match="device_target=TPU is unknown"):
        setup_device("TPU")
    setup_device("cpu")  # case-insensitive, and CPU always works


@pytest.mark.unit
def test_xray_steers_onednn_to_its_fast_cpu_kernels():
    """MindSpore 2.10's oneDNN runs convolutions ~100x slower on AVX-512/AMX CPUs unless limited
    to AVX2 (the speed is the bench's job; here: the setting is made, and a user's value wins)."""
    import os
    import subprocess
    import sys
    code = "import xray, os; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "AVX2"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "AVX512_CORE"


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


def test_a_checkpoint_loads_when_free_memory_is_all_page_cache(tmp_path, monkeypatch):
    """MindSpore 2.10 compares a checkpoint's size with *free* memory, which is near zero on a
    node whose page cache is full (CI, after writing ~10 GB of checkpoints): it refused a
    230 MB checkpoint with 20 GB available. Loading must judge by MemAvailable."""
    import os

    from mindspore.train import serialization

    from xray.checkpoint import memory_available, read_checkpoint
    if memory_available() is None:
        pytest.skip("no /proc/meminfo")
    own = serialization._get_available_memory  # undo an earlier read_checkpoint's patch
    monkeypatch.setattr(serialization, "_get_available_memory", getattr(own, "mindspore_own", own))
    path = tmp_path / "dense.ckpt"
    ms.save_checkpoint(ms.nn.Dense(64, 64), str(path))
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    with pytest.raises(ValueError, match="available memory"):
        ms.load_checkpoint(str(path))  # MindSpore's own reading: one free page
    assert read_checkpoint(path)["weight"].shape == (64, 64)
