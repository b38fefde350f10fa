"""+sweep=optuna (hydra-optuna-sweeper, TPE): its search space passes the project's checks, and a
real study on the sample survives failed members, records the same HParams keys as the basic
sweeper, and ends with optimization_results.yaml that xray.report can read next to."""
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers import REPO, TINY, make_cfg
from xray.checks import TRAIN, check
from xray.hparams import hparams_of

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the `optuna` extra (also in `test`)

BASE = [o for o in TINY if o.split("=")[0] not in ("epochs", "data.image_size")] + [
    "epochs=1", "train.eval_splits=[]", "train.cam_images=0", "optim.warmup_epochs=0",
    "data/augment=mild", "data.equalize=none", "data.sampling=shuffle", "loss.label_smoothing=0"]
# Sampler seed 6 draws, in order (checked by running it): 72 px lr 0.01 (ok), 72 px lr 1e30
# (diverges in epoch 1: no val AUC, main returns None), 60 px (fails its check), 72 px lr 0.03 (ok).
STUDY = ["data.image_size=choice(72,60)", "lr=choice(0.01,0.03,1e30)", "hydra.sweeper.n_trials=4",
         "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=6"]


def run_sweep(cwd, overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "xray.train", "-m", "+sweep=optuna", *overrides],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_the_search_space_passes_the_training_checks():
    """Every choice (and both ends of every interval) composes and passes xray.checks: a typo
    in a key or a value the training refuses would fail every trial that draws it."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    sweep = OmegaConf.load(REPO / "sweeps" / "optuna.yaml").hydra.sweeper
    assert sweep.direction == "maximize" and sweep.max_failure_rate == 1.0
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweep.params.items()])
    assert not fixed and set(space) == {"data/augment", "data.equalize", "loss.label_smoothing",
                                        "data.sampling", "data.image_size", "epochs", "lr"}
    assert space["lr"].low == 1e-3 and space["lr"].high == 1e-1  # log-uniform
    for key, distribution in space.items():
        values = getattr(distribution, "choices", None) or (distribution.low, distribution.high)
        for value in values:
            cfg = make_cfg("config", ["+sweep=optuna", f"{key}={value}"])  # a missing key raises
            check(cfg, TRAIN)


@pytest.fixture(scope="module")
def optuna_sweep(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("optuna")
    sweep_dir = root / "multirun"
    proc = run_sweep(root, [f"data.dir={sample_data}", *BASE, *STUDY, f"hydra.sweep.dir={sweep_dir}"])
    members = {p.name.split("_")[0]: p for p in sweep_dir.iterdir() if p.is_dir()}
    return sweep_dir, proc, members


@pytest.mark.slow
def test_failed_members_do_not_stop_the_study(optuna_sweep):
    sweep_dir, proc, members = optuna_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(members) == ["0", "1", "2", "3"]  # the trials after the failures ran
    status = {n: json.loads((p / "metrics.json").read_text())["status"] for n, p in members.items()}
    assert status == {"0": "ok", "1": "diverged", "2": "failed", "3": "ok"}
    assert "Return value must be float-castable. Got 'None'" in proc.stdout  # the diverged one
    # the failed member's record is that of any failed member (tests/test_sweeps.py)
    failed = json.loads((members["2"] / "metrics.json").read_text())
    assert "data.image_size=60 must be an integer >= 67" in failed["error"]
    assert failed["hparams"]["image_size"] == 60
    assert "data.image_size=60 must be an integer >= 67" in proc.stderr


@pytest.mark.slow
def test_the_best_value_is_the_best_members_val_auc(optuna_sweep):
    sweep_dir, _, members = optuna_sweep
    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    ok = [json.loads((p / "metrics.json").read_text()) for p in members.values()]
    ok = [m for m in ok if m["status"] == "ok"]
    best = max(ok, key=lambda m: m["best_val"]["auc"])
    assert result.best_value == pytest.approx(best["best_val"]["auc"], abs=1e-12)
    assert result.best_params["lr"] == best["hparams"]["lr"]
    assert result.best_params["data.image_size"] == best["hparams"]["image_size"] == 72


@pytest.mark.slow
def test_members_record_the_hparams_of_the_basic_sweeper(optuna_sweep, sample_data):
    from test_sweeps import hparams_of_run

    _, _, members = optuna_sweep
    for n, path in members.items():
        metrics = json.loads((path / "metrics.json").read_text())
        hp = metrics["hparams"]
        # the same run without Optuna (with the sweep file's own pins): same keys, and the same
        # values for the drawn overrides
        plain = hparams_of(make_cfg("config", ["+sweep=optuna", f"data.dir={sample_data}", *BASE,
                                               f"lr={hp['lr']}", f"data.image_size={hp['image_size']}"]))
        assert hp == plain, n
        assert set(hparams_of_run(path)) == set(plain) | {"status"}, n  # TensorBoard's HParams tab


@pytest.mark.slow
def test_the_report_reads_an_optuna_sweep(optuna_sweep, tmp_path, capsys):
    from xray.report import main

    sweep_dir, _, members = optuna_sweep
    main([str(sweep_dir), "--best-root", str(tmp_path / "best")])
    assert "2 ok, 1 diverged, 1 failed" in capsys.readouterr().out
    # it exports the member whose val AUC Optuna reports as best_value
    best_value = OmegaConf.load(sweep_dir / "optimization_results.yaml").best_value
    best = json.loads((tmp_path / "best" / "optuna" / "metrics.json").read_text())
    assert best["best_val"]["auc"] == pytest.approx(best_value, abs=1e-12)
    assert best["source"] in {str(p) for p in members.values()}
    assert (sweep_dir / "report.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_a_study_without_a_completed_trial_fails(sample_data, tmp_path):
    proc = run_sweep(tmp_path, [f"data.dir={sample_data}", *BASE, "data.image_size=60",
                                "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert proc.returncode != 0
    assert "No trials are completed yet" in proc.stderr
    assert not (tmp_path / "multirun" / "optimization_results.yaml").exists()
