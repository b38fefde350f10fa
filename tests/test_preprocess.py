"""One preprocessing function: evaluation's pipeline and predict on the raw JPEG give
identical tensors."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE
from xray.data import (epoch_plan, make_eval_dataset, make_train_dataset, preprocess_spec,
                       read_manifest, split_file, task_records)
from xray.checkpoint import load_trained_model
from xray.errors import XrayError
from xray.preprocess import Preprocess, preprocess_file, to_tensor


@pytest.mark.parametrize("channels, equalize, tta, pipeline", [
    (1, "none", 1, "mindspore"), (3, "none", 1, "mindspore"), (1, "clahe", 1, "mindspore"),
    (1, "hist", 3, "mindspore"), (1, "clahe", 1, "pil"), (3, "hist", 1, "pil")])
def test_eval_pipeline_equals_predict_on_raw_jpeg(sample_data, channels, equalize, tta, pipeline):
    """The C++ ops in the pipeline and run eagerly by predict give the same tensors; so does
    the Pillow path that runs trained before them keep."""
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=96, channels=channels, equalize=equalize, pipeline=pipeline)
    dataset = make_eval_dataset(task_records(split_file(sample_data, manifest, "test")), spec, batch_size=4,
                                workers=2, with_names=True, tta=tta)
    seen = 0
    shape = (channels, 96, 96) if tta == 1 else (tta, channels, 96, 96)
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        for image, label, name in zip(batch["image"], batch["label"], batch["file_name"]):
            cls = "PNEUMONIA" if label == 1 else "NORMAL"
            raw = SAMPLE / "test" / cls / str(name)
            direct = preprocess_file(raw, spec, tta)
            assert image.dtype == np.float32 and image.shape == shape
            assert np.array_equal(image, direct), name
            seen += 1
    assert seen == manifest["splits"]["test"]["images"] == 20


def test_training_pipeline_augments_every_image_and_only_when_enabled(sample_data):
    from omegaconf import OmegaConf
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=80, channels=1)
    records = task_records(split_file(sample_data, manifest, "train"))
    aug = {"enabled": True, "scale": [0.75, 1.0], "ratio": [0.8, 1.25], "degrees": 7}

    def epoch(enabled):
        cfg = OmegaConf.create({**aug, "enabled": enabled})
        data = make_train_dataset(records, spec, 8, seed=0, epoch=1, augment=cfg, workers=1)
        return [b[0] for b in data.create_tuple_iterator(output_numpy=True)]

    on, off = np.concatenate(epoch(True)), np.concatenate(epoch(False))
    order, _ = epoch_plan(records.targets, 0, 1)
    plain = np.concatenate([b[0] for b in make_eval_dataset(records, spec, 8, workers=1)
                            .create_tuple_iterator(output_numpy=True)])
    assert np.array_equal(off, plain[order[:len(off)]])  # off: evaluation's tensors, in the epoch's order
    assert on.shape == off.shape == (24, 1, 80, 80)  # 31 images, 3 full batches
    assert all(not np.allclose(a, b) for a, b in zip(on, off))  # on: every image is changed
    assert abs(float(on.mean() - off.mean())) < 0.3 and 0.5 < float(on.std()) < 1.5  # still normalized


def test_to_tensor_normalizes_with_the_given_statistics():
    spec = Preprocess(short_side=128, image_size=70, mean=0.5, std=0.25)
    x = to_tensor(np.full((128, 150), 255, np.uint8), spec)
    assert x.shape == (1, 70, 70) and np.allclose(x, 2.0)


def test_missing_manifest_says_to_convert_first(tmp_path):
    with pytest.raises(XrayError, match="run `python -m xray.convert"):
        read_manifest(tmp_path)


def test_missing_split_names_what_exists(sample_data):
    manifest = dict(read_manifest(sample_data))
    manifest["splits"] = {k: v for k, v in manifest["splits"].items() if k != "test"}
    with pytest.raises(XrayError, match="split=test is not in .* \\(it has train, val\\)"):
        split_file(Path(sample_data), manifest, "test")


def test_a_data_set_of_an_older_format_asks_to_convert_again(sample_data, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((sample_data / "manifest.json").read_text())
    manifest.pop("format")  # format 1 (PNG records) wrote "format": 1; the very first none
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(XrayError, match=r"older xray \(data format 1, this one reads 2\); convert it again"):
        read_manifest(old)


def test_a_training_view_of_the_whole_image_unrotated_is_close_to_the_eval_tensor(sample_data):
    """Training's one-resampling warp and evaluation's C++ area resize agree (no train/eval
    skew in sharpness or scale); a real crop or rotation does not."""
    from omegaconf import OmegaConf
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=48, channels=3, equalize="clahe")
    records = task_records(split_file(sample_data, manifest, "train"))
    plain = np.concatenate([b[0] for b in make_eval_dataset(records, spec, 8, workers=1)
                            .create_tuple_iterator(output_numpy=True)])
    order, _ = epoch_plan(records.targets, 0, 1)
    plain = plain[order[:24]]

    def epoch(scale, degrees):
        cfg = OmegaConf.create({"enabled": True, "scale": scale, "ratio": [1.0, 1.0], "degrees": degrees})
        data = make_train_dataset(records, spec, 8, seed=0, epoch=1, augment=cfg, workers=2)
        return np.concatenate([b[0] for b in data.create_tuple_iterator(output_numpy=True)])

    whole = epoch([1.0, 1.0], 0)
    assert whole.shape == plain.shape == (24, 3, 48, 48)
    skew = np.abs(whole - plain).mean()
    assert skew < 0.06  # normalized units: ~1.5 gray levels
    for changed in (epoch([1.0, 1.0], 7), epoch([0.6, 0.6], 0)):
        assert np.abs(changed - plain).mean() > 4 * skew


def test_a_run_trained_before_the_cpp_ops_keeps_its_pillow_preprocessing(trained_run, tmp_path):
    """A run whose config.yaml records no `pipeline` loads as `pil` and predicts with Pillow."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(trained_run / "config.yaml")
    assert config.preprocess.pipeline == "mindspore"
    del config.preprocess["pipeline"]
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    OmegaConf.save(config, old / "config.yaml")
    (old / "checkpoints" / "best.ckpt").write_bytes((trained_run / "checkpoints" / "best.ckpt").read_bytes())
    model = load_trained_model(old / "checkpoints" / "best.ckpt")
    assert model.spec.pipeline == "pil"
    image = next(SAMPLE.glob("test/NORMAL/*.jpeg"))
    new = preprocess_file(image, load_trained_model(trained_run / "checkpoints" / "best.ckpt").spec)
    assert not np.array_equal(preprocess_file(image, model.spec), new)  # Pillow's resize, not area
    assert np.abs(preprocess_file(image, model.spec) - new).mean() < 0.1  # ... of the same image


def test_resuming_a_run_from_before_the_cpp_ops_keeps_its_pillow_pipeline(trained_run, tmp_path):
    """An interrupted run begun with Pillow preprocessing (a format-1 checkpoint, its config.yaml
    records no `pipeline`) finishes with Pillow preprocessing; a new run gets MindSpore's."""
    from omegaconf import OmegaConf

    from conftest import TINY, make_cfg
    from old_runs import old_run
    from xray.checkpoint import read_state
    from xray.train import train
    old = old_run("binary", tmp_path / "old_run", trained_run / "checkpoints")
    (old / "metrics.json").unlink()  # interrupted: last.ckpt, no result
    config = OmegaConf.load(old / "config.yaml")
    del config.preprocess["pipeline"]
    OmegaConf.save(config, old / "config.yaml")
    data_dir = OmegaConf.load(trained_run / "config.yaml").data.dir
    result = train(make_cfg("config", TINY + [f"data.dir={data_dir}", "epochs=3", "train.eval_splits=[]",
                                              "train.cam_images=0", "train.keep_last=true"]), old)
    assert result["status"] == "ok" and result["epochs_completed"] == 3
    assert OmegaConf.load(old / "config.yaml").preprocess.pipeline == "pil"
    assert read_state(old / "checkpoints" / "last.ckpt").identity["preprocess"]["pipeline"] == "pil"
    assert OmegaConf.load(trained_run / "config.yaml").preprocess.pipeline == "mindspore"