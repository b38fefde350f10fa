"""Helpers the tests share (fixtures are in conftest.py): configs composed like the CLI does,
copies of the shipped sample, synthetic images, and reading back a run's TensorBoard events."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

import xray

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SAMPLE = xray.SAMPLE_DIR

# Small and fast: 72 px input (AlexNet needs >= 67), 8 images a batch.
TINY = ["data=sample", "data.image_size=72", "batch_size=8", "epochs=2", "data.workers=1",
        "train.log_every=2"]
# ... with the defaults of before December 2026 (a binary model, LRN, warm-up + cosine, shuffled
# sampling, mild augmentation: +experiment=ranking/default's model): the shared `trained_run`
# (conftest.py), which tests/data/old_runs/binary was trained as, and whose two-class outputs
# the evaluate, predict, export and card tests read (the default task is subtype now)
TINY_OLD_DEFAULT = TINY + ["task=binary", "model.norm=lrn", "optim.schedule=cosine", "data.sampling=shuffle",
                           "data/augment=mild"]


def make_cfg(config_name: str = "config", overrides: list[str] | tuple = ()):
    """Compose a config exactly as `python -m xray.<entrypoint> overrides...` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def copy_sample(dest: Path, per_class: int | None = None, splits=("train", "test")) -> Path:
    """A Kaggle-layout copy of (part of) the shipped sample."""
    for split in splits:
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((SAMPLE / split / cls).glob("*.jpeg"))[:per_class]
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


def gray_pattern(h: int = 40, w: int = 60) -> np.ndarray:
    """An asymmetric uint8 pattern (so that rotations are detectable)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 4 + y * 2) % 256).astype(np.uint8)


def xray_like(h: int = 120, w: int = 150, seed: int = 0) -> np.ndarray:
    """A smooth low-contrast image with detail, like an under-exposed X-ray."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 90 + 30 * np.sin(x / 9.0) * np.cos(y / 13.0) + rng.normal(0, 3, (h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


def bomb_png(path: Path) -> Path:
    """A decompression bomb: 20 KB on disk, 13000 x 13000 = 169 Mpixels decoded (a 1-bit image:
    made in a fraction of a second; what is refused is the size its header declares)."""
    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def events(run_dir: Path):
    """A run's TensorBoard events, everything kept (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc

