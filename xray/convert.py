"""Kaggle chest_xray folders -> {train,val,test}.mindrecord + manifest.json.

    python -m xray.convert data.root=/data/chest_xray [data.dir=...] [overwrite=true]

One conversion at a time per data.dir: the whole job holds a lock beside it (xray.run_lock).
"""
from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from xray import CONF_DIR
from xray.checks import CONVERT, check
from xray.errors import XrayError, one_line_errors
from xray.files import atomic_dir, to_json
from xray.labels import CLASSES, LABEL_TO_INDEX, parse_file_name, supported_tasks
from xray.preprocess import (FORMAT, MAX_PIXELS, STORED_EQUALIZE, encode_stored, load_image,
                             standardize_by_name)
from xray.progress import Progress
from xray.run_lock import hold

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MAX_ASPECT_RATIO = 4.0  # long side / short side: no chest X-ray is more elongated than this
LAYOUT = "<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (Kaggle chest-xray-pneumonia)"
SCHEMA = {
    "file_name": {"type": "string"},
    "label": {"type": "int32"},
    "subtype": {"type": "string"},
    "patient_id": {"type": "string"},
    "height": {"type": "int32"},
    "width": {"type": "int32"},
    "image": {"type": "bytes"},  # uncompressed BMP (xray.preprocess.encode_stored)
    **{f"image_{name}": {"type": "bytes"} for name in STORED_EQUALIZE},  # e.g. its CLAHE, computed once
}


@dataclass(frozen=True)
class Item:
    path: Path
    source_split: str  # the folder it came from
    label: int
    subtype: str
    patient_id: str


def scan(root: Path) -> dict[str, list[Item]]:
    """List the class folders of each split present under root (train is required)."""
    if not root.is_dir():
        raise XrayError(f"data.root={root} does not exist; expected {LAYOUT}")
    if not (root / "train").is_dir() and (root / "chest_xray" / "train").is_dir():
        raise XrayError(f"data.root={root} holds chest_xray/; use data.root={root / 'chest_xray'}")
    found: dict[str, list[Item]] = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for cls in CLASSES:
            if not (root / split / cls).is_dir():
                raise XrayError(f"{root / split / cls} is missing; expected {LAYOUT}")
        items = []
        for cls in CLASSES:
            folder = root / split / cls
            # links too: a dangling one or a loop is listed under `skipped`, not dropped silently
            paths = sorted(p for p in folder.iterdir() if p.is_file() or p.is_symlink())
            if not any(not p.name.startswith(".") for p in paths):
                # a class with no images would make a data set of the other class alone
                what = f"only hidden files ({', '.join(p.name for p in paths[:3])})" if paths else "no files"
                raise XrayError(f"class folder {folder} holds {what}: every class needs images; "
                                f"put its images there, or point data.root at a complete copy")
            for path in paths:
                subtype, patient = parse_file_name(path.name, cls)
                items.append(Item(path, split, LABEL_TO_INDEX[cls], subtype, patient))
        found[split] = items
    if "train" not in found:
        raise XrayError(f"{root / 'train'} is missing; expected {LAYOUT}")
    return found


def split_by_patient(items: list[Item], fraction: float, seed: int, stratify: str = "subtype") -> set[str]:
    """Pick validation patients: per stratum (subtype: normal / bacteria / virus, or the
    folder's label), whole patients in seeded random order until `fraction` of that stratum's
    images is reached (no patient in two splits)."""
    if stratify not in ("subtype", "label"):
        raise XrayError(f"data.stratify={stratify} is unknown; use subtype or label")
    key = (lambda it: it.subtype) if stratify == "subtype" else (lambda it: str(it.label))  # noqa: E731
    val: set[str] = set()
    rng = random.Random(seed)
    for stratum in sorted({key(it) for it in items}):
        counts = Counter(it.patient_id for it in items if key(it) == stratum)
        patients = sorted(counts)
        rng.shuffle(patients)
        target, taken = fraction * sum(counts.values()), 0
        for patient in patients:
            if taken >= target:
                break
            val.add(patient)
            taken += counts[patient]
    return val


def assign_splits(found: dict[str, list[Item]], val_source: str, val_fraction: float,
                  seed: int, stratify: str = "subtype") -> dict[str, list[Item]]:
    """Final split -> items. `val_source=patients` carves val out of train+official val."""
    if val_source == "official":
        if "val" not in found:
            raise XrayError("data.val_source=official but there is no val/ folder; "
                            "use data.val_source=patients")
        return {s: found[s] for s in SPLITS if s in found}
    if val_source != "patients":
        raise XrayError(f"data.val_source={val_source} is unknown; use patients or official")
    if not 0.0 < val_fraction < 1.0:
        raise XrayError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    pool = found["train"] + found.get("val", [])
    val_patients = split_by_patient(pool, val_fraction, seed, stratify)
    splits = {
        "train": [it for it in pool if it.patient_id not in val_patients],
        "val": [it for it in pool if it.patient_id in val_patients],
    }
    if "test" in found:
        splits["test"] = found["test"]
    return splits


def shape_refusal(path: str, short_side: int, max_aspect_ratio: float) -> Optional[str]:
    """Why an image is refused for its shape, from its header alone (before decoding): its
    long side over its short side above max_aspect_ratio. That also bounds what it becomes:
    after the short-side resize its long side is at most short_side * max_aspect_ratio (a
    1x10000 PNG of 100 bytes would otherwise become 256 x 2,560,000 pixels, gigabytes).
    None: the shape is fine, or the header cannot be read (decoding then says why)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - load_image reports a file it cannot read
        return None
    short, long = min(w, h), max(w, h)
    if short < 1 or long <= short * max_aspect_ratio:
        return None
    ratio = f"{long / short:.1f}".rstrip("0").rstrip(".")
    scale = short_side / short
    return (f"{w}x{h}: aspect ratio {ratio}:1 is over max_aspect_ratio={max_aspect_ratio:g} (no chest "
            f"X-ray has this shape; at data.short_side={short_side} it would become "
            f"{max(1, round(w * scale))}x{max(1, round(h * scale))} pixels)")


def _decode(job: tuple[int, str, int, int, float]
            ) -> tuple[int, Optional[dict], str, tuple[float, float, int]]:
    """Worker: decode one file. Returns (index, its image columns or None, error,
    (sum, sum_sq, n_pixels))."""
    index, path, short_side, max_pixels, max_aspect_ratio = job
    if os.path.islink(path) and not os.path.exists(path):
        try:
            reason = f"dangling symlink -> {os.readlink(path)}"
            os.stat(path)
        except OSError as e:  # ELOOP: the link points (through others) back at itself
            reason = "symlink loop" if e.errno == errno.ELOOP else reason
        return index, None, reason, (0.0, 0.0, 0)
    reason = shape_refusal(path, short_side, max_aspect_ratio)
    if reason:
        return index, None, reason, (0.0, 0.0, 0)
    try:
        image = load_image(path, short_side, max_pixels)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        return index, None, reason, (0.0, 0.0, 0)
    x = image.astype(np.float64) / 255.0
    columns = {"height": image.shape[0], "width": image.shape[1], "image": encode_stored(image),
               **{f"image_{name}": encode_stored(standardize_by_name(image, name)) for name in STORED_EQUALIZE}}
    return index, columns, "", (float(x.sum()), float((x * x).sum()), x.size)


def _write(writer, rows: Optional[list[dict]], out_dir: Path) -> None:
    """writer.write_raw_data(rows), or commit() for None; MindSpore's full-disk error as one line."""
    try:
        writer.write_raw_data(rows) if rows is not None else writer.commit()
    except RuntimeError as e:
        # MindSpore says "free disk" when it checks first, "Failed to seekp file" when a page
        # write hits the full disk; either way the disk is what to fix
        if "free disk" in str(e) or shutil.disk_usage(out_dir.parent).free < 64 * 2**20:
            raise XrayError(f"disk full writing {out_dir}; free some space (a MindRecord file takes "
                            "at least one 32 MB page) and convert again") from None
        raise


def _split_summary(items: list[Item]) -> dict:
    return {
        "images": len(items),
        "patients": len({it.patient_id for it in items}),
        "classes": {c: sum(it.label == i for it in items) for i, c in enumerate(CLASSES)},
        "subtypes": dict(sorted(Counter(it.subtype for it in items).items())),
        "file": None,
    }


def settings(root: Path, short_side: int, val_source: str, val_fraction: float, stratify: str,
             seed: int) -> dict:
    """What a conversion was made from and how, as its manifest records it."""
    patients = val_source == "patients"
    return {"format": FORMAT, "source": str(Path(root).resolve()), "short_side": short_side,
            "val_source": val_source, "val_fraction": val_fraction if patients else None,
            "stratify": stratify if patients else None, "seed": seed}


def holds_conversion(out_dir: Path, wanted: dict) -> Optional[bool]:
    """Whether `out_dir` holds a finished conversion with the settings `wanted` (None: no
    out_dir at all; False: something else, e.g. another source, split or data format)."""
    if not Path(out_dir).exists():
        return None
    try:
        manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and all(manifest.get(k) == v for k, v in wanted.items())


def convert(root: Path, out_dir: Path, short_side: int = 128, val_source: str = "patients",
            val_fraction: float = 0.1, seed: int = 42, workers: int = 0, strict: bool = False,
            overwrite: bool = False, max_pixels: int = MAX_PIXELS, stratify: str = "subtype",
            max_aspect_ratio: float = MAX_ASPECT_RATIO) -> dict:
    """Convert the Kaggle layout under `root` into `out_dir`; returns the manifest. The whole
    conversion, its checks of what `out_dir` holds included, holds the lock of `out_dir`: a
    second conversion into it meanwhile is refused in one line naming this one."""
    if short_side < 32:
        raise XrayError(f"data.short_side={short_side} is too small (>= 32)")
    if (isinstance(max_aspect_ratio, bool) or not isinstance(max_aspect_ratio, (int, float))
            or not max_aspect_ratio >= 1):
        raise XrayError(f"max_aspect_ratio={max_aspect_ratio} must be a number >= 1 "
                        "(an image's long side over its short side)")
    out_dir = Path(out_dir)
    # beside: the lock file sits next to data.dir, which is replaced as a whole
    with hold(out_dir, "converting", beside=True, rank=0):
        try:
            return _convert(Path(root), out_dir, short_side, val_source, val_fraction, seed,
                            workers, strict, overwrite, max_pixels, stratify, float(max_aspect_ratio))
        except OSError as e:
            if (e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY)
                    and _inside(e.filename, out_dir.parent) and not _inside(e.filename, root)):
                raise XrayError(f"cannot write data.dir={out_dir}: {e.strerror} ({e.filename}); "
                                "convert into a data.dir in a folder you can write") from None
            raise


def _inside(filename, folder: Path) -> bool:
    """Whether an OSError's file is `folder` or lies in it."""
    if not filename:
        return False
    path = Path(os.path.abspath(os.fsdecode(filename)))
    folder = Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _convert(root: Path, out_dir: Path, short_side: int, val_source: str, val_fraction: float,
             seed: int, workers: int, strict: bool, overwrite: bool, max_pixels: int,
             stratify: str, max_aspect_ratio: float) -> dict:
    start = time.perf_counter()
    if out_dir.exists() and not overwrite:
        raise XrayError(f"data.dir={out_dir} already exists; pass overwrite=true to replace it")
    if os.path.ismount(out_dir):  # (a read-only published copy, say) it cannot be renamed away
        raise XrayError(f"data.dir={out_dir} is a mount point, which conversion cannot replace as a "
                        "whole; convert into a data.dir inside it or elsewhere")
    splits = assign_splits(scan(root), val_source, val_fraction, seed, stratify)
    jobs = [(it, split) for split, items in splits.items() for it in items]
    log.info("convert: %d files (%s) from %s", len(jobs),
             ", ".join(f"{s} {len(v)}" for s, v in splits.items()), root)
    from mindspore.mindrecord import FileWriter  # heavy import, only where needed

    with atomic_dir(out_dir) as tmp:  # out_dir appears only when complete
        writers = {}
        for split in splits:
            writers[split] = FileWriter(str(tmp / f"{split}.mindrecord"), shard_num=1, overwrite=True)
            writers[split].add_schema(SCHEMA, "chest_xray")
        kept: dict[str, list[Item]] = {s: [] for s in splits}
        skipped: list[dict] = []
        stats = np.zeros(3)  # train pixel sum, sum of squares, count
        pending: dict[str, list[dict]] = {s: [] for s in splits}
        workers = workers or len(os.sched_getaffinity(0))
        progress = Progress("convert", len(jobs), unit="img")
        # spawn: workers only need Pillow, and must not inherit MindSpore's threads
        with mp.get_context("spawn").Pool(workers) as pool:
            tasks = [(i, str(it.path), short_side, max_pixels, max_aspect_ratio)
                     for i, (it, _) in enumerate(jobs)]
            for done, (i, columns, error, pixel_stats) in enumerate(
                    pool.imap(_decode, tasks, chunksize=8), start=1):
                item, split = jobs[i]
                if columns is None:
                    if strict:
                        raise XrayError(f"{item.path}: {error} (strict=true; remove the file "
                                        "or run without strict to skip it)")
                    log.warning("skip %s: %s", item.path, error)
                    skipped.append({"file": str(item.path), "reason": error})
                else:
                    kept[split].append(item)
                    pending[split].append({
                        "file_name": item.path.name, "label": item.label,
                        "subtype": item.subtype, "patient_id": item.patient_id, **columns,
                    })
                    if split == "train":
                        stats += pixel_stats
                    if len(pending[split]) >= 256:
                        _write(writers[split], pending[split], out_dir)
                        pending[split] = []
                progress.update(done)
        _refuse_unusable_classes(root, jobs, kept, skipped)
        for split, writer in writers.items():
            if pending[split]:
                _write(writer, pending[split], out_dir)
            _write(writer, None, out_dir)  # commit
        if not kept["train"]:
            raise XrayError(f"no readable training image under {root}/train")
        mean = stats[0] / stats[2]
        std = float(np.sqrt(max(stats[1] / stats[2] - mean * mean, 1e-12)))
        summary = {}
        for split, items in kept.items():
            summary[split] = _split_summary(items)
            summary[split]["file"] = f"{split}.mindrecord" if items else None
        manifest = {
            **settings(root, short_side, val_source, val_fraction, stratify, seed),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": list(CLASSES),
            "tasks": supported_tasks(summary["train"]["subtypes"]),
            "mean": float(mean),
            "std": std,
            "splits": summary,
            "skipped": skipped,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        (tmp / "manifest.json").write_text(to_json(manifest, indent=2) + "\n")
    log.info("convert: wrote %s (%s; %d skipped) in %.1f s", out_dir,
             ", ".join(f"{s} {v['images']}" for s, v in summary.items()), len(skipped),
             manifest["wall_time_s"])
    return manifest


def _refuse_unusable_classes(root: Path, jobs: list[tuple[Item, str]], kept: dict[str, list[Item]],
                             skipped: list[dict]) -> None:
    """A class folder none of whose files could be used (all skipped) would make a split of the
    other class alone: refuse it, naming the folder and why its files were skipped."""
    listed = Counter((it.source_split, it.label) for it, _ in jobs)
    usable = Counter((it.source_split, it.label) for items in kept.values() for it in items)
    for (split, label), n in sorted(listed.items()):
        if usable[(split, label)]:
            continue
        folder = root / split / CLASSES[label]
        reasons = [s["reason"] for s in skipped if Path(s["file"]).parent == folder]
        example = f"; e.g. {reasons[0]}" if reasons else ""
        raise XrayError(f"class folder {folder}: none of its {n} files is a usable image (all "
                        f"skipped{example}); put readable images there, or point data.root at a "
                        "complete copy")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="convert")
@one_line_errors
def main(cfg: DictConfig) -> None:
    check(cfg, CONVERT)
    if cfg.data.root is None:
        raise XrayError("data.root is not set; point it at the Kaggle chest_xray folder, "
                        "e.g. data.root=/data/chest_xray")
    convert(Path(cfg.data.root), Path(cfg.data.dir), short_side=cfg.data.short_side,
            val_source=cfg.data.val_source, val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed, workers=cfg.workers, strict=cfg.strict,
            overwrite=cfg.overwrite, max_pixels=cfg.data.max_pixels, stratify=cfg.data.stratify,
            max_aspect_ratio=_or_default(cfg.get("max_aspect_ratio"), MAX_ASPECT_RATIO))


def _or_default(value, default):
    """null in a config means "not set": the code's own default applies."""
    return default if value is None else value


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.convert import main as entrypoint

    entrypoint()
