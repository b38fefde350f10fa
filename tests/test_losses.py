"""xray.losses: each loss against its formula, class weights and label smoothing."""
import mindspore as ms
import numpy as np
import pytest

from xray.errors import XrayError
from xray.losses import SoftmaxCrossEntropy, SoftmaxMSE, class_weights

ms.set_device("CPU")


@pytest.mark.unit
def test_label_smoothing_matches_its_formula():
    logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = np.eye(2)[labels] * 0.9 + 0.05
    expected = -(target * logp).sum(1).mean()
    got = SoftmaxCrossEntropy(label_smoothing=0.1)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx(expected, rel=1e-5)
    p = np.exp(logp)
    got_mse = SoftmaxMSE(2, label_smoothing=0.1)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got_mse == pytest.approx(((p - target) ** 2).sum(1).mean(), rel=1e-5)


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
