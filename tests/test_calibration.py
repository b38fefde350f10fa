"""xray.calibration's temperature fit: the known answer where there is one, the minimum of the
negative log-likelihood elsewhere; two classes and K."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from xray.calibration import (calibration_metrics, class_probabilities, ece, fit_temperature, nll, save_temperature,
                              scale, scale_probs, top_class)
from xray.errors import XrayError

pytestmark = pytest.mark.unit


def logit(p):
    return np.log(p / (1 - p))


def test_the_fit_finds_a_known_temperature():
    """p = 0.9 on images of which 75% are positive (and 0.1 where 25% are): the calibrated
    probability is 0.75, so sigmoid(logit(0.9) / T) = 0.75 gives T = logit(0.9) / logit(0.75) = 2."""
    y = np.r_[np.ones(750), np.zeros(250), np.ones(250), np.zeros(750)]
    p = np.r_[np.full(1000, 0.9), np.full(1000, 0.1)]
    assert fit_temperature(y, p) == pytest.approx(2.0, rel=1e-6)
    assert fit_temperature(y, scale(p, 1 / 3)) == pytest.approx(6.0, rel=1e-6)  # 3x over-confident


@pytest.mark.parametrize("seed", range(5))
def test_the_fit_is_the_minimum_of_the_negative_log_likelihood(seed):
    """At the fitted T the NLL's derivative in 1/T is zero: mean((scale(p, T) - y) * logit(p)) = 0
    (the likelihood equation of a logistic regression on logit(p) without intercept)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, 2000)
    y = (rng.random(2000) < q).astype(int)
    p = scale(q, rng.uniform(0.2, 5))
    t = fit_temperature(y, p)
    assert np.mean((scale(p, t) - y) * logit(p)) == pytest.approx(0, abs=1e-6)
    assert nll(y, scale(p, t)) < min(nll(y, scale(p, t * 1.01)), nll(y, scale(p, t / 1.01)))


def test_one_class_cannot_be_calibrated():
    with pytest.raises(XrayError, match="needs both classes"):
        fit_temperature(np.ones(10), np.linspace(0.1, 0.9, 10))


def softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def three_class(seed, n=4000, sharpen=3.0):
    """Labels drawn from known three-class probabilities, and those probabilities made
    `sharpen` times over-confident (logits x sharpen)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3)) * 1.5
    q = softmax(logits)
    y = (rng.random(n)[:, None] > np.cumsum(q, axis=1)).sum(axis=1)
    return y, q, softmax(logits * sharpen)


def test_k_class_temperature_is_softmax_of_log_p_over_t_and_two_classes_is_the_same_number():
    y, q, over = three_class(0, n=10)
    assert np.allclose(scale_probs(over, 3.0), q, atol=1e-9)  # log p = logits + const per image
    assert np.array_equal(scale_probs(over, None), over)  # no temperature: as trained
    p = np.random.default_rng(1).uniform(0.01, 0.99, 50)
    two = np.stack([1 - p, p], axis=1)
    assert np.allclose(scale_probs(two, 2.5)[:, 1], scale(p, 2.5)) and np.allclose(scale_probs(two, 2.5).sum(1), 1)


@pytest.mark.parametrize("seed", range(3))
def test_a_k_class_fit_finds_the_over_confidence_and_lowers_the_ece(seed):
    """Logits 3x too large: the fitted T is ~3; the NLL is at its minimum there, and the
    top-class ECE falls; the argmax (and so accuracy) does not change."""
    y, q, over = three_class(seed)
    t = fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(y, scale_probs(over, t)) < min(nll(y, scale_probs(over, t * 1.02)), nll(y, scale_probs(over, t / 1.02)))
    before, after = calibration_metrics(y, over), calibration_metrics(y, scale_probs(over, t))
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert np.array_equal(scale_probs(over, t).argmax(1), over.argmax(1))
    right, confidence = top_class(y, over)
    assert before["ece"] == ece(right, confidence) and confidence.min() >= 1 / 3
    # two classes as an Nx2 array: the same fit as of p(class 1)
    y2, p2 = (y > 0).astype(int), over[:, 1] + over[:, 2]
    assert fit_temperature(y2, np.stack([1 - p2, p2], 1)) == pytest.approx(fit_temperature(y2, p2), rel=1e-9)


def test_a_k_class_record_and_the_model_probabilities(tmp_path):
    """calibration.json of a three-class model says what the fit did on val; a model's class
    probabilities go through its temperature (none: as trained)."""
    y, _, over = three_class(4, n=600)
    t = fit_temperature(y, over)
    record = save_temperature(tmp_path, t, y, over, "best.ckpt")
    assert json.loads((tmp_path / "calibration.json").read_text()) == record
    assert record["classes"] == 3 and record["val_after"]["ece"] < record["val_before"]["ece"]
    model = SimpleNamespace(class_probabilities=lambda batch: over[batch], temperature=t)
    assert np.allclose(class_probabilities(model, np.arange(5)), scale_probs(over[:5], t))
    model.temperature = None
    assert np.array_equal(class_probabilities(model, np.arange(5)), over[:5])
    with pytest.raises(XrayError, match="two classes or more"):
        fit_temperature(np.zeros(10, int), over[:10])
