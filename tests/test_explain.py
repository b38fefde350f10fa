"""Grad-CAM sanity checks that a wrong implementation fails (shape and range, a model that
learned where a bright square is looks at the square, re-initialised weights give other maps)
and calibration (ECE, temperature scaling) against hand-made cases."""
import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from helpers import SAMPLE
from xray.calibration import brier, ece, fit_temperature, nll, scale
from xray.checkpoint import load_trained_model
from xray.evaluate import evaluate
from xray.explain import grad_cam
from xray.losses import SoftmaxCrossEntropy
from xray.metrics import roc_auc
from xray.model import AlexNet, dropout_masks
from xray.predict import predict_images
from xray.preprocess import preprocess_file

ms.set_device("CPU")
SIZE, SQUARE = 96, 20


def squares(n, seed):
    """Noise images; label 1 = a bright SQUARE x SQUARE square somewhere. Returns (x, y, corners)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    corners = rng.integers(0, SIZE - SQUARE, (n, 2))
    for i in np.flatnonzero(y):
        r, c = corners[i]
        x[i, 0, r:r + SQUARE, c:c + SQUARE] += 2.0
    return x, y, corners


@pytest.fixture(scope="module")
def square_model():
    """AlexNet trained for 90 steps of 16 to tell images with a square from images without."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    net, loss_fn = AlexNet(norm="none"), SoftmaxCrossEntropy()
    optimizer = nn.Momentum(net.trainable_params(), 0.01, 0.9)

    def forward(x, y, m1, m2):
        return loss_fn(net(x, m1, m2), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    @ms.jit
    def step(x, y, m1, m2):
        loss, grads = grad_fn(x, y, m1, m2)
        optimizer(grads)
        return loss

    net.set_train(True)
    for s in range(90):
        x, y, _ = squares(16, seed=100 + s)
        step(ms.Tensor(x), ms.Tensor(y), *(ms.Tensor(m) for m in dropout_masks(0.5, 16, 0, s)))
    net.set_train(False)
    return net


def test_maps_have_the_input_size_and_lie_in_0_1(trained_run):
    model = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    images = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]
    batch = np.stack([preprocess_file(f, model.spec) for f in images])
    cams = grad_cam(model.net, batch)
    size = model.spec.image_size
    assert cams.shape == (3, size, size) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert all(c.max() == pytest.approx(1.0) or c.max() == 0 for c in cams)  # each scaled to its peak


@pytest.mark.slow
def test_a_model_that_learned_the_square_looks_at_it(square_model):
    x, y, corners = squares(60, seed=1)
    p = ms.ops.softmax(square_model(ms.Tensor(x)), axis=1).asnumpy()[:, 1]
    assert ((p >= 0.5) == y).mean() >= 0.9  # it did learn the task
    cams = grad_cam(square_model, x[y == 1])
    margin = 12  # half a cell of the 4 x 4 map the last conv block has at 96 px
    hits = []
    for cam, (r, c) in zip(cams, corners[y == 1]):
        pr, pc = np.unravel_index(cam.argmax(), cam.shape)
        hits.append(r - margin <= pr < r + SQUARE + margin and c - margin <= pc < c + SQUARE + margin)
    assert np.mean(hits) >= 0.8, np.mean(hits)


@pytest.mark.slow
def test_maps_of_reinitialised_weights_are_different(square_model):
    """Adebayo et al.'s model-randomisation check. On images without a square the trained
    model finds no evidence for "square" anywhere (empty maps); a re-initialised network's maps
    are not empty there, and on images with a square they are not the trained ones either.
    (Its maps still lean towards the square: a bright patch drives any network's activations,
    so Grad-CAM is partly input-driven -- read the maps as where the evidence can be.)"""
    x, y, _ = squares(40, seed=2)
    ms.set_seed(123)
    random_net = AlexNet(norm="none")
    random_net.set_train(False)
    trained_neg, random_neg = grad_cam(square_model, x[y == 0]), grad_cam(random_net, x[y == 0])
    assert np.mean([c.max() == 0 for c in trained_neg]) >= 0.9
    assert np.mean([c.max() > 0 for c in random_neg]) >= 0.9
    trained, random = grad_cam(square_model, x[y == 1]), grad_cam(random_net, x[y == 1])
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(trained, random)
            if a.std() > 0 and b.std() > 0]
    assert np.mean(corr) < 0.9 and np.mean(np.abs(trained - random)) > 0.05


@pytest.mark.unit
def test_ece_brier_nll_on_hand_made_cases():
    y = np.array([0, 0, 1, 1])
    assert ece(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert ece(y, np.full(4, 0.5)) == 0.0  # one bin: mean p 0.5, observed 0.5
    assert ece(y, np.array([0.9, 0.9, 0.9, 0.9])) == pytest.approx(0.4)
    assert brier(y, np.array([0.0, 0.5, 0.5, 1.0])) == pytest.approx(0.125)
    assert nll(y, np.full(4, 0.5)) == pytest.approx(np.log(2))


@pytest.mark.unit
def test_temperature_scaling_repairs_an_overconfident_model():
    rng = np.random.default_rng(0)
    q = rng.uniform(0.05, 0.95, 4000)  # the true probabilities
    y = (rng.random(4000) < q).astype(int)
    overconfident = scale(q, 1 / 4)  # logits 4x too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(4.0, rel=0.15)
    after = scale(overconfident, t)
    assert ece(y, after) < ece(y, overconfident) / 3 and nll(y, after) < nll(y, overconfident)
    assert roc_auc(y, after) == pytest.approx(roc_auc(y, overconfident))  # monotonic: ranking kept


@pytest.mark.slow
def test_evaluate_calibrates_explains_and_predict_applies_the_temperature(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # the shared run stays uncalibrated
    ckpt = run / "checkpoints" / "best.ckpt"
    raw = predict_images([load_trained_model(ckpt)], sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[:3])
    result = evaluate([ckpt], "test", bootstrap=0, workers=1, calibrate=True, explain=2)
    record = json.loads((run / "calibration.json").read_text())
    t = record["temperature"]
    assert t > 0 and record["fitted_on"] == "val" and record["checkpoint"] == str(ckpt)
    assert record["val_after"]["nll"] <= record["val_before"]["nll"] + 1e-9
    assert result["calibration"]["temperature"] == t and "ece" in result["calibration"]
    for name in ("reliability_test.png", "cam_errors_test.png"):
        assert (run / name).stat().st_size > 0
    model = load_trained_model(ckpt)
    assert model.temperature == t
    now = predict_images([model], [Path(r["file"]) for r in raw])
    for before, after in zip(raw, now):
        assert after["p_pneumonia"] == pytest.approx(float(scale(before["p_pneumonia"], t)), abs=1e-6)
    assert load_trained_model(run / "checkpoints" / "last.ckpt").temperature is None  # not its own


@pytest.mark.slow
def test_predict_explain_writes_a_map_beside_the_plot(trained_run, tmp_path):
    model = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    image = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    predict_images([model], [image], plot_dir=tmp_path, explain_dir=tmp_path)
    assert (tmp_path / f"{image.stem}.png").stat().st_size > 0
    assert (tmp_path / f"{image.stem}_cam.png").stat().st_size > 0
