"""Load a trained model with everything needed to feed it: the run's config and preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf

from xray.errors import XrayError
from xray.labels import POSITIVE
from xray.model import build_model
from xray.preprocess import Preprocess


@dataclass
class TrainedModel:
    net: nn.Cell
    cfg: DictConfig  # the training run's resolved config
    spec: Preprocess  # how its inputs were made
    run_dir: Path
    checkpoint: Path

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """p(pneumonia) for a float32 NxCxSxS batch made by preprocess.to_tensor."""
        logits = self.net(ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return ops.softmax(logits, axis=1)[:, POSITIVE].asnumpy()


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/best.ckpt -> <run>; a checkpoint beside its config.yaml -> its folder."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def load_trained_model(checkpoint: Path) -> TrainedModel:
    """Rebuild the network from the run's config.yaml and load the weights (eval mode)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.ckpt"
    if not checkpoint.is_file():
        raise XrayError(f"ckpt={checkpoint} not found; pass a .ckpt file, e.g. "
                        "outputs/train/<run>/checkpoints/best.ckpt")
    run_dir = run_dir_of(checkpoint)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise XrayError(f"{config} not found; ckpt must sit in a training run folder "
                        "(<run>/checkpoints/*.ckpt) or beside that run's config.yaml")
    cfg = OmegaConf.load(config)
    spec = Preprocess(**cfg.preprocess)
    net = build_model(cfg.model, spec.image_size)
    try:
        params = ms.load_checkpoint(str(checkpoint))
    except (RuntimeError, ValueError) as e:
        raise XrayError(f"ckpt={checkpoint} is not a readable MindSpore checkpoint ({e})") from None
    missing, _ = ms.load_param_into_net(net, params)
    if missing:
        raise XrayError(f"ckpt={checkpoint} does not match the model in {config} "
                        f"(missing {len(missing)} parameters, e.g. {missing[0]})")
    net.set_train(False)
    return TrainedModel(net, cfg, spec, run_dir, checkpoint)
