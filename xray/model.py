"""AlexNet as nn.Cell: the seed's layers plus the paper's LRN and dropout as switches."""
from __future__ import annotations

from mindspore import nn, ops

from xray.errors import XrayError
from xray.preprocess import MIN_IMAGE_SIZE


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    mode = "pad" if padding else "valid"
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, pad_mode=mode, padding=padding,
                     has_bias=True)


class LocalResponseNorm(nn.Cell):
    """Across-channel LRN of the paper: b = a / (k + alpha * sum_{n neighbours} a^2)^beta.

    Written with plain ops because nn.LRN's backward fails on CPU in MindSpore 2.10
    ("could not execute a primitive")."""

    def __init__(self, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75) -> None:
        super().__init__()
        self.size, self.k, self.alpha, self.beta = size, k, alpha, beta

    def construct(self, x):
        channels = x.shape[1]
        half = self.size // 2
        sq = ops.pad(x * x, (0, 0, 0, 0, half, half))  # zero-pad the channel axis
        window = sq[:, 0:channels]
        for i in range(1, self.size):
            window = window + sq[:, i:i + channels]
        return x / ops.pow(self.k + self.alpha * window, self.beta)


class AlexNet(nn.Cell):
    """conv 96@11/4, 256@5, 384@3, 384@3, 256@3, overlapping max-pool 3/2, FC 4096-4096-classes.

    Adaptive average pooling to 6x6 before fc1 lets any input size >= 67 px work
    (227 gives exactly 6x6, as in the paper)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, lrn: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__()

        def norm() -> list[nn.Cell]:
            return [LocalResponseNorm(size=5, k=2.0, alpha=1e-4, beta=0.75)] if lrn else []

        def drop() -> list[nn.Cell]:
            return [nn.Dropout(p=dropout)] if dropout > 0 else []

        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        self.features = nn.SequentialCell(
            [_conv(in_channels, 96, 11, stride=4), nn.ReLU(), *norm(), pool(),
             _conv(96, 256, 5, padding=2), nn.ReLU(), *norm(), pool(),
             _conv(256, 384, 3, padding=1), nn.ReLU(),
             _conv(384, 384, 3, padding=1), nn.ReLU(),
             _conv(384, 256, 3, padding=1), nn.ReLU(), pool()]
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.flatten = nn.Flatten()
        self.classifier = nn.SequentialCell(
            [nn.Dense(256 * 6 * 6, 4096), nn.ReLU(), *drop(),
             nn.Dense(4096, 4096), nn.ReLU(), *drop(),
             nn.Dense(4096, num_classes)]
        )

    def construct(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def build_model(cfg, image_size: int) -> AlexNet:
    """The model from its config group (cfg.model) for a given input size."""
    if cfg.name != "alexnet":
        raise XrayError(f"model.name={cfg.name} is unknown; use alexnet")
    if image_size < MIN_IMAGE_SIZE:
        raise XrayError(f"data.image_size={image_size} is too small for AlexNet "
                        f"(its pooling needs >= {MIN_IMAGE_SIZE} px)")
    if cfg.in_channels not in (1, 3):
        raise XrayError(f"model.in_channels={cfg.in_channels} must be 1 or 3")
    return AlexNet(cfg.num_classes, cfg.in_channels, cfg.lrn, cfg.dropout)
