"""One preprocessing function: evaluation's pipeline and predict on the raw JPEG give
identical tensors."""
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE
from xray.data import (make_eval_dataset, make_train_dataset, preprocess_spec, read_labels,
                       read_manifest, split_file)
from xray.errors import XrayError
from xray.preprocess import Preprocess, preprocess_file, to_tensor


@pytest.mark.parametrize("channels, equalize, tta", [(1, "none", 1), (3, "none", 1),
                                                     (1, "clahe", 1), (1, "hist", 3)])
def test_eval_pipeline_equals_predict_on_raw_jpeg(sample_data, channels, equalize, tta):
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=96, channels=channels, equalize=equalize)
    dataset = make_eval_dataset(split_file(sample_data, manifest, "test"), spec, batch_size=4,
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


def test_training_pipeline_augments_but_keeps_shape_and_scale(sample_data):
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=80, channels=1)
    path = split_file(sample_data, manifest, "train")
    from omegaconf import OmegaConf
    augment = OmegaConf.create({"enabled": True, "scale": [0.75, 1.0], "ratio": [0.8, 1.25],
                                "degrees": 7})
    train = make_train_dataset(path, spec, 8, read_labels(path), seed=0, epoch=1, augment=augment,
                               workers=1)
    plain = make_eval_dataset(path, spec, 8, workers=1)
    x_train = next(train.create_tuple_iterator(output_numpy=True))[0]
    x_plain = next(plain.create_tuple_iterator(output_numpy=True))[0]
    assert x_train.shape == x_plain.shape == (8, 1, 80, 80)
    assert abs(float(x_plain.mean())) < 0.5 and 0.5 < float(x_plain.std()) < 1.5  # normalized
    assert abs(float(x_train.mean())) < 0.7


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
