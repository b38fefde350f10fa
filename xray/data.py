"""MindRecord -> mindspore.dataset pipelines. Training adds augmentation; everything else
goes through exactly the transform that `predict` applies to a raw file.

Records hold uncompressed BMPs and their CLAHE, computed once by convert. Evaluation runs on
MindSpore's C++ ops alone (decode, resize, normalise, HWC -> CHW: xray.preprocess.decode_ops +
tensor_ops), as predict does eagerly. Training augmentation draws its parameters per image from
the epoch plan, which MindSpore's C++ random ops cannot take, so it runs in Python, one call per
batch (TrainBatch), one resampling per image.

Training epochs are planned in numpy (xray.data.epoch_plan), not by the pipeline's own
shuffle and random ops: those repeat themselves in every epoch that starts a fresh iterator
under one seed, and are not reproducible with several workers."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mindspore.dataset as ds
import numpy as np
from omegaconf import DictConfig, OmegaConf

from xray.augment import augment, geometry, has_intensity, intensity_then_standardize, warp
from xray.errors import XrayError
from xray.labels import supported_tasks, task_classes, task_targets
from xray.preprocess import (EQUALIZE, FORMAT, PIPELINES, STORED_EQUALIZE, Preprocess, decode_ops,
                             standardize, standardized_input, stored_image, tensor_ops, to_tensor)


def read_manifest(data_dir: Path) -> dict:
    """The manifest.json written by xray.convert, with a clear error when it is missing."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise XrayError(f"{path} not found; run `python -m xray.convert data.root=...` first "
                        "(or set data.dir to a converted data set)")
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"], manifest["short_side"], manifest["mean"], manifest["std"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise XrayError(f"{path} is damaged ({type(e).__name__}: {e}); {RECONVERT.format(data_dir)}") from None
    found = manifest.get("format", 1)
    if found != FORMAT:
        raise XrayError(f"{data_dir} was converted by {'an older' if found < FORMAT else 'a newer'} xray "
                        f"(data format {found}, this one reads {FORMAT}); {RECONVERT.format(data_dir)} "
                        "(the same options give the same images and split, and runs trained on the "
                        "old one evaluate as before)")
    return manifest


def check_task(manifest: dict, task: str, data_dir: Path) -> tuple[str, tuple[str, ...]]:
    """(task, its class names) if the converted data set can train it, else one line."""
    classes = task_classes(task)
    supported = manifest.get("tasks") or supported_tasks(manifest["splits"]["train"].get("subtypes", {}))
    if task not in supported:
        raise XrayError(f"task={task} needs training images of every one of its classes "
                        f"({', '.join(classes)}), but {data_dir} supports only task="
                        f"{' / '.join(supported) or 'none'}; pick one of those or convert a data "
                        "set whose file names carry the subtype (personN_bacteria_K / personN_virus_K)")
    return task, classes


RECONVERT = ("convert it again: python -m xray.convert data.root=<chest_xray folder> "
             "data.dir={} overwrite=true")


def preprocess_spec(manifest: dict, image_size: int, channels: int, equalize: str = "none",
                    pipeline: str = "mindspore") -> Preprocess:
    """The model-input definition of a new run on a converted data set."""
    if equalize not in EQUALIZE:
        raise XrayError(f"data.equalize={equalize} is unknown; use {', '.join(EQUALIZE)}")
    if pipeline not in PIPELINES:
        raise XrayError(f"pipeline={pipeline} is unknown; use {', '.join(PIPELINES)}")
    return Preprocess(short_side=manifest["short_side"], image_size=image_size,
                      mean=manifest["mean"], std=manifest["std"], channels=channels,
                      equalize=equalize, pipeline=pipeline)


def split_file(data_dir: Path, manifest: dict, split: str) -> Path:
    info = manifest["splits"].get(split)
    if not info or not info.get("file"):
        have = [s for s, v in manifest["splits"].items() if v.get("file")]
        raise XrayError(f"split={split} is not in {data_dir} (it has {', '.join(have)})")
    return Path(data_dir) / info["file"]


def read_column(path: Path, column: str) -> list:
    """One column of every record of a .mindrecord file, in file order. Reading it reads every
    page, so this is also the check that the file is whole: a damaged one is one line."""
    path = Path(path)
    for part in (path, Path(f"{path}.db")):
        if not part.is_file():
            raise XrayError(f"{part} is missing; {RECONVERT.format(path.parent)}")
    try:
        data = ds.MindDataset(str(path), columns_list=[column], shuffle=False)
        return [row[0] for row in data.create_tuple_iterator(num_epochs=1, output_numpy=True)]
    except RuntimeError as e:
        raise XrayError(f"{path} is damaged or incomplete ({_first_line(e)}); "
                        f"{RECONVERT.format(path.parent)}") from None


def split_images(data_dir: Path, manifest: dict, split: str) -> list[str]:
    """The images of a split as "<folder label>/<file name>", sorted: what identifies a split's
    content whatever the conversion's order or time."""
    path = split_file(data_dir, manifest, split)
    names, labels = read_column(path, "file_name"), read_column(path, "label")
    return sorted(f"{int(label)}/{_text(name)}" for name, label in zip(names, labels))


def images_digest(images: list[str]) -> str:
    return hashlib.sha256("\n".join(images).encode()).hexdigest()[:16]


def fingerprint(data_dir: Path, manifest: dict, splits=None) -> dict:
    """What a data set is, to record beside a result: its manifest's hash and, per split, the
    image count and a digest of its images (equal digests: the same images)."""
    raw = (Path(data_dir) / "manifest.json").read_bytes()
    out = {"dir": str(data_dir), "manifest_sha256": hashlib.sha256(raw).hexdigest()[:16], "splits": {}}
    for split in splits or [s for s, v in manifest["splits"].items() if v.get("file")]:
        images = split_images(data_dir, manifest, split)
        out["splits"][split] = {"images": len(images), "digest": images_digest(images)}
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_labels(path: Path) -> np.ndarray:
    """The folder label (0 NORMAL, 1 PNEUMONIA) of every record, in file order."""
    return np.array([int(v) for v in read_column(path, "label")], dtype=np.int64)


@dataclass(frozen=True)
class TaskRecords:
    """The records of a .mindrecord file that a task uses, and their class ids."""

    path: Path
    indices: np.ndarray  # record positions in the file, in file order
    targets: np.ndarray  # the task's class id of each


def task_records(path: Path, task: str = "binary") -> TaskRecords:
    """The task's view of a .mindrecord file (its label map applied to the records' subtypes)."""
    subtypes = [str(v) for v in read_column(path, "subtype")]
    indices, targets = task_targets(task, subtypes)
    if not len(indices):
        raise XrayError(f"{path} has no images for task={task}")
    return TaskRecords(Path(path), indices, targets)


def _first_line(error: Exception) -> str:
    """MindSpore's errors open with banners; the first line that says something."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    noise = ("-", "Line of code", "File ", "Exception thrown", "This exception is caused")
    useful = [ln for ln in lines if ln and not ln.startswith(noise)]
    return (useful[0] if useful else lines[0])[:160]


def epoch_plan(labels: np.ndarray, seed: int, epoch: int, sampling: str = "shuffle"
               ) -> tuple[np.ndarray, np.ndarray]:
    """(record order, one augmentation seed per position) of training epoch `epoch`.

    A function of (seed, epoch) only: every epoch has its own order and draws, a rerun with
    the same seed repeats them, and a resumed run starts at any position of any epoch.
    `balanced` draws len(labels) records with replacement, each class equally likely."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    n = len(labels)
    if sampling == "shuffle":
        order = rng.permutation(n)
    elif sampling == "balanced":
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        order = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    else:
        raise XrayError(f"data.sampling={sampling} is unknown; use shuffle or balanced")
    return order, rng.integers(0, 2**62, size=n, dtype=np.int64)


def image_column(spec: Preprocess, augment: Optional[dict] = None) -> str:
    """The stored column a pipeline reads: the run's equalisation as convert stored it, unless
    intensity augmentation has to come before the equalisation."""
    if spec.equalize in STORED_EQUALIZE and not has_intensity(augment):
        return f"image_{spec.equalize}"
    return "image"


def _augment_dict(augment: Optional[DictConfig]) -> Optional[dict]:
    return OmegaConf.to_container(augment) if augment is not None and augment.enabled else None


class Standardizer:
    """The run's contrast normalisation of an image read from `column`: nothing when convert
    stored it already (`image_<equalize>`), else computed (picklable, for worker processes)."""

    def __init__(self, spec: Preprocess, column: str) -> None:
        self.spec, self.stored = spec, column != "image"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image if self.stored else standardize(image, self.spec)


class EvalTransform:
    """Stored record -> model input (CxSxS), or tta > 1 views of it (VxCxSxS), in Python: for
    what the C++ ops cannot do alone (hist equalisation, test-time views, `pipeline: pil` runs)
    (picklable)."""

    def __init__(self, spec: Preprocess, column: str, tta: int = 1) -> None:
        self.spec, self.tta, self.standardize = spec, tta, Standardizer(spec, column)

    def __call__(self, data, height, width):
        image = self.standardize(stored_image(data, height, width))
        return standardized_input(image, self.spec, self.tta)


class TrainTransform:
    """Stored record + per-sample seed -> augmented model input, as `pipeline: pil` runs made
    it (Pillow, one Python call per image) (picklable)."""

    def __init__(self, spec: Preprocess, augment: dict, column: str) -> None:
        self.spec, self.augment, self.standardize = spec, augment, Standardizer(spec, column)

    def __call__(self, data, height, width, seed):
        image = stored_image(data, height, width)
        image = augment(image, np.random.default_rng(int(seed)), self.augment, self.spec.image_size,
                        standardize=self.standardize)
        return to_tensor(image, self.spec)


class TrainBatch:
    """A batch of stored records + their per-sample seeds -> the augmented NxCxSxS batch of a
    `pipeline: mindspore` run: one Python call per batch, not per image (MindSpore's per-row
    hand-over costs more than the work), each view one resampling (xray.augment.warp) with the
    same draws as augment() (picklable)."""

    def __init__(self, spec: Preprocess, augment: dict, column: str) -> None:
        self.spec, self.augment, self.standardize = spec, augment, Standardizer(spec, column)

    def view(self, data, height, width, seed) -> np.ndarray:
        image = stored_image(data, height, width)
        rng = np.random.default_rng(int(seed))
        if not self.standardize.stored:
            image = intensity_then_standardize(image, rng, self.augment, self.spec.image_size,
                                               self.standardize)
        box, degrees = geometry(*image.shape, rng, self.augment)
        return warp(image, box, degrees, self.spec.image_size)

    def __call__(self, images, heights, widths, seeds, _batch_info):
        views = np.stack([self.view(*row) for row in zip(images, heights, widths, seeds)])
        x = (views.astype(np.float32) * np.float32(1 / 255) - np.float32(self.spec.mean)) / np.float32(self.spec.std)
        return (np.repeat(x[:, None], self.spec.channels, axis=1),)


def make_train_dataset(records: TaskRecords, spec: Preprocess, batch_size: int, seed: int,
                       epoch: int, start_batch: int = 0, augment: Optional[DictConfig] = None,
                       sampling: str = "shuffle", workers: int = 2, rank: int = 0,
                       ranks: int = 1) -> ds.Dataset:
    """Batches (image float32 NxCxSxS, label int32 N) of training epoch `epoch` (1-based),
    from batch `start_batch` on (a resumed run continues where it stopped).

    Data-parallel: `batch_size` is the global batch; rank `rank` of `ranks` gets its contiguous
    batch_size/ranks part of every global batch of the same plan (so the images, their order and
    their augmentation are exactly those of a one-rank run)."""
    order, seeds = epoch_plan(records.targets, seed, epoch, sampling)
    order, seeds = order[start_batch * batch_size:], seeds[start_batch * batch_size:]
    if ranks > 1:
        order, seeds = (rank_part(a, batch_size, rank, ranks) for a in (order, seeds))
        batch_size //= ranks
    augment = _augment_dict(augment)
    column = image_column(spec, augment)
    images = ds.MindDataset(str(records.path), columns_list=[column, "height", "width"],
                            sampler=ds.SubsetSampler(records.indices[order].tolist()),
                            num_parallel_workers=workers)
    keys = ds.NumpySlicesDataset({"seed": seeds, "label": records.targets[order].astype(np.int32)},
                                 shuffle=False)
    data = ds.zip((images, keys))
    if augment is not None and spec.pipeline == "mindspore":
        # worker processes, not threads: the warp holds the GIL for most of its time
        return data.batch(batch_size, drop_remainder=True, input_columns=[column, "height", "width", "seed"],
                          output_columns=["image"], per_batch_map=TrainBatch(spec, augment, column),
                          num_parallel_workers=workers, python_multiprocessing=workers > 1
                          ).project(["image", "label"])
    if augment is None:
        data = _to_model_input(data, spec, column, workers)
    else:
        data = data.map(TrainTransform(spec, augment, column), input_columns=[column, "height", "width", "seed"],
                        output_columns=["image"], num_parallel_workers=workers)
    return data.project(["image", "label"]).batch(batch_size, drop_remainder=True)


def _to_model_input(data: ds.Dataset, spec: Preprocess, column: str, workers: int, tta: int = 1) -> ds.Dataset:
    """The `column`, `height`, `width` columns -> the model input in `image`, as predict makes it:
    by MindSpore's C++ ops alone (decode_ops + tensor_ops) when the stored column is all it
    needs and there is one view, else in Python."""
    if spec.pipeline == "mindspore" and tta == 1 and (column != "image" or spec.equalize == "none"):
        return data.map(decode_ops() + tensor_ops(spec), input_columns=[column], output_columns=["image"],
                        num_parallel_workers=workers)
    return data.map(EvalTransform(spec, column, tta), input_columns=[column, "height", "width"],
                    output_columns=["image"], num_parallel_workers=workers)


def rank_part(plan: np.ndarray, batch_size: int, rank: int, ranks: int) -> np.ndarray:
    """Rank `rank`'s contiguous 1/ranks of every whole global batch of `plan`, in order."""
    per_rank = batch_size // ranks
    whole = plan[:len(plan) // batch_size * batch_size].reshape(-1, batch_size)
    return whole[:, rank * per_rank:(rank + 1) * per_rank].reshape(-1)


def make_eval_dataset(records: TaskRecords, spec: Preprocess, batch_size: int, workers: int = 2,
                      with_names: bool = False, tta: int = 1) -> ds.Dataset:
    """Batches (image float32 NxCxSxS or NxVxCxSxS with tta > 1, label int32 N[, file_name])
    of the task's records in file order, exactly as predict sees those images."""
    column = image_column(spec)
    names = ["file_name"] if with_names else []
    images = ds.MindDataset(str(records.path), columns_list=[column, "height", "width"] + names,
                            sampler=ds.SubsetSampler(records.indices.tolist()),
                            num_parallel_workers=workers)
    labels = ds.NumpySlicesDataset({"label": records.targets.astype(np.int32)}, shuffle=False)
    data = _to_model_input(ds.zip((images, labels)), spec, column, workers, tta)
    return data.project(["image", "label"] + names).batch(batch_size, drop_remainder=False)
