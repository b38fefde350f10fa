"""xray.data: the converted data set's manifest and files (one line when missing, damaged or
of an older format), the epoch plan (every epoch its own order and augmentation, reproducible
whatever the number of workers, startable mid-epoch), and the training pipeline against
evaluation's."""
import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from xray.data import (epoch_plan, make_eval_dataset, make_train_dataset, preprocess_spec, read_labels,
                       read_manifest, split_file, task_records)
from xray.errors import XrayError

AUGMENT = OmegaConf.create({"enabled": True, "scale": [0.75, 1.0], "ratio": [0.8, 1.25],
                            "degrees": 7, "brightness": 0.2, "contrast": 0.2, "gamma": 0.2,
                            "blur": 1.0, "noise": 0.02})


def manifest_file(folder, **changes) -> dict:
    """A manifest.json as convert writes it (train and val only), with `changes`."""
    manifest = {"format": 2, "short_side": 128, "mean": 0.48, "std": 0.24,
                "splits": {"train": {"file": "train.mindrecord", "images": 31},
                           "val": {"file": "val.mindrecord", "images": 8}}}
    manifest.update(changes)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# ---------------------------------------------------------------------- the manifest and files

@pytest.mark.unit
def test_missing_manifest_says_to_convert_first(tmp_path):
    with pytest.raises(XrayError, match="run `python -m xray.convert"):
        read_manifest(tmp_path)


@pytest.mark.unit
def test_missing_split_names_what_exists(tmp_path):
    manifest_file(tmp_path)
    manifest = read_manifest(tmp_path)
    assert split_file(tmp_path, manifest, "val") == tmp_path / "val.mindrecord"
    with pytest.raises(XrayError, match="split=test is not in .* \\(it has train, val\\)"):
        split_file(tmp_path, manifest, "test")


@pytest.mark.unit
def test_a_data_set_of_an_older_format_asks_to_convert_again(tmp_path):
    manifest_file(tmp_path, format=None)  # format 1 (PNG records) wrote "format": 1; the very first none
    with pytest.raises(XrayError, match=r"older xray \(data format 1, this one reads 2\); convert it again"):
        read_manifest(tmp_path)
    manifest_file(tmp_path, format=1)
    with pytest.raises(XrayError, match=r"older xray \(data format 1, this one reads 2\)"):
        read_manifest(tmp_path)


def test_damaged_data_sets_are_one_line(sample_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    records = data / "train.mindrecord"
    records.write_bytes(records.read_bytes()[:300_000])
    with pytest.raises(XrayError, match=rf"{records} is damaged or incomplete .*overwrite=true"):
        read_labels(records)
    (data / "val.mindrecord.db").unlink()
    with pytest.raises(XrayError, match=r"val.mindrecord.db is missing; convert it again"):
        read_labels(data / "val.mindrecord")
    (data / "manifest.json").write_text((data / "manifest.json").read_text()[:200])
    with pytest.raises(XrayError, match=r"manifest.json is damaged \(JSONDecodeError"):
        read_manifest(data)


# ---------------------------------------------------------------------- the epoch plan

@pytest.mark.unit
def test_epoch_plan_is_a_function_of_seed_and_epoch():
    labels = np.array([0] * 30 + [1] * 90)
    order1, seeds1 = epoch_plan(labels, seed=7, epoch=1)
    order2, seeds2 = epoch_plan(labels, seed=7, epoch=2)
    again, seeds_again = epoch_plan(labels, seed=7, epoch=1)
    assert sorted(order1) == list(range(120))  # a permutation: every image once
    assert not np.array_equal(order1, order2) and not np.array_equal(seeds1, seeds2)
    assert np.array_equal(order1, again) and np.array_equal(seeds1, seeds_again)
    assert not np.array_equal(order1, epoch_plan(labels, seed=8, epoch=1)[0])


@pytest.mark.unit
def test_balanced_sampling_draws_both_classes_equally():
    labels = np.array([0] * 250 + [1] * 750)
    shares = [labels[epoch_plan(labels, 0, e, "balanced")[0]].mean() for e in range(1, 6)]
    assert 0.45 < np.mean(shares) < 0.55  # vs 0.75 when shuffled
    assert labels[epoch_plan(labels, 0, 1, "shuffle")[0]].mean() == 0.75


def epoch_batches(sample_data, epoch, start_batch=0, workers=2, seed=42, sampling="shuffle"):
    manifest = read_manifest(sample_data)
    path = split_file(sample_data, manifest, "train")
    spec = preprocess_spec(manifest, 72, 1)
    data = make_train_dataset(task_records(path), spec, 8, seed, epoch, start_batch, AUGMENT, sampling,
                              workers)
    return [(x.copy(), y.copy()) for x, y in data.create_tuple_iterator(num_epochs=1, output_numpy=True)]


def test_two_epochs_see_different_orders_and_augmentations(sample_data):
    first, second = epoch_batches(sample_data, 1), epoch_batches(sample_data, 2)
    assert len(first) == len(second) == 3  # 31 training images in the converted sample, batch 8
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, second))  # order
    pixel_sums = lambda batches: sorted(float(x.sum()) for b in batches for x in b[0])  # noqa: E731
    assert pixel_sums(first) != pytest.approx(pixel_sums(second))  # augmentation, not just order


def test_an_epoch_is_reproducible_whatever_the_number_of_workers(sample_data):
    a, b = epoch_batches(sample_data, 1, workers=2), epoch_batches(sample_data, 1, workers=1)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(ya, yb) and np.array_equal(xa, xb)


def test_starting_mid_epoch_gives_the_remaining_batches(sample_data):
    whole, rest = epoch_batches(sample_data, 2), epoch_batches(sample_data, 2, start_batch=2)
    assert len(rest) == 1
    assert np.array_equal(rest[0][0], whole[2][0]) and np.array_equal(rest[0][1], whole[2][1])


# ---------------------------------------------------------------------- training vs evaluation

def test_training_pipeline_augments_every_image_and_only_when_enabled(sample_data):
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


def test_a_training_view_of_the_whole_image_unrotated_is_close_to_the_eval_tensor(sample_data):
    """Training's one-resampling warp and evaluation's C++ area resize agree (no train/eval
    skew in sharpness or scale); a real crop or rotation does not."""
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
