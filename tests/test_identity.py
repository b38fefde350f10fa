"""A run knows what made it (issue 26, items 1-2): its checkpoints carry their identity (task,
classes, model, input, the images of its splits), best.json repeats it with the checkpoint's
sha256, and the identity -- not a config.yaml that may have been edited -- decides how a
checkpoint is fed and what it may continue on."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import SAMPLE, TINY_OLD_DEFAULT, make_cfg
from xray.checkpoint import load_trained_model, sha256_of
from xray.convert import convert
from xray.errors import XrayError


def test_best_json_repeats_the_identity_with_the_checkpoints_sha256(trained_run):
    record = json.loads((trained_run / "checkpoints" / "best.json").read_text())
    assert record["sha256"] == sha256_of(trained_run / "checkpoints" / "best.ckpt")
    identity = record["identity"]
    assert identity["task"] == "binary" and identity["classes"] == ["NORMAL", "PNEUMONIA"]
    assert identity["preprocess"]["image_size"] == 72 and identity["model"]["name"] == "alexnet"
    assert set(identity["data"]) == {"train", "val"}
    assert len((trained_run / "train_images.txt").read_text().splitlines()) == 31  # the sample's train split


def test_a_checkpoint_copied_into_another_runs_folder_is_fed_as_it_was_trained(trained_run, tmp_path):
    """A 72 px checkpoint beside a 96 px run's config.yaml is still fed 72 px images."""
    other = tmp_path / "run96" / "checkpoints"
    other.mkdir(parents=True)
    config = OmegaConf.load(trained_run / "config.yaml")
    config.data.image_size = config.preprocess.image_size = 96
    OmegaConf.save(config, other.parent / "config.yaml")
    shutil.copy(trained_run / "checkpoints" / "best.ckpt", other / "best.ckpt")
    copied, own = load_trained_model(other / "best.ckpt"), load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    assert copied.spec.image_size == own.spec.image_size == 72
    x = np.random.default_rng(1).normal(size=(2, 1, 72, 72)).astype(np.float32)
    np.testing.assert_allclose(copied.probabilities(x), own.probabilities(x), rtol=1e-6)


def test_resuming_on_a_data_set_reconverted_with_other_splits_is_refused(trained_run, tmp_path):
    """Re-converting data.dir with another split seed moves training images into val: a run
    that trained on the old splits refuses to continue on the new ones, and writes nothing."""
    from xray.train import train
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "metrics.json").unlink()  # interrupted after epoch 2 (of 3, below)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(run / "config.yaml"), {"epochs": 3}), run / "config.yaml")
    convert(SAMPLE, tmp_path / "data7", short_side=128, val_fraction=0.2, seed=7, workers=1)
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    cfg = make_cfg("config", TINY_OLD_DEFAULT + [f"data.dir={tmp_path / 'data7'}", "epochs=3"])
    with pytest.raises(XrayError, match="trained on other images: the train and val split"):
        train(cfg, run)
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before
    assert not (run / "metrics.json").exists()  # a refusal is not a failure of the run
