"""xray.run_folder: a run folder holds one training; a rerun with other settings is refused
naming the keys and leaves every file as it was (.hydra/ included)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import TINY, make_cfg
from xray.run_folder import RunFolder


def snapshot(folder: Path) -> dict:
    """Every file's bytes but the job log (Hydra appends each start's lines to it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "train.log"}


def train_cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xray.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.unit
def test_changed_settings_names_defining_keys_only(tmp_path):
    run = RunFolder(tmp_path)
    recorded = make_cfg("config", TINY + ["data.dir=/data/a"])
    run.write_config(recorded, {"mean": 0.5})
    same_but_operational = make_cfg("config", TINY + ["data.dir=/elsewhere", "data.workers=4",
                                                      "train.log_every=7", "train.eval_splits=[test]"])
    assert run.changed_settings(same_but_operational) == []
    other = make_cfg("config", TINY + ["data.dir=/data/a", "loss=mse", "epochs=5"])
    assert sorted(run.changed_settings(other)) == ["epochs: 2 -> 5", "loss.name: 'softmax_ce' -> 'mse'"]
    assert RunFolder(tmp_path / "new").changed_settings(other) == []  # nothing recorded yet


@pytest.mark.unit
def test_a_config_of_before_model_norm_is_compared_with_todays_keys(tmp_path):
    """config.yaml of an older xray records model.lrn: true and no model.init."""
    run = RunFolder(tmp_path)
    run.write_config(make_cfg("config", TINY), {"mean": 0.5})
    old = OmegaConf.load(run.config)
    old.model = {"name": "alexnet", "in_channels": 1, "lrn": True, "dropout": 0.5}
    OmegaConf.save(old, run.config)
    assert run.changed_settings(make_cfg("config", TINY + ["model.norm=lrn"])) == []  # (the default: batch)
    assert run.changed_settings(make_cfg("config", TINY + ["model.norm=batch", "model.init=he"])) == [
        "model.norm: 'lrn' -> 'batch'", "model.init: 'mindspore' -> 'he'"]


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    base = [*TINY, f"data.dir={sample_data}", "epochs=1", "train.max_steps_per_epoch=1", "train.eval_splits=[]",
            f"hydra.run.dir={run_dir}"]
    first = train_cli(base, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(run_dir)
    assert ".hydra/config.yaml" in before and ".hydra.accepted/config.yaml" in before

    other = train_cli(base + ["loss=mse", "epochs=2"], tmp_path)
    assert other.returncode == 2, other.stderr[-2000:]
    errors = [line for line in other.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in other.stderr
    assert "loss.name: 'softmax_ce' -> 'mse'" in errors[0] and "epochs: 1 -> 2" in errors[0]
    assert "overwrite=true" in errors[0]
    assert snapshot(run_dir) == before  # metrics, checkpoints, config.yaml, events and .hydra/

    same = train_cli(base + ["data.workers=2"], tmp_path)  # an operational key may differ
    assert same.returncode == 0 and "already finished (status ok)" in same.stdout + same.stderr
    assert snapshot(run_dir) == before
