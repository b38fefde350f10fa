"""AlexNet as nn.Cell: the seed's layers, with the normalisation after conv layers (the paper's
LRN, batch norm or none), the weight initialisation and dropout as switches."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, initializer

from xray.errors import XrayError
from xray.hparams import INITS, NORMS, with_current_model_keys
from xray.preprocess import MIN_IMAGE_SIZE
from xray.registry import MODELS


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
          has_bias: bool = True) -> nn.Conv2d:
    mode = "pad" if padding else "valid"
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, pad_mode=mode, padding=padding,
                     has_bias=has_bias)


class LocalResponseNorm(nn.Cell):
    """Across-channel LRN of the paper: b = a / (k + alpha * sum_{n neighbours} a^2)^beta.

    Written with plain ops because nn.LRN's backward fails on CPU in MindSpore 2.10 ("could not
    execute a primitive"), and with fast ones: the neighbour sum is a 1x1 convolution with a
    fixed band matrix, and the power is exp(-beta * log(.)). On this CPU that made the layer's
    forward + backward 5.5x faster than padding and five channel slices with pow and a
    division (Pad, StridedSlice, Pow and RealDiv have slow CPU kernels)."""

    def __init__(self, channels: int, size: int = 5, k: float = 2.0, alpha: float = 1e-4,
                 beta: float = 0.75) -> None:
        super().__init__()
        idx = np.arange(channels)
        band = np.abs(idx[:, None] - idx[None, :]) <= size // 2  # channel c sums c-2 .. c+2
        self.band = ms.Tensor(band.astype(np.float32)[:, :, None, None])  # a constant, not a weight
        self.k, self.alpha, self.beta = k, alpha, beta

    def construct(self, x):
        window = ops.conv2d(x * x, self.band)
        return x * ops.exp(-self.beta * ops.log(self.k + self.alpha * window))


class AlexNet(nn.Cell):
    """conv 96@11/4, 256@5, 384@3, 384@3, 256@3, overlapping max-pool 3/2, FC 4096-4096-classes.

    Adaptive average pooling to 6x6 before fc1 lets any input size >= 67 px work
    (227 gives exactly 6x6, as in the paper).

    Dropout (on fc1 and fc2) takes its masks as inputs, `net(x, mask1, mask2)`, drawn by the
    training loop from (seed, step) (see `dropout_masks`): a resumed run then draws exactly
    the masks an uninterrupted one would, which a stateful random op cannot restore.
    `net(x)` is the network at inference."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, norm: str = "lrn",
                 init: str = "mindspore") -> None:
        super().__init__()
        if norm not in NORMS or init not in INITS:
            raise ValueError(f"norm={norm!r} (one of {NORMS}), init={init!r} (one of {INITS})")

        def block(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
                  lrn: bool = False) -> list[nn.Cell]:
            """conv, [batch norm], ReLU, [LRN]: batch norm makes the conv's bias redundant."""
            layers = [_conv(in_ch, out_ch, kernel, stride, padding, has_bias=norm != "batch")]
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU())
            if norm == "lrn" and lrn:
                layers.append(LocalResponseNorm(out_ch, size=5, k=2.0, alpha=1e-4, beta=0.75))
            return layers

        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        self.features = nn.SequentialCell(
            [*block(in_channels, 96, 11, stride=4, lrn=True), pool(),
             *block(96, 256, 5, padding=2, lrn=True), pool(),
             *block(256, 384, 3, padding=1),
             *block(384, 384, 3, padding=1),
             *block(384, 256, 3, padding=1)]
        )  # ends with the last conv block's activations: what Grad-CAM explains
        self.pool = pool()
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Dense(256 * 6 * 6, 4096)
        self.fc2 = nn.Dense(4096, 4096)
        self.fc3 = nn.Dense(4096, num_classes)
        self.relu = nn.ReLU()
        if init == "he":
            self._he_init()

    def _he_init(self) -> None:
        """He normal with the ReLU gain (std sqrt(2 / fan_in)) for the layers ReLU follows, zero
        biases; fc3, which feeds the softmax, keeps the default."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, (nn.Conv2d, nn.Dense)) and cell is not self.fc3:
                cell.weight.set_data(initializer(HeNormal(mode="fan_in", nonlinearity="relu"),
                                                 cell.weight.shape, cell.weight.dtype))
                if cell.bias is not None:
                    cell.bias.set_data(initializer("zeros", cell.bias.shape, cell.bias.dtype))

    def construct(self, x, mask1=None, mask2=None):
        return self.classify(self.features(x), mask1, mask2)

    def classify(self, features, mask1=None, mask2=None):
        """Logits from the last conv block's activations (`self.features(x)`)."""
        x = self.relu(self.fc1(self.flatten(self.avgpool(self.pool(features)))))
        if mask1 is not None:
            x = x * mask1
        x = self.relu(self.fc2(x))
        if mask2 is not None:
            x = x * mask2
        return self.fc3(x)


def dropout_masks(p: float, batch: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverted-dropout masks for fc1 and fc2 of one training step: 0 with probability p,
    else 1/(1-p); a function of (seed, step) only. p = 0 gives masks of ones."""
    if p <= 0:
        ones = np.ones((batch, 4096), np.float32)
        return ones, ones
    rng = np.random.default_rng([int(seed), int(step), 1])
    keep = rng.random((2, batch, 4096)) >= p
    masks = keep.astype(np.float32) / np.float32(1 - p)
    return masks[0], masks[1]


@MODELS.register("alexnet")
def alexnet(cfg, image_size: int, num_classes: int) -> AlexNet:
    """AlexNet from the model config group (cfg.model) for an input size."""
    if image_size < MIN_IMAGE_SIZE:
        raise XrayError(f"data.image_size={image_size} is too small for AlexNet "
                        f"(its pooling needs >= {MIN_IMAGE_SIZE} px)")
    if cfg.in_channels not in (1, 3):
        raise XrayError(f"model.in_channels={cfg.in_channels} must be 1 or 3")
    if not 0 <= cfg.dropout < 1:
        raise XrayError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    model = with_current_model_keys(dict(cfg))  # (a checkpoint of before model.norm records model.lrn)
    norm, init = model["norm"], model["init"]
    if norm not in NORMS:
        raise XrayError(f"model.norm={norm} is not one of {', '.join(NORMS)}")
    if init not in INITS:
        raise XrayError(f"model.init={init} is not one of {', '.join(INITS)}")
    return AlexNet(num_classes, cfg.in_channels, norm, init)
