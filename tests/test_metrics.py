"""xray.metrics (hand-written numpy, see its docstring for why) against scikit-learn on random
data: AUC with ties, one class only, ROC, Youden's threshold, confusion matrices, two and three
classes; the bootstrap's CIs."""
import numpy as np
import pytest
from sklearn import metrics as sk

from xray.metrics import (binary_metrics, bootstrap_ci, confusion, roc_auc, roc_curve, sensitivity_threshold,
                          youden_threshold)

pytestmark = pytest.mark.unit


def data(seed, n=300, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + rng.normal(0.3, 0.25, n), 0, 1)
    return y, (np.round(p, 1) if ties else p)  # rounding makes many ties


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_roc_match_sklearn(seed, ties):
    y, p = data(seed, ties=ties)
    assert roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    fpr, tpr, thr = roc_curve(y, p)
    sk_fpr, sk_tpr, sk_thr = sk.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_maximizes_j_like_sklearn(seed):
    y, p = data(seed, ties=True)
    fpr, tpr, thr = sk.roc_curve(y, p, drop_intermediate=False)
    assert youden_threshold(y, p) == pytest.approx(thr[np.argmax(tpr - fpr)])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_sensitivity_threshold_is_the_highest_that_keeps_the_target(seed, target):
    """Against every candidate threshold (sklearn's ROC thresholds): the rule's threshold keeps
    sensitivity >= target, and no higher candidate does (so it is the most specific one)."""
    y, p = data(seed, ties=True)
    t = sensitivity_threshold(y, p, target)
    _, tpr, thr = sk.roc_curve(y, p, drop_intermediate=False)
    assert sk.recall_score(y, p >= t) >= target - 1e-12
    keeping = thr[tpr >= target - 1e-12]
    assert t == pytest.approx(keeping[np.isfinite(keeping)].max())


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.65])
def test_confusion_and_threshold_metrics_match_sklearn(threshold):
    y, p = data(7)
    pred = (p >= threshold).astype(int)
    np.testing.assert_array_equal(confusion(y, p, threshold), sk.confusion_matrix(y, pred, labels=[0, 1]))
    m = binary_metrics(y, p, threshold)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(sk.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(sk.precision_score(y, pred))
    assert m["npv"] == pytest.approx(sk.precision_score(y, pred, pos_label=0))


def test_one_class_only_gives_nan_auc_and_threshold_half():
    y, p = np.ones(20, int), np.linspace(0, 1, 20)
    assert np.isnan(roc_auc(y, p)) and np.isnan(roc_auc(1 - y, p))
    assert youden_threshold(y, p) == 0.5 and sensitivity_threshold(y, p, 0.95) == 0.5
    m = binary_metrics(y, p, 0.5)
    assert np.isnan(m["specificity"]) and m["sensitivity"] == pytest.approx(0.5)


def test_bootstrap_ci_covers_the_estimate_is_seeded_and_narrows_with_more_data():
    y, p = data(3, n=200)
    ci = bootstrap_ci(y, p, lambda yy, pp: {"auc": roc_auc(yy, pp)}, n=300, seed=1)
    assert ci == bootstrap_ci(y, p, lambda yy, pp: {"auc": roc_auc(yy, pp)}, n=300, seed=1)
    lo, hi = ci["auc"]
    assert lo < roc_auc(y, p) < hi and hi - lo < 0.2
    y4, p4 = data(3, n=800)
    lo4, hi4 = bootstrap_ci(y4, p4, lambda yy, pp: {"auc": roc_auc(yy, pp)}, n=300, seed=1)["auc"]
    assert (hi4 - lo4) < 0.7 * (hi - lo)  # ~ 1/sqrt(n): half as wide for 4x the data


@pytest.mark.parametrize("seed", range(3))
def test_k_class_metrics_match_sklearn(seed):
    from xray.metrics import confusion_k, multiclass_metrics
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    m = multiclass_metrics(y, probs, classes)
    pred = probs.argmax(1)
    np.testing.assert_array_equal(confusion_k(y, pred, 3), sk.confusion_matrix(y, pred, labels=[0, 1, 2]))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    recalls = sk.recall_score(y, pred, average=None)
    for c, name in enumerate(classes):
        assert m[f"auc_{name}"] == pytest.approx(sk.roc_auc_score(y == c, probs[:, c]))
        assert m[f"sensitivity_{name}"] == pytest.approx(recalls[c])
        assert m[f"specificity_{name}"] == pytest.approx(sk.recall_score(y != c, pred != c))


def test_a_patient_bootstrap_resamples_whole_patients_and_is_wider_when_their_images_agree():
    """40 patients of 9 images each, every image of a patient with the same label and score (as
    repeat X-rays of one child nearly are): resampling images treats them as 360 independent
    cases and gives a CI about sqrt(9) = 3 times too narrow; resampling patients (each drawn
    patient's 9 images together) gives the CI of 40 cases. A resample holds whole patients."""
    rng = np.random.default_rng(0)
    y_patient = np.r_[np.ones(20), np.zeros(20)].astype(int)
    p_patient = np.clip(0.25 * y_patient + rng.uniform(0.2, 0.8, 40), 0, 1)
    y, p = np.repeat(y_patient, 9), np.repeat(p_patient, 9)
    patients = np.repeat([f"person{i}" for i in range(40)], 9)
    seen = []

    def sensitivity(yy, pp):
        seen.append(np.unique(pp, return_counts=True)[1])  # (each patient's score is its own)
        return {"sensitivity": binary_metrics(yy, pp, 0.6)["sensitivity"]}

    by_patient = bootstrap_ci(y, p, sensitivity, n=400, seed=2, groups=patients)["sensitivity"]
    assert all(np.all(times % 9 == 0) for times in seen)  # a patient's 9 images together, 0, 9, 18... times
    assert np.mean([len(times) for times in seen[1:]]) < 30  # ~63 % of the 40 patients in a resample
    by_image = bootstrap_ci(y, p, sensitivity, n=400, seed=2)["sensitivity"]
    assert by_image[0] <= sensitivity(y, p)["sensitivity"] <= by_image[1]
    assert by_patient[1] - by_patient[0] > 2.3 * (by_image[1] - by_image[0])
    # one image per patient: the same resampling scheme as images (the CI of a comparable width)
    one_each = bootstrap_ci(y_patient, p_patient, sensitivity, n=400, seed=2, groups=np.arange(40))["sensitivity"]
    assert (one_each[1] - one_each[0]) == pytest.approx(by_patient[1] - by_patient[0], rel=0.35)
    assert bootstrap_ci(y, p, sensitivity, n=50, seed=5, groups=patients) == bootstrap_ci(
        y, p, sensitivity, n=50, seed=5, groups=patients)  # seeded
