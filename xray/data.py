"""MindRecord -> mindspore.dataset pipelines. Training adds augmentation; everything else
goes through exactly the transform that `predict` applies to a raw file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mindspore.dataset as ds
import mindspore.dataset.vision as vision
from omegaconf import DictConfig

from xray.errors import XrayError
from xray.preprocess import Preprocess, decode_png, to_tensor


def read_manifest(data_dir: Path) -> dict:
    """The manifest.json written by xray.convert, with a clear error when it is missing."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise XrayError(f"{path} not found; run `python -m xray.convert data.root=...` first "
                        "(or set data.dir to a converted data set)")
    return json.loads(path.read_text())


def preprocess_spec(manifest: dict, image_size: int, channels: int) -> Preprocess:
    """The model-input definition for a converted data set."""
    return Preprocess(short_side=manifest["short_side"], image_size=image_size,
                      mean=manifest["mean"], std=manifest["std"], channels=channels)


def split_file(data_dir: Path, manifest: dict, split: str) -> Path:
    info = manifest["splits"].get(split)
    if not info or not info.get("file"):
        have = [s for s, v in manifest["splits"].items() if v.get("file")]
        raise XrayError(f"split={split} is not in {data_dir} (it has {', '.join(have)})")
    return Path(data_dir) / info["file"]


class ToTensor:
    """Picklable pipeline op around preprocess.to_tensor."""

    def __init__(self, spec: Preprocess) -> None:
        self.spec = spec

    def __call__(self, image):
        return to_tensor(image, self.spec)


def augmentations(spec: Preprocess, augment: Optional[DictConfig]) -> list:
    """Mild, label-preserving training augmentation (MindSpore vision ops on HWC uint8)."""
    if not augment or not augment.enabled:
        return []
    return [
        vision.RandomResizedCrop(spec.image_size, scale=tuple(augment.scale),
                                 ratio=tuple(augment.ratio)),
        vision.RandomRotation(degrees=float(augment.degrees)),
    ]


def make_dataset(path: Path, spec: Preprocess, batch_size: int, train: bool,
                 augment: Optional[DictConfig] = None, workers: int = 2,
                 with_names: bool = False, drop_remainder: Optional[bool] = None) -> ds.Dataset:
    """Batches of (image float32 NxCxSxS, label int32 N[, file_name]) from a .mindrecord.

    Training shuffles (seeded by ds.config.set_seed) and augments; evaluation keeps file order."""
    columns = ["image", "label"] + (["file_name"] if with_names else [])
    data = ds.MindDataset(str(path), columns_list=columns, shuffle=train,
                          num_parallel_workers=workers)
    ops = [decode_png, *(augmentations(spec, augment) if train else []), ToTensor(spec)]
    data = data.map(operations=ops, input_columns=["image"], num_parallel_workers=workers)
    drop = train if drop_remainder is None else drop_remainder
    return data.batch(batch_size, drop_remainder=drop)
