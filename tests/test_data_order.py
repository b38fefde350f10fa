"""Every epoch has its own order and augmentation, a seed reproduces a run, and a run
stopped mid-epoch (a Slurm requeue) resumes with exactly the batches it would have seen."""
import json
import os
import signal

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import xray.train
from conftest import TINY, make_cfg
from xray.data import epoch_plan, make_train_dataset, preprocess_spec, read_manifest, split_file, task_records

AUGMENT = OmegaConf.create({"enabled": True, "scale": [0.75, 1.0], "ratio": [0.8, 1.25],
                            "degrees": 7, "brightness": 0.2, "contrast": 0.2, "gamma": 0.2,
                            "blur": 1.0, "noise": 0.02})


def epoch_batches(sample_data, epoch, start_batch=0, workers=2, seed=42, sampling="shuffle"):
    manifest = read_manifest(sample_data)
    path = split_file(sample_data, manifest, "train")
    spec = preprocess_spec(manifest, 72, 1)
    data = make_train_dataset(task_records(path), spec, 8, seed, epoch, start_batch, AUGMENT, sampling,
                              workers)
    return [(x.copy(), y.copy()) for x, y in data.create_tuple_iterator(num_epochs=1, output_numpy=True)]


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    labels = np.array([0] * 30 + [1] * 90)
    order1, seeds1 = epoch_plan(labels, seed=7, epoch=1)
    order2, seeds2 = epoch_plan(labels, seed=7, epoch=2)
    again, seeds_again = epoch_plan(labels, seed=7, epoch=1)
    assert sorted(order1) == list(range(120))  # a permutation: every image once
    assert not np.array_equal(order1, order2) and not np.array_equal(seeds1, seeds2)
    assert np.array_equal(order1, again) and np.array_equal(seeds1, seeds_again)
    assert not np.array_equal(order1, epoch_plan(labels, seed=8, epoch=1)[0])


def test_balanced_sampling_draws_both_classes_equally():
    labels = np.array([0] * 250 + [1] * 750)
    shares = [labels[epoch_plan(labels, 0, e, "balanced")[0]].mean() for e in range(1, 6)]
    assert 0.45 < np.mean(shares) < 0.55  # vs 0.75 when shuffled
    assert labels[epoch_plan(labels, 0, 1, "shuffle")[0]].mean() == 0.75


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


class Requeued(BaseException):
    """What submitit's SIGUSR2 handler does: requeue, then leave the process."""


def submitit_like_handler(signum, frame):
    raise Requeued()


def step_losses(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 5], ids=["mid-epoch", "last-step-of-an-epoch"])
def test_resumed_mid_epoch_equals_uninterrupted(sample_data, tmp_path, monkeypatch, stop):
    overrides = TINY + [f"data.dir={sample_data}", "epochs=3", "data.augment.brightness=0.2",
                        "data.augment.gamma=0.2"]  # 3 steps an epoch: 9 steps
    cfg = make_cfg("config", overrides)
    whole = xray.train.train(cfg, tmp_path / "whole")

    # the same run, stopped by the scheduler's signal during step 4 (epoch 2, step 2 of 3) or
    # step 5 (its last step: the resumed run has nothing left of epoch 2 but its end)
    previous = signal.signal(signal.SIGUSR2, submitit_like_handler)
    real_masks = xray.step.dropout_masks

    def masks_then_signal(p, batch, seed, step):
        if step == stop:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_masks(p, batch, seed, step)

    monkeypatch.setattr(xray.step, "dropout_masks", masks_then_signal)
    try:
        with pytest.raises(Requeued):
            xray.train.train(cfg, tmp_path / "resumed")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.setattr(xray.step, "dropout_masks", real_masks)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert len(step_losses(tmp_path / "resumed")) == stop + 1  # steps 0..stop ran before it stopped

    resumed = xray.train.train(cfg, tmp_path / "resumed")
    assert resumed["status"] == "ok" and resumed["epochs_completed"] == 3
    a, b = step_losses(tmp_path / "whole"), step_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(9))
    # same seed, same losses step for step: before the stop (reproducible) and after (resume)
    np.testing.assert_allclose([b[s] for s in range(9)], [a[s] for s in range(9)], rtol=1e-5)
    assert len(set(a.values())) == 9
    hist = lambda d: [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]  # noqa: E731
    for ha, hb in zip(hist(tmp_path / "whole"), hist(tmp_path / "resumed")):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
        assert hb["val_auc"] == pytest.approx(ha["val_auc"], abs=1e-6)
    assert resumed["best_val"]["auc"] == pytest.approx(whole["best_val"]["auc"], abs=1e-6)
