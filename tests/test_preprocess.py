"""One preprocessing function: evaluation's pipeline and predict on the raw JPEG give
identical tensors."""
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE
from xray.data import (epoch_plan, make_eval_dataset, make_train_dataset, preprocess_spec,
                       read_manifest, split_file, task_records)
from xray.errors import XrayError
from xray.preprocess import Preprocess, preprocess_file, to_tensor


@pytest.mark.parametrize("channels, equalize, tta", [(1, "none", 1), (3, "none", 1),
                                                     (1, "clahe", 1), (1, "hist", 3)])
def test_eval_pipeline_equals_predict_on_raw_jpeg(sample_data, channels, equalize, tta):
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=96, channels=channels, equalize=equalize)
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
