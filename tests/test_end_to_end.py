"""End to end on the shipped sample: convert -> train -> evaluate -> predict, TensorBoard
contents, resume after a kill and after a requeue mid-epoch, divergence."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

import xray.callbacks
import xray.step
import xray.train
from helpers import SAMPLE, TINY, events, make_cfg
from xray.checkpoint import load_trained_model, read_checkpoint
from xray.evaluate import evaluate
from xray.files import to_json
from xray.hparams import AT_HALF, AT_VAL_THRESHOLD
from xray.predict import decision_threshold, format_results, list_images, predict_images
from xray.train import train

METRIC_KEYS = {"accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "ppv", "npv"}


def step_losses(run_dir: Path) -> dict[int, float]:
    """{TensorBoard step: train/loss} of a run."""
    return {e.step: e.value for e in events(run_dir).Scalars("train/loss")}


def test_train_writes_metrics_history_checkpoints(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 2
    assert metrics["best_epoch"] in (1, 2)
    assert set(metrics["best_val"]) >= METRIC_KEYS | {"loss"}
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    # the rate is the images trained (2 epochs of 3 batches of 8) over the epochs' time
    train_time = sum(h["time_s"] for h in history)
    assert metrics["train_images_per_s"] == pytest.approx(2 * 3 * 8 / train_time, rel=0.02)
    assert train_time <= metrics["wall_time_s"]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert not list((trained_run / "checkpoints").glob(".*"))  # no temp files left


def test_tensorboard_has_the_expected_tags(trained_run):
    acc = events(trained_run)
    tags = acc.Tags()
    steps_per_epoch = 31 // 8  # 31 train images in the converted sample, batch 8
    for tag in ("train/loss", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(2 * steps_per_epoch))
    for tag in ("val/loss", "val/accuracy", "val/auc", "val/sensitivity", "val/specificity",
                "val/balanced_accuracy", "train/epoch_loss"):
        assert len(acc.Scalars(tag)) == 2, tag
    assert len(acc.Images("val/confusion_matrix")) == 2
    assert len(acc.Images("val/grad_cam")) == 2  # where the model looks, every epoch
    assert "val/pr_curve" in tags["tensors"]
    # HParams in the run's own folder (no time-stamped sub-run)
    assert [p for p in trained_run.iterdir() if p.is_dir()] == [trained_run / "checkpoints"]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert {"lr", "momentum", "loss", "batch_size", "epochs", "seed", "schedule", "status"} <= set(hp)
    assert hp["loss"].string_value == "softmax_ce" and hp["status"].string_value == "ok"
    assert acc.Scalars("hparam/best_val_auc")[0].value == pytest.approx(
        json.loads((trained_run / "metrics.json").read_text())["best_val"]["auc"])


def test_evaluate_writes_metrics_with_ci_and_plots(trained_run):
    result = evaluate([trained_run / "checkpoints" / "best.ckpt"], "test", bootstrap=200, workers=1)
    text = (trained_run / "eval_test.json").read_text()
    assert json.loads(text) == json.loads(to_json(result))
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined metrics are null
    assert result["images"] == 20 and result["positives"] == 10
    for key in (AT_VAL_THRESHOLD, AT_HALF):
        block = result[key]
        assert set(block) >= METRIC_KEYS | {"confusion_matrix", "threshold"}
        for m in METRIC_KEYS:
            lo, hi = block[m]["ci95"]
            value = block[m]["value"]
            assert np.isnan(value) or lo - 1e-9 <= value <= hi + 1e-9
        assert np.array(block["confusion_matrix"]).sum() == 20
    assert result[AT_HALF]["threshold"] == 0.5
    assert result[AT_VAL_THRESHOLD]["rule"] == "sensitivity>=0.93"  # the rule the run trained with
    for name in ("roc_test.png", "confusion_test.png", "predictions_test.csv"):
        assert (trained_run / name).stat().st_size > 0
    lines = (trained_run / "predictions_test.csv").read_text().splitlines()
    assert lines[0] == "file_name,label,p_pneumonia" and len(lines) == 21


def test_thresholds_handed_on_from_val_keep_where_they_came_from(trained_run, tmp_path):
    """The end of a training hands val's threshold to test (no second val pass) with its
    rule: a fallback to 0.5 (val of one class only) is not called a val rule on test."""
    from xray.evaluate import chosen_thresholds
    from xray.hparams import NO_RULE
    run = tmp_path / "run"  # (a copy: the session's run keeps its own eval files)
    shutil.copytree(trained_run, run)
    val = evaluate([run / "checkpoints" / "best.ckpt"], "val", bootstrap=0, workers=1)
    assert chosen_thresholds(val) == {"binary": (val[AT_VAL_THRESHOLD]["threshold"], "sensitivity>=0.93")}
    test = evaluate([run / "checkpoints" / "best.ckpt"], "test", bootstrap=0, workers=1,
                    val_thresholds={"binary": (0.5, NO_RULE)})
    assert (test[AT_VAL_THRESHOLD]["threshold"], test[AT_VAL_THRESHOLD]["rule"]) == (0.5, NO_RULE)


def test_evaluate_cli_can_choose_the_threshold_for_a_target_sensitivity(trained_run, tmp_path):
    """xray.evaluate threshold_rule=sensitivity (issue 7) on a two-class model: the threshold is
    the highest whose val sensitivity is still >= target_sensitivity, and says so; the files
    carry the rule's name, so the run's own evaluation is not replaced."""
    from xray.metrics import sensitivity_threshold
    run = tmp_path / "run"  # (a copy: the session's run keeps its own eval files)
    shutil.copytree(trained_run, run)
    own = {name: (run / name).read_bytes() for name in ("eval_val.json", "predictions_val.csv")}
    proc = subprocess.run([sys.executable, "-m", "xray.evaluate", f"ckpt={run}/checkpoints/best.ckpt",
                           "split=val", "bootstrap=0", "workers=1", "threshold_rule=sensitivity",
                           "target_sensitivity=0.9", f"hydra.run.dir={tmp_path / 'evaluate'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the run's own files stay, this rule's get its name
    assert {name: (run / name).read_bytes() for name in own} == own
    result = json.loads((run / "eval_val_sensitivity0.9.json").read_text())[AT_VAL_THRESHOLD]
    val = np.loadtxt(run / "predictions_val_sensitivity0.9.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    assert result["rule"] == "sensitivity>=0.9"
    assert result["threshold"] == pytest.approx(sensitivity_threshold(val[:, 0], val[:, 1], 0.9), abs=2e-6)
    assert result["sensitivity"]["value"] >= 0.9


def test_predict_file_and_folder_match_evaluation(trained_run, tmp_path):
    model = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    folder = SAMPLE / "test" / "PNEUMONIA"
    results = predict_images([model], list_images(folder), plot_dir=tmp_path)
    assert len(results) == 10 and all(r["label"] in ("NORMAL", "PNEUMONIA") for r in results)
    assert len(list(tmp_path.glob("*.png"))) == 10
    # the same probabilities as the evaluation pipeline gives for those files
    csv = (trained_run / "predictions_test.csv").read_text().splitlines()[1:]
    evaluated = {line.split(",")[0]: float(line.split(",")[2]) for line in csv}
    for r in results:
        assert r["p_pneumonia"] == pytest.approx(evaluated[Path(r["file"]).name], abs=1e-5)
    table = format_results(results).splitlines()
    assert table[0].split() == ["file", "label", "p(pneumonia)"] and len(table) == 11


def test_predict_reads_at_the_threshold_val_chose_else_says_why(trained_run, tmp_path):
    import dataclasses

    model = load_trained_model(trained_run / "checkpoints" / "best.ckpt")
    val = json.loads((trained_run / "eval_val.json").read_text())
    chosen = val[AT_VAL_THRESHOLD]["threshold"]
    assert chosen != 0.5  # else the val threshold and the fallback could not be told apart
    threshold = decision_threshold([model], "val")
    assert threshold.value == chosen and not threshold.fallback
    assert str(trained_run / "eval_val.json") in threshold.where and "on val" in threshold.where
    assert decision_threshold([model], 0.3)[::2] == (0.3, False)
    # the run folder moved (the recorded path is gone): the same checkpoints/best.ckpt below it
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    (moved / "checkpoints" / "best.ckpt").symlink_to(trained_run / "checkpoints" / "best.ckpt")
    (moved / "eval_val.json").write_text(json.dumps({**val, "checkpoint": "/gone/tiny/checkpoints/best.ckpt"}))
    at_moved = dataclasses.replace(model, run_dir=moved, checkpoint=moved / "checkpoints" / "best.ckpt")
    assert decision_threshold([at_moved], "val").value == chosen
    # no val evaluation of exactly this model: 0.5, and a warning that says why
    for case, edit, why in [
            ("list", None, "a list of checkpoints has no val evaluation"),
            ("missing", None, "does not exist"),
            ("other checkpoint", {"checkpoint": str(trained_run / "checkpoints" / "last.ckpt")}, "last.ckpt, not"),
            ("ensemble's", {"checkpoint": [val["checkpoint"]] * 2}, "evaluated an ensemble of 2"),
            ("other data", {"data_dir": str(tmp_path)}, f"evaluated on {tmp_path}, not on the run's"),
            ("other temperature", {"calibration": {**val["calibration"], "temperature": 1.7}}, "another temperature")]:
        (moved / "eval_val.json").unlink(missing_ok=True)
        if edit:
            (moved / "eval_val.json").write_text(json.dumps({**val, **edit}))
        threshold = decision_threshold([at_moved, at_moved] if case == "list" else [at_moved], "val")
        assert threshold[::2] == (0.5, True) and why in threshold.where, (case, threshold.where)
    assert decision_threshold([model], "val", tta=2).fallback  # eval_val_tta2.json: not written yet
    # an ensemble's own evaluation in its (best) folder: its members, their temperatures
    both = [at_moved, at_moved]
    (moved / "eval_val.json").write_text(json.dumps({
        **val, "checkpoint": [str(at_moved.checkpoint)] * 2,
        "calibration": {**val["calibration"], "temperature": [None, None]}}))
    assert decision_threshold(both, "val", folder=moved).value == chosen
    assert decision_threshold([at_moved], "val", folder=moved).fallback


def test_predict_cli_prints_table_and_plots(trained_run, tmp_path):
    image = sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[0]
    proc = subprocess.run(
        [sys.executable, "-m", "xray.predict", f"ckpt={trained_run}/checkpoints/best.ckpt",
         f"image={image}", "plot=true", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith(str(image))]
    assert len(row) == 1 and row[0].split()[1] in ("NORMAL", "PNEUMONIA")
    csv = (trained_run / "predictions_test.csv").read_text().splitlines()[1:]
    evaluated = {line.split(",")[0]: float(line.split(",")[2]) for line in csv}
    assert float(row[0].split()[2]) == pytest.approx(evaluated[image.name], abs=1e-4)  # printed to 4 places
    # the label at the threshold val chose (the one the run's figures are read at), said after the table
    threshold = json.loads((trained_run / "eval_val.json").read_text())[AT_VAL_THRESHOLD]["threshold"]
    assert row[0].split()[1] == ("PNEUMONIA" if evaluated[image.name] >= threshold else "NORMAL")
    assert f"threshold {threshold:.4f} (" in proc.stdout + proc.stderr
    assert (tmp_path / f"{image.stem}.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_after_kill_continues_from_saved_epoch(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = TINY + [f"data.dir={sample_data}", "epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "xray.train", *overrides,
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # like a node failure: no chance to clean up
    proc.wait()
    assert last.exists(), "the first epoch never finished"
    saved_epoch = int(read_checkpoint(last)["epoch"].asnumpy())
    assert 1 <= saved_epoch < 3  # killed mid-run, so there is something to resume
    earlier = float(read_checkpoint(last)["wall_time_s"].asnumpy())
    assert earlier > 0

    cfg = make_cfg("config", overrides + ["train.resume=true"])
    result = train(cfg, run_dir)
    assert result["status"] == "ok" and result["epochs_completed"] == 3
    # the run's wall time counts the killed job's, until the state it resumed from
    assert result["wall_time_s"] == pytest.approx(earlier + result["wall_time_this_job_s"], abs=0.02)
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    steps = [e.step for e in events(run_dir).Scalars("train/loss")]
    assert sorted(set(steps)) == list(range(3 * 3))  # the TensorBoard step continues


class Requeued(BaseException):
    """What submitit's SIGUSR2 handler does: requeue, then leave the process."""


def submitit_like_handler(signum, frame):
    raise Requeued()


def test_processes_forked_under_the_guard_leave_job_signals_to_it():
    """Slurm signals every process of a job (SIGCONT comes with the time-limit SIGUSR2). A
    dataset worker forked from the training must not inherit submitit's Python handlers: they
    make its blocking msgrcv fail with EINTR and the worker die (tests/test_slurm.py checks the
    outcome on a real job)."""
    bypass = lambda signum, frame: None  # noqa: E731
    previous = {s: signal.signal(s, bypass) for s in (signal.SIGUSR2, signal.SIGCONT, signal.SIGTERM)}
    try:
        xray.callbacks.PreemptionGuard()
        pid = os.fork()
        if pid == 0:  # the child: report its dispositions through its exit code
            os._exit(int(signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN)
                     + 2 * int(signal.getsignal(signal.SIGCONT) is signal.SIG_DFL)
                     + 4 * int(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL))
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
        assert signal.getsignal(signal.SIGCONT) is bypass  # the training process keeps its own
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def test_nan_loss_stops_cleanly_as_diverged(sample_data, tmp_path):
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "lr=1e30", "momentum=0.99",
                                     "optim.warmup_epochs=0", "epochs=3"])
    result = train(cfg, tmp_path)
    assert result["status"] == "diverged"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"
    hp = plugin_data_pb2.HParamsPluginData.FromString(
        events(tmp_path).PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["status"].string_value == "diverged"


