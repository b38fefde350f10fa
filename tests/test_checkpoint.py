"""xray.checkpoint: the training state is what last.ckpt holds (format 2), old runs (format 1)
still resume and evaluate, and a checkpoint serves only the settings it was made with."""
from __future__ import annotations

import json
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from helpers import TINY_OLD_DEFAULT, make_cfg
from old_runs import format1, old_run
from xray.checkpoint import (FORMAT_VERSION, RunState, TrainingState, check_identity, load_trained_model,
                             read_checkpoint, read_state, resolve_checkpoints)
from xray.errors import RunRefused, XrayError


class TinyNet(nn.Cell):
    """A dense layer and a batch norm: trainable and non-trainable parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def construct(self, x):
        return self.bn(self.fc(x))


def tiny_state(identity=None, scaler=None) -> TrainingState:
    net = TinyNet()
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    return TrainingState(net, opt, scaler, identity or {"task": "binary", "model": {"name": "tiny"}})


@pytest.mark.unit
def test_the_state_round_trips_with_non_trainable_parameters_history_and_identity(tmp_path):
    state = tiny_state()
    state.net.bn.moving_mean.set_data(ms.Tensor(np.array([1.0, 2.0, 3.0], np.float32)))
    state.optimizer.moments[0].set_data(ms.Tensor(np.full((3, 4), 0.25, np.float32)))
    state.run = RunState(epoch=3, step_in_epoch=1, epoch_loss_sum=0.5, best_auc=0.75, best_epoch=2, wall_time_s=81.5)
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
def test_the_loss_scale_of_mixed_precision_is_saved_and_restored(tmp_path):
    def scaler(value):
        return ms.amp.DynamicLossScaler(scale_value=value, scale_factor=2, scale_window=1000)

    state = tiny_state(scaler=scaler(2.0 ** 16))
    ms.ops.assign(state.scaler.scale_value, ms.Tensor(2.0 ** 10, ms.float32))  # after overflows
    state.save(tmp_path / "last.ckpt")
    fresh = tiny_state(scaler=scaler(2.0 ** 16))
    fresh.restore(read_state(tmp_path / "last.ckpt"))
    assert float(fresh.scaler.scale_value.asnumpy()) == 2.0 ** 10


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


@pytest.mark.unit
def test_a_checkpoint_serves_only_the_identity_it_records(tmp_path):
    """Another model or input is refused naming the keys; another split of the data set, as
    other images; keys the checkpoint does not record are not compared."""
    identity = {"task": "binary", "preprocess": {"image_size": 72, "equalize": "none"},
                "data": {"train": "ab12", "val": "cd34"}}
    check_identity(identity, dict(identity, extra={"new_key": 1}), tmp_path / "last.ckpt")
    with pytest.raises(RunRefused, match=r"last.ckpt was made with other settings \(preprocess.image_size: "
                                         r"72 there, 80 asked\)"):
        check_identity(identity, dict(identity, preprocess={"image_size": 80, "equalize": "none"}),
                       tmp_path / "last.ckpt")
    with pytest.raises(RunRefused, match="trained on other images: the val split"):
        check_identity(identity, dict(identity, data={"train": "ab12", "val": "ef56"}), tmp_path / "last.ckpt")
    # a checkpoint of before model.norm records model.lrn: compared as model.norm
    old = dict(identity, model={"name": "alexnet", "lrn": True})
    check_identity(old, dict(identity, model={"name": "alexnet", "norm": "lrn", "init": "mindspore"}), tmp_path)
    with pytest.raises(RunRefused, match="model.norm: 'lrn' there, 'none' asked"):
        check_identity(old, dict(identity, model={"name": "alexnet", "norm": "none", "init": "mindspore"}), tmp_path)


def interrupted(run, dest, epochs: int):
    """A copy of a finished run with its result removed, begun as an `epochs`-epoch run:
    resuming continues from last.ckpt."""
    from omegaconf import OmegaConf
    shutil.copytree(run, dest)
    (dest / "metrics.json").unlink()
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(dest / "config.yaml"), {"epochs": epochs}), dest / "config.yaml")
    return dest


def test_a_run_resumes_with_its_own_settings_only(trained_run, tmp_path):
    """A run begun at 72 px continues only at 72 px: another input size (or task) asked for
    explicitly is refused in one line naming the setting, and nothing is written."""
    from xray.train import train
    run = interrupted(trained_run, tmp_path / "run", epochs=3)
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    cfg = make_cfg("config", TINY_OLD_DEFAULT + [f"data.dir={sample_dir(trained_run)}", "data.image_size=80", "epochs=3"])
    with pytest.raises(RunRefused, match=r"was begun with other settings \(data.image_size: 72 -> 80\)"):
        train(cfg, run)
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before
    assert not (run / "metrics.json").exists()  # a refusal is not a failure of the run


def sample_dir(run) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.load(run / "config.yaml").data.dir


def test_a_run_of_format_1_resumes_and_its_best_checkpoint_evaluates(trained_run, tmp_path):
    """Runs written before the redesign (tests/data/old_runs: real files of commit b93b4ef,
    checkpoints as it wrote them) resume -- history from history.jsonl, input pipeline from
    config.yaml -- and their best.ckpt loads with config.yaml's preprocessing."""
    from xray.train import train
    from omegaconf import OmegaConf
    run = old_run("binary", tmp_path / "old", trained_run / "checkpoints")
    (run / "metrics.json").unlink()  # interrupted after epoch 2 (of 3, below)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(run / "config.yaml"), {"epochs": 3}), run / "config.yaml")
    saved = read_state(run / "checkpoints" / "last.ckpt")
    assert saved.format_version == 1 and saved.identity is None and [h["epoch"] for h in saved.history] == [1, 2]

    model = load_trained_model(run / "checkpoints" / "best.ckpt")
    new = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    assert model.spec == new.spec and model.classes == new.classes
    x = np.random.default_rng(0).normal(size=(2, 1, 72, 72)).astype(np.float32)
    np.testing.assert_allclose(model.probabilities(x), new.probabilities(x), rtol=1e-6)

    old_history = (run / "history.jsonl").read_text().splitlines()
    cfg = make_cfg("config", TINY_OLD_DEFAULT + [f"data.dir={sample_dir(trained_run)}", "epochs=3", "train.eval_splits=[]",
                                     "train.cam_images=0", "train.keep_last=true"])
    result = train(cfg, run)
    assert result["status"] == "ok" and result["epochs_completed"] == 3
    history = (run / "history.jsonl").read_text().splitlines()
    assert history[:2] == old_history and json.loads(history[2])["epoch"] == 3
    assert read_state(run / "checkpoints" / "last.ckpt").format_version == FORMAT_VERSION  # upgraded
    assert "format_version" in read_checkpoint(run / "checkpoints" / "last.ckpt")


def test_resume_restores_weights_and_optimizer_state(trained_run):
    """The tiny run's last.ckpt restores into a network and optimizer built from the config:
    weights, momenta, the optimizer's step, the loop's state, the history and the identity."""
    from xray.registry import create_model, create_schedule
    from xray.step import build_optimizer
    cfg = make_cfg("config", TINY_OLD_DEFAULT)
    net = create_model(cfg.model, 72, 2)
    opt = build_optimizer(net, cfg, create_schedule(cfg.lr, cfg.optim, 2, 3))
    saved = read_state(trained_run / "checkpoints" / "last.ckpt")
    state = TrainingState(net, opt, None, identity=saved.identity)
    state.restore(saved)
    params = read_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    assert saved.format_version == FORMAT_VERSION
    assert state.run.epoch == 2 and state.run.step_in_epoch == 0 and state.run.best_epoch in (1, 2)
    assert [h["epoch"] for h in state.history] == [1, 2]
    assert saved.identity["preprocess"]["image_size"] == 72 and saved.identity["classes"] == ["NORMAL", "PNEUMONIA"]
    assert int(opt.global_step.asnumpy()) == 2 * 3
    for p in list(opt.moments)[:3] + net.trainable_params()[:3]:
        assert np.array_equal(p.asnumpy(), params[p.name].asnumpy()), p.name


def test_checkpoints_from_before_dropout_masks_still_load(trained_run, tmp_path):
    """Until dropout masks became inputs, the dense layers were classifier.0/3/6."""
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    params = format1(read_checkpoint(trained_run / "checkpoints" / "best.ckpt"))
    old_names = {"fc1.": "classifier.0.", "fc2.": "classifier.3.", "fc3.": "classifier.6."}
    renamed = []
    for name, value in params.items():
        prefix = next((p for p in old_names if name.startswith(p)), None)
        renamed.append({"name": old_names[prefix] + name[len(prefix):] if prefix else name,
                        "data": value})
    assert any(r["name"].startswith("classifier.6.") for r in renamed)
    ms.save_checkpoint(renamed, str(run / "checkpoints" / "best.ckpt"))
    old = load_trained_model(run / "checkpoints" / "best.ckpt")
    new = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    x = np.random.default_rng(0).normal(size=(2, 1, 72, 72)).astype(np.float32)
    np.testing.assert_allclose(old.probabilities(x), new.probabilities(x), rtol=1e-6)


@pytest.mark.unit
def test_resolve_checkpoints(tmp_path):
    assert resolve_checkpoints("a.ckpt") == [tmp_path.__class__("a.ckpt")]
    assert [p.name for p in resolve_checkpoints(["x/a.ckpt", "y/b.ckpt"])] == ["a.ckpt", "b.ckpt"]
    for ckpt in (None, ""):
        with pytest.raises(XrayError, match="ckpt is not set"):
            resolve_checkpoints(ckpt)
    (tmp_path / "members" / "1").mkdir(parents=True)
    (tmp_path / "members" / "1" / "best.ckpt").write_bytes(b"x")
    assert resolve_checkpoints(str(tmp_path), 1) == [tmp_path]  # its best.ckpt
    (tmp_path / "members" / "2").mkdir(parents=True)
    (tmp_path / "members" / "2" / "best.ckpt").write_bytes(b"x")
    assert resolve_checkpoints(str(tmp_path), 2) == [tmp_path / "members" / str(i) / "best.ckpt" for i in (1, 2)]
    with pytest.raises(XrayError, match="holds 2 ranked members, not top_k=3; run .*--top-k 3"):
        resolve_checkpoints(str(tmp_path), 3)
    with pytest.raises(XrayError, match="top_k works with a best folder"):
        resolve_checkpoints(["a.ckpt"], 2)


def test_a_checkpoint_loads_when_free_memory_is_all_page_cache(tmp_path, monkeypatch):
    """MindSpore 2.10 compares a checkpoint's size with *free* memory, which is near zero on a
    node whose page cache is full (CI, after writing ~10 GB of checkpoints): it refused a
    230 MB checkpoint with 20 GB available. Loading must judge by MemAvailable."""
    import os

    from mindspore.train import serialization

    from xray.checkpoint import memory_available, read_checkpoint
    if memory_available() is None:
        pytest.skip("no /proc/meminfo")
    own = serialization._get_available_memory  # undo an earlier read_checkpoint's patch
    monkeypatch.setattr(serialization, "_get_available_memory", getattr(own, "mindspore_own", own))
    path = tmp_path / "dense.ckpt"
    ms.save_checkpoint(ms.nn.Dense(64, 64), str(path))
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    with pytest.raises(ValueError, match="available memory"):
        ms.load_checkpoint(str(path))  # MindSpore's own reading: one free page
    assert read_checkpoint(path)["weight"].shape == (64, 64)
