"""xray.checkpoint: the training state is what last.ckpt holds (format 2), old runs (format 1)
still resume and evaluate, and a checkpoint serves only the settings it was made with."""
from __future__ import annotations

import json
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from conftest import TINY, make_cfg
from old_runs import old_run
from xray.checkpoint import (FORMAT_VERSION, RunState, TrainingState, load_trained_model, read_checkpoint,
                             read_state)
from xray.errors import XrayError


class TinyNet(nn.Cell):
    """A dense layer and a batch norm: trainable and non-trainable parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def construct(self, x):
        return self.bn(self.fc(x))


def tiny_state(identity=None) -> TrainingState:
    net = TinyNet()
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    return TrainingState(net, opt, None, identity or {"task": "binary", "model": {"name": "tiny"}})


@pytest.mark.unit
def test_the_state_round_trips_with_non_trainable_parameters_history_and_identity(tmp_path):
    state = tiny_state()
    state.net.bn.moving_mean.set_data(ms.Tensor(np.array([1.0, 2.0, 3.0], np.float32)))
    state.optimizer.moments[0].set_data(ms.Tensor(np.full((3, 4), 0.25, np.float32)))
    state.run = RunState(epoch=3, step_in_epoch=1, epoch_loss_sum=0.5, best_auc=0.75, best_epoch=2)
    state.history = [{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.6}, {"epoch": 3, "train_loss": 0.5}]
    state.save(tmp_path / "last.ckpt")

    saved = read_state(tmp_path / "last.ckpt")
    fresh = tiny_state()
    fresh.restore(saved)
    assert saved.format_version == FORMAT_VERSION and saved.identity == state.identity
    assert fresh.run == state.run and fresh.history == state.history
    np.testing.assert_array_equal(fresh.net.bn.moving_mean.asnumpy(), [1, 2, 3])  # not trainable, kept
    np.testing.assert_array_equal(fresh.optimizer.moments[0].asnumpy(), np.full((3, 4), 0.25))
    np.testing.assert_array_equal(fresh.net.fc.weight.asnumpy(), state.net.fc.weight.asnumpy())


@pytest.mark.unit
def test_a_newer_format_or_a_damaged_file_is_one_line(tmp_path):
    state = tiny_state()
    ms.save_checkpoint([{"name": k, "data": v} for k, v in state.parameters().items()], str(tmp_path / "new.ckpt"),
                       append_dict={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(XrayError, match="newer than this xray"):
        read_state(tmp_path / "new.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(XrayError, match="not a readable checkpoint"):
        read_state(tmp_path / "bad.ckpt")


@pytest.mark.unit
def test_a_state_of_another_model_is_refused_in_one_line(tmp_path):
    state = tiny_state()
    state.save(tmp_path / "last.ckpt")
    other = nn.Dense(4, 5)  # other shapes, other names
    with pytest.raises(XrayError, match="does not hold this model's state"):
        TrainingState(other, nn.Momentum(other.trainable_params(), 0.1, 0.9), None, {}).restore(
            read_state(tmp_path / "last.ckpt"))


def interrupted(run, dest):
    """A copy of a finished run with its result removed: resuming continues from last.ckpt."""
    shutil.copytree(run, dest)
    (dest / "metrics.json").unlink()
    return dest


def test_a_run_resumes_with_its_own_settings_only(trained_run, tmp_path):
    """A checkpoint made at 72 px continues only at 72 px: another input size (or task) asked
    for explicitly is refused in one line naming the setting, and nothing is written."""
    from xray.train import train
    run = interrupted(trained_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    cfg = make_cfg("config", TINY + [f"data.dir={sample_dir(trained_run)}", "data.image_size=80", "epochs=3"])
    with pytest.raises(XrayError, match=r"preprocess.image_size: 72 there, 80 asked"):
        train(cfg, run)
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before


def sample_dir(run) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.load(run / "config.yaml").data.dir


def test_a_run_of_format_1_resumes_and_its_best_checkpoint_evaluates(trained_run, tmp_path):
    """Runs written before the redesign (tests/data/old_runs: real files of commit b93b4ef,
    checkpoints as it wrote them) resume -- history from history.jsonl, input pipeline from
    config.yaml -- and their best.ckpt loads with config.yaml's preprocessing."""
    from xray.train import train
    run = old_run("binary", tmp_path / "old", trained_run / "checkpoints")
    (run / "metrics.json").unlink()  # interrupted after epoch 2
    saved = read_state(run / "checkpoints" / "last.ckpt")
    assert saved.format_version == 1 and saved.identity is None and [h["epoch"] for h in saved.history] == [1, 2]

    model = load_trained_model(run / "checkpoints" / "best.ckpt")
    new = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    assert model.spec == new.spec and model.classes == new.classes
    x = np.random.default_rng(0).normal(size=(2, 1, 72, 72)).astype(np.float32)
    np.testing.assert_allclose(model.probabilities(x), new.probabilities(x), rtol=1e-6)

    old_history = (run / "history.jsonl").read_text().splitlines()
    cfg = make_cfg("config", TINY + [f"data.dir={sample_dir(trained_run)}", "epochs=3", "train.eval_splits=[]",
                                     "train.cam_images=0", "train.keep_last=true"])
    result = train(cfg, run)
    assert result["status"] == "ok" and result["epochs_completed"] == 3
    history = (run / "history.jsonl").read_text().splitlines()
    assert history[:2] == old_history and json.loads(history[2])["epoch"] == 3
    assert read_state(run / "checkpoints" / "last.ckpt").format_version == FORMAT_VERSION  # upgraded
    assert "format_version" in read_checkpoint(run / "checkpoints" / "last.ckpt")
