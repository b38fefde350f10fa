"""Grad-CAM (Selvaraju et al. 2017) for the AlexNet, in MindSpore: where the model looked.

The map of class c is ReLU(sum_k w_k A_k), A = the last conv block's activations and w_k the
spatial mean of d score_c / d A_k, upsampled to the input and scaled to [0, 1]. At 96 px the
last conv block is 4 x 4 (13 x 13 at 227 px), so maps are coarse: they say which part of the
chest, not which rib.
"""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from PIL import Image



def grad_cam(net, batch: np.ndarray, classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Maps (N x S x S, in [0, 1]) for a float32 NxCxSxS batch of model inputs; `classes`:
    the class explained per image (default: class 1, the positive class whose probability a
    two-class model reports; with more classes, each image's top class)."""
    x = ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32))
    n, size = batch.shape[0], batch.shape[-1]
    net.set_train(False)
    activations = net.features(x)
    k = int(net.fc3.weight.shape[0])
    if classes is None:
        classes = [1] * n if k == 2 else net.classify(activations).asnumpy().argmax(axis=1).tolist()
    onehot = ms.Tensor(np.eye(k, dtype=np.float32)[list(classes)])

    def class_score(features):
        return (net.classify(features) * onehot).sum()

    gradients = ms.grad(class_score)(activations).asnumpy()
    a = activations.asnumpy()
    weights = gradients.mean(axis=(2, 3), keepdims=True)  # one weight per channel and image
    cams = np.maximum((weights * a).sum(axis=1), 0.0)
    out = np.zeros((n, size, size), np.float32)
    for i, cam in enumerate(cams):
        top = cam.max()
        if top > 0:
            up = Image.fromarray((cam / top).astype(np.float32), "F").resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.clip(np.asarray(up), 0.0, 1.0)
    return out


def cam_panel(net, tensors: np.ndarray, captions: Sequence[str], classes: Sequence[str]):
    """The figure TensorBoard shows each epoch: a fixed set of validation images with the
    current model's maps (of the positive class, or of the top class with more than two) and
    that class's probability."""
    from mindspore import ops

    net.set_train(False)
    probs = ops.softmax(net(ms.Tensor(tensors)), axis=1).asnumpy()
    shown = [1] * len(probs) if len(classes) == 2 else probs.argmax(axis=1).tolist()
    cams = grad_cam(net, tensors, shown)
    return cam_grid([("val", [(t, c, f"{cap}\np({classes[k].lower()}) {q[k]:.2f}")
                              for t, c, cap, q, k in zip(tensors, cams, captions, probs, shown)])])


def input_image(tensor: np.ndarray) -> np.ndarray:
    """A model input (CxSxS, normalized) back to a displayable SxS image in [0, 1]."""
    x = tensor[0]
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def cam_figure(tensor: np.ndarray, cam: np.ndarray, title: str):
    """The model's input with the map overlaid (jet, half transparent where it is weak)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.9), dpi=110)
    _overlay(ax, tensor, cam, title)
    fig.tight_layout()
    return fig


def cam_grid(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray, str]]]]):
    """One row of overlays per (row title, [(tensor, cam, caption), ...])."""
    import matplotlib.pyplot as plt

    width = max((len(items) for _, items in rows), default=1) or 1
    if width == 1 and len(rows) > 1:  # one image per row: side by side, the row title above it
        rows = [("", [(t, c, f"{title}\n{caption}") for t, c, caption in items]) for title, items in rows]
        rows = [("", [item for _, items in rows for item in items])]
        width = len(rows[0][1]) or 1
    fig, axes = plt.subplots(len(rows), width, figsize=(2.6 * width, 3.2 * len(rows)), dpi=100,
                             squeeze=False)
    for r, (row_title, items) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            if c < len(items):
                _overlay(ax, *items[c])
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(row_title, fontsize=9)
        if not items:
            axes[r][0].text(0.5, 0.5, f"{row_title}: none", ha="center", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def _overlay(ax, tensor: np.ndarray, cam: np.ndarray, title: str) -> None:
    ax.imshow(input_image(tensor), cmap="gray", vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.45 * np.clip(cam * 1.5, 0, 1), vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
