"""Shared fixtures: the shipped sample converted once, one tiny trained run reused by the
evaluate / predict / TensorBoard tests, and image files. Plain helpers are in helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from helpers import SAMPLE, TINY_OLD_DEFAULT, make_cfg
from xray.convert import convert


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The shipped sample converted as the demo does (short side 128)."""
    out = tmp_path_factory.mktemp("data") / "sample"
    convert(SAMPLE, out, short_side=128, val_fraction=0.2, seed=42, workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(sample_data, tmp_path_factory) -> Path:
    """A 2-epoch run on the sample with the binary defaults of before (TINY_OLD_DEFAULT), trained
    through xray.train.train(): the tests that use it read a two-class model's outputs
    (p_pneumonia, one threshold) and old runs' formats; tests/test_tasks.py trains the default
    task, subtype."""
    from xray.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = make_cfg("config", TINY_OLD_DEFAULT + [f"data.dir={sample_data}", "train.keep_last=true"])
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
