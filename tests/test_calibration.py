"""xray.calibration's temperature fit: the known answer where there is one, the minimum of the
negative log-likelihood elsewhere."""
import numpy as np
import pytest

from xray.calibration import fit_temperature, nll, scale
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
