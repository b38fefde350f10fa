"""Load a trained model with everything needed to feed it: the run's config and preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf

from xray.calibration import load_temperature, scale
from xray.errors import XrayError
from xray.labels import CLASSES, task_classes
from xray.model import build_model
from xray.preprocess import Preprocess


def memory_available() -> Optional[int]:
    """Bytes the kernel can hand out now (MemAvailable: free + reclaimable page cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_checkpoint(path: Path) -> dict:
    """ms.load_checkpoint, judged against the memory that is really available.

    MindSpore 2.10 refuses a checkpoint larger than *free* memory (sysconf SC_AVPHYS_PAGES),
    which leaves out the page cache: on a node that has just written a few checkpoints that is
    a few hundred MB, and a 230 MB AlexNet checkpoint "exceeds current available memory"
    with 20 GB to spare. Ask for MemAvailable instead (MindSpore's own reading where there
    is no /proc/meminfo)."""
    from mindspore.train import serialization
    own = getattr(serialization, "_get_available_memory", None)
    if own is not None and not getattr(own, "reads_mem_available", False):
        def available() -> Optional[int]:
            return memory_available() or own()
        available.reads_mem_available = True
        available.mindspore_own = own
        serialization._get_available_memory = available
    return ms.load_checkpoint(str(path))


@dataclass
class TrainedModel:
    net: nn.Cell
    cfg: DictConfig  # the training run's resolved config
    spec: Preprocess  # how its inputs were made
    run_dir: Path
    checkpoint: Path
    temperature: Optional[float] = None  # from calibration.json beside the checkpoint
    classes: tuple[str, ...] = CLASSES  # the task's classes, in the order of the logits

    @property
    def task(self) -> str:
        return str(OmegaConf.select(self.cfg, "task.name", default="binary"))

    def class_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """NxK softmax for a float32 NxCxSxS batch made by preprocess.model_input; for
        NxVxCxSxS (V test-time views per image) the mean over the views."""
        views = batch.shape[1] if batch.ndim == 5 else 1
        flat = batch.reshape(-1, *batch.shape[-3:])
        logits = self.net(ms.Tensor(np.ascontiguousarray(flat, dtype=np.float32)))
        probs = ops.softmax(logits, axis=1).asnumpy()
        return probs.reshape(-1, views, probs.shape[1]).mean(axis=1)

    def probabilities(self, batch: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """p(class 1) -- p(pneumonia) in the binary task -- of a two-class model, temperature-
        scaled when the checkpoint has been calibrated (unless calibrated=False)."""
        if len(self.classes) != 2:
            raise XrayError(f"{self.checkpoint} tells {len(self.classes)} classes apart; use class_probabilities")
        p = self.class_probabilities(batch)[:, 1]
        return self.calibrate(p) if calibrated else p

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        """Raw probabilities -> this checkpoint's calibrated ones (unchanged if uncalibrated)."""
        return scale(p, self.temperature) if self.temperature else p


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
    classes = task_classes(str(OmegaConf.select(cfg, "task.name", default="binary")))
    net = build_model(cfg.model, spec.image_size, len(classes))
    try:
        params = read_checkpoint(checkpoint)
    except (RuntimeError, ValueError) as e:
        raise XrayError(f"ckpt={checkpoint} is not a readable MindSpore checkpoint ({e})") from None
    missing, _ = ms.load_param_into_net(net, legacy_names(params))
    if missing:
        raise XrayError(f"ckpt={checkpoint} does not match the model in {config} "
                        f"(missing {len(missing)} parameters, e.g. {missing[0]})")
    net.set_train(False)
    return TrainedModel(net, cfg, spec, run_dir, checkpoint, load_temperature(run_dir, checkpoint), classes)


def legacy_names(params: dict) -> dict:
    """Checkpoints written before dropout masks became inputs name the dense layers
    classifier.<i> (i = 0, 3, 6 with dropout, 0, 2, 4 without): map them to fc1, fc2, fc3."""
    indices = sorted({int(k.split(".")[1]) for k in params if k.startswith("classifier.")})
    names = {f"classifier.{i}.": f"fc{n}." for n, i in enumerate(indices, start=1)}
    out = {}
    for key, value in params.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        out[names[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def resolve_checkpoints(ckpt, top_k: Optional[int] = None) -> list[Path]:
    """The checkpoints a `ckpt=` (and `top_k=`) option names: a file, a list of files (an
    ensemble), or a best folder (outputs/best/<sweep>: its best.ckpt, or with top_k its
    members/1..top_k written by `xray.report --top-k`)."""
    if ckpt is None or (isinstance(ckpt, str) and not ckpt.strip()):
        raise XrayError("ckpt is not set; e.g. ckpt=outputs/train/<run>/checkpoints/best.ckpt, "
                        "ckpt=[a.ckpt,b.ckpt] or ckpt=outputs/best/<sweep> top_k=3")
    if not isinstance(ckpt, str):  # a list from the command line: ckpt=[a,b]
        if top_k:
            raise XrayError("top_k works with a best folder (ckpt=outputs/best/<sweep>), not a list")
        return [Path(str(c)) for c in ckpt]
    path = Path(ckpt)
    if not top_k or int(top_k) == 1:  # a best folder's top 1 is its best.ckpt
        return [path]
    if int(top_k) < 1:
        raise XrayError(f"top_k={top_k} must be >= 1")
    members = path / "members"
    if not path.is_dir():
        raise XrayError(f"top_k needs a best folder (outputs/best/<sweep>), but ckpt={ckpt} is not a folder")
    found = [members / str(i) for i in range(1, int(top_k) + 1) if (members / str(i) / "best.ckpt").is_file()]
    if len(found) < int(top_k):
        raise XrayError(f"{path} holds {len(found)} ranked members, not top_k={top_k}; run "
                        f"`python -m xray.report <sweep> --top-k {top_k}` first")
    return [m / "best.ckpt" for m in found]
