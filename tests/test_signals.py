"""xray.signals and `xray.report --signals`: which val signal tracks the held-out figures, as
Spearman's rho with a permutation p-value (and a CI from 10 runs on) across runs and across seed
means; a loss counts reversed (lower is better), and the report ranks by the same val signals."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from xray.calibration import ece, nll
from xray.report import collect, main, signals, table
from xray.signals import spearman


def block(auc: float, specificity: float, accuracy: float) -> dict:
    value = lambda v: {"value": v, "ci95": [v, v]}  # noqa: E731
    return {"at_val_threshold": {"rule": "sensitivity>=0.93", "threshold": 0.5,
                                                   "auc": value(auc), "specificity": value(specificity),
                                                   "accuracy": value(accuracy)}}


def fake_run(folder, lr: float, seed: int, val: tuple, test: tuple, p_val: np.ndarray, y_val: np.ndarray) -> None:
    """A finished binary run folder as the report reads it: config, metrics, eval_{val,test}.json
    (val: (auc, specificity), test: (auc, specificity, accuracy)) and predictions_val.csv."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"lr: {lr}\nseed: {seed}\ntask:\n  name: binary\n")
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", "best_val": {"auc": val[0]}}))
    as_trained = {"nll": nll(y_val, p_val), "ece": ece(y_val, p_val)}  # (evaluate's calibration.uncalibrated)
    (folder / "eval_val.json").write_text(json.dumps({"split": "val", "task": "binary", **block(val[0], val[1], 0.9),
                                                      "calibration": {"temperature": None, "uncalibrated": as_trained}}))
    (folder / "eval_test.json").write_text(json.dumps({"split": "test", "task": "binary", **block(*test)}))
    rows = "".join(f"x{i}.jpeg,{int(t)},{p:.6f}\n" for i, (t, p) in enumerate(zip(y_val, p_val)))
    (folder / "predictions_val.csv").write_text("file_name,label,p_pneumonia\n" + rows)


@pytest.fixture
def six_runs(tmp_path):
    """Three lrs x two seeds. The sharper a run's val probabilities, the lower its val log-loss
    and the better its test AUC; its val AUC runs the other way."""
    y = np.array([0, 1] * 20)
    for k, (lr, seed) in enumerate([(lr, s) for lr in (0.01, 0.02, 0.03) for s in (1, 2)]):
        sharp = 0.1 + 0.08 * k
        p = np.where(y == 1, 0.5 + sharp, 0.5 - sharp)
        fake_run(tmp_path / f"{k}_run", lr, seed, (0.99 - 0.001 * k, 0.95), (0.96 + 0.004 * k, 0.80 + 0.01 * k, 0.9),
                 p, y)
    return tmp_path


@pytest.mark.unit
def test_spearman_its_permutation_p_and_its_interval():
    x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    stat = spearman(x, y)
    assert stat["n"] == 6 and stat["rho"] == pytest.approx(spearmanr(x, y)[0])  # 0.829
    # every order of 6: |rho| >= 0.829 in 42 of 720 (scipy.stats.permutation_test says the same)
    assert stat["p"] == pytest.approx(42 / 720) and stat["ci95"] == [None, None]  # no CI below 10 runs
    perfect = spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert perfect["rho"] == pytest.approx(1) and perfect["p"] == pytest.approx(2 / 24)  # 4 runs: no proof
    x12 = np.arange(12.0)
    y12 = x12 + np.array([3, -2, 4, 0, -3, 2, 5, -4, 1, -1, 3, -2])
    stat = spearman(x12, y12)
    rho = spearmanr(x12, y12)[0]
    half = 1.96 * np.sqrt((1 + rho ** 2 / 2) / 9)  # Fisher's z, Bonett-Wright's standard error
    assert stat["rho"] == pytest.approx(rho) and stat["p"] < 0.05
    assert stat["ci95"] == pytest.approx([np.tanh(np.arctanh(rho) - half), np.tanh(np.arctanh(rho) + half)])
    assert spearman([1, 2], [1, 2])["rho"] is None and spearman([1, 1, 1], [1, 2, 3])["rho"] is None


@pytest.mark.unit
def test_the_signal_that_tracks_the_test_half_is_found_across_runs_and_seed_means(six_runs, tmp_path):
    rows = {(r["level"], r["signal"], r["target"]): r for r in signals([str(six_runs / "*_run")], out=io.StringIO())}
    loss = rows[("runs", "val_log_loss", "test_auc")]
    assert loss["n"] == 6 and loss["rho"] == pytest.approx(1.0)  # lower loss, better test: counted as +1
    assert rows[("runs", "val_auc", "test_auc")]["rho"] == pytest.approx(-1.0)
    means = rows[("seed means", "val_log_loss", "test_specificity")]
    assert means["n"] == 3 and means["rho"] == pytest.approx(1.0)
    assert rows[("runs", "val_specificity", "test_auc")]["rho"] is None  # the same val specificity everywhere

    main(["--signals", str(six_runs / "*_run"), "--figure", str(tmp_path / "signals.png"), "--markdown"])
    assert (tmp_path / "signals.png").stat().st_size > 0
    ranked = collect(six_runs, "val_log_loss")  # the report ranks by it: lowest loss first, and shows it
    assert [m.name for m in ranked][:2] == ["5_run", "4_run"]
    assert "val_log_loss" in table(ranked, rank_by="val_log_loss").splitlines()[0].split()


@pytest.mark.unit
def test_too_few_runs_for_the_study_is_one_line(six_runs, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--signals", str(six_runs / "0_run"), str(six_runs / "1_run")])
    assert e.value.code != 0
    assert "--signals: 2 finished runs" in capsys.readouterr().err
