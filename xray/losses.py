"""Losses on the K logits (K = the task's classes), registered by their loss.name. Targets are
always integer class ids from xray.labels."""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
from mindspore import nn, ops

from xray.errors import XrayError
from xray.registry import LOSSES


class SoftmaxCrossEntropy(nn.Cell):
    """-log softmax(logits)[y], optionally class-weighted (weighted mean over the batch) and
    label-smoothed (target (1 - s) onehot + s / classes)."""

    def __init__(self, class_weights: Optional[Sequence[float]] = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        weight = ms.Tensor(class_weights, ms.float32) if class_weights is not None else None
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=float(label_smoothing))

    def construct(self, logits, labels):
        return self.ce(logits, labels)


class SoftmaxMSE(nn.Cell):
    """sum_c (softmax(logits)_c - onehot(y)_c)^2, averaged over the batch (weighted mean if
    class-weighted; label smoothing as for cross-entropy). Bounded in [0, 2]; its gradient vanishes when the softmax saturates,
    which is why it learns more slowly than cross-entropy."""

    def __init__(self, num_classes: int, class_weights: Optional[Sequence[float]] = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.on = 1.0 - label_smoothing + label_smoothing / num_classes
        self.off = label_smoothing / num_classes
        weights = class_weights if class_weights is not None else [1.0] * num_classes
        self.weights = ms.Tensor(weights, ms.float32)

    def construct(self, logits, labels):
        probs = ops.softmax(logits, axis=1)
        target = ops.one_hot(labels, self.num_classes, ms.Tensor(self.on, ms.float32),
                             ms.Tensor(self.off, ms.float32))
        per_sample = ((probs - target) ** 2).sum(axis=1)
        w = ops.gather(self.weights, labels, 0)
        return (per_sample * w).sum() / w.sum()


def class_weights(class_counts: Sequence[int]) -> list[float]:
    """n / (C * n_c): each class contributes equally to the loss."""
    total, k = float(sum(class_counts)), len(class_counts)
    if min(class_counts) == 0:
        raise XrayError(f"class counts {list(class_counts)} contain an empty class; "
                        "set loss.class_weighted=false")
    return [total / (k * c) for c in class_counts]


@LOSSES.register("softmax_ce")
def softmax_ce(num_classes: int, weights: Optional[Sequence[float]], label_smoothing: float) -> nn.Cell:
    return SoftmaxCrossEntropy(weights, label_smoothing)


@LOSSES.register("mse")
def mse(num_classes: int, weights: Optional[Sequence[float]], label_smoothing: float) -> nn.Cell:
    return SoftmaxMSE(num_classes, weights, label_smoothing)
