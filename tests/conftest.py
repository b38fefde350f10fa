"""Shared fixtures: configs composed like the CLI does, the shipped sample converted once,
and one tiny trained run reused by the evaluate / predict / TensorBoard tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import xray
from xray.convert import convert

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SAMPLE = xray.SAMPLE_DIR

# Small and fast: 72 px input (AlexNet needs >= 67), 8 images a batch.
TINY = ["data=sample", "data.image_size=72", "batch_size=8", "epochs=2", "data.workers=1",
        "train.log_every=2"]


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


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The shipped sample converted as the demo does (short side 128)."""
    out = tmp_path_factory.mktemp("data") / "sample"
    convert(SAMPLE, out, short_side=128, val_fraction=0.2, seed=42, workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(sample_data, tmp_path_factory) -> Path:
    """A 2-epoch run on the sample, trained through xray.train.train()."""
    from xray.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "train.keep_last=true"])
    result = train(cfg, run_dir)
    assert result["status"] == "ok"
    return run_dir


@pytest.fixture
def image_file(tmp_path):
    def _make(name: str, image: Image.Image, **save_kwargs) -> Path:
        path = tmp_path / name
        image.save(path, **save_kwargs)
        return path
    return _make
