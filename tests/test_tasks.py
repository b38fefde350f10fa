"""Pneumonia type: the task label maps, a data set that cannot train a task, the split by
subtype, and every task end to end on the sample (convert -> train -> evaluate -> predict)."""
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from helpers import SAMPLE, TINY, copy_sample, make_cfg
from xray.checkpoint import load_trained_model
from xray.convert import Item, convert, split_by_patient
from xray.data import check_task, read_manifest, split_file, task_records
from xray.errors import XrayError
from xray.labels import TASK_CLASSES, binary_read_offs, supported_tasks, task_targets
from xray.metrics import sensitivity_threshold, youden_threshold
from xray.predict import decision_threshold, format_results, predict_images
from xray.train import train


@pytest.mark.unit
def test_one_label_map_per_task():
    subtypes = ["normal", "bacteria", "virus", "unknown", "normal"]
    assert [list(a) for a in task_targets("binary", subtypes)] == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 0]]
    assert [list(a) for a in task_targets("subtype", subtypes)] == [[0, 1, 2, 4], [0, 1, 2, 0]]
    assert [list(a) for a in task_targets("bacterial_vs_viral", subtypes)] == [[1, 2], [1, 0]]
    assert TASK_CLASSES["subtype"] == ("NORMAL", "BACTERIAL", "VIRAL")
    assert TASK_CLASSES["bacterial_vs_viral"][1] == "BACTERIAL"  # class 1 = the positive class
    with pytest.raises(XrayError, match="task=viral is unknown; use binary, subtype, bacterial_vs_viral"):
        task_targets("viral", subtypes)


@pytest.mark.unit
def test_a_subtype_model_is_read_off_as_the_two_class_questions():
    labels = np.array([0, 1, 2, 1, 0])  # NORMAL, BACTERIAL, VIRAL, BACTERIAL, NORMAL
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    read = binary_read_offs("subtype", labels, probs)
    y, p = read["pneumonia_vs_normal"]
    assert list(y) == [0, 1, 1, 1, 0] and np.allclose(p, [0.3, 0.9, 0.8, 0.5, 0.0])
    y, p = read["bacterial_vs_viral"]  # the pneumonia images only; BACTERIAL = 1 as in its own task
    assert list(y) == [1, 0, 1] and np.allclose(p, [0.6 / 0.9, 0.2 / 0.8, 1.0])
    assert binary_read_offs("binary", labels, probs) == {} == binary_read_offs("bacterial_vs_viral", labels, probs)


@pytest.mark.unit
def test_supported_tasks_need_every_class():
    assert supported_tasks({"normal": 5, "bacteria": 3, "virus": 2}) == ["binary", "subtype", "bacterial_vs_viral"]
    assert supported_tasks({"normal": 5, "bacteria": 3}) == ["binary"]
    assert supported_tasks({"bacteria": 3, "virus": 2}) == ["bacterial_vs_viral"]


def test_a_data_set_without_viral_images_refuses_those_tasks_in_one_line(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=6, splits=("train",))
    for f in (root / "train" / "PNEUMONIA").glob("*virus*"):
        f.unlink()
    manifest = convert(root, tmp_path / "data", short_side=64, workers=1)
    assert manifest["tasks"] == ["binary"]
    assert check_task(manifest, "binary", tmp_path / "data")[1] == ("NORMAL", "PNEUMONIA")
    with pytest.raises(XrayError, match=r"task=subtype needs training images of every one of its classes "
                                        r"\(NORMAL, BACTERIAL, VIRAL\), but .* supports only task=binary"):
        check_task(manifest, "subtype", tmp_path / "data")


@pytest.mark.unit
def test_the_patient_split_is_stratified_by_subtype():
    import random
    rng = random.Random(0)
    items = []
    for subtype, n in (("normal", 60), ("bacteria", 120), ("virus", 40)):
        for p in range(n):
            for k in range(rng.randint(1, 3)):
                items.append(Item(Path(f"{subtype}{p}-{k}"), "train", int(subtype != "normal"), subtype,
                                  f"{subtype}{p}"))
    val = split_by_patient(items, 0.2, seed=1)
    for subtype in ("normal", "bacteria", "virus"):
        total = sum(it.subtype == subtype for it in items)
        share = sum(it.subtype == subtype and it.patient_id in val for it in items) / total
        assert 0.2 <= share <= 0.2 + 3 / total + 1e-9, (subtype, share)  # whole patients of <= 3


@pytest.fixture(scope="module")
def task_run(sample_data, tmp_path_factory):
    """(task, overrides...) -> the folder of a 1-epoch run on the sample, trained when first asked
    for. Shuffled sampling (not the default, balanced), so that the bacterial-vs-viral prior rule
    reads the train split's own share rather than 0.5."""
    runs = {}

    def run_of(task: str, *overrides: str) -> Path:
        if (task, *overrides) not in runs:
            run_dir = tmp_path_factory.mktemp(task) / "run"
            cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", f"task={task}", "epochs=1",
                                             "data.sampling=shuffle", "train.eval_bootstrap=50", *overrides])
            assert train(cfg, run_dir)["status"] == "ok"
            runs[(task, *overrides)] = run_dir
        return runs[(task, *overrides)]
    return run_of


def test_three_classes_end_to_end(task_run, sample_data, tmp_path):
    run = task_run("subtype")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["hparams"]["task"] == "subtype" and "auc_VIRAL" in metrics["best_val"]
    result = json.loads((run / "eval_test.json").read_text())
    assert result["classes"] == ["NORMAL", "BACTERIAL", "VIRAL"] and result["images"] == 20
    assert np.array(result["argmax"]["confusion_matrix"]).shape == (3, 3)
    assert np.array(result["argmax"]["confusion_matrix"]).sum() == 20
    for key in ("accuracy", "balanced_accuracy", "auc", "auc_NORMAL", "sensitivity_VIRAL", "specificity_BACTERIAL"):
        assert 0 <= result["argmax"][key]["value"] <= 1 and len(result["argmax"][key]["ci95"]) == 2
    header = (run / "predictions_test.csv").read_text().splitlines()[0]
    assert header == "file_name,label,p_normal,p_bacterial,p_viral"
    # the binary questions read off it, each thresholded on val: pneumonia vs normal ranks by
    # 1 - p(normal), so its AUC is NORMAL's one-vs-rest AUC
    read_off = result["read_off"]
    assert read_off["pneumonia_vs_normal"]["images"] == 20 and read_off["bacterial_vs_viral"]["images"] == 10
    assert read_off["pneumonia_vs_normal"]["at_val_threshold"]["auc"]["value"] == pytest.approx(
        result["argmax"]["auc_NORMAL"]["value"])
    val = np.loadtxt(run / "predictions_val.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    subtypes = read_manifest(sample_data)["splits"]["train"]["subtypes"]  # (shuffled sampling: its share)
    default_rule = {  # pneumonia vs normal: the defaults' sensitivity target; bacterial vs viral: the prior
        "pneumonia_vs_normal": (lambda y, p: sensitivity_threshold(y, p, 0.93), "sensitivity>=0.93"),
        "bacterial_vs_viral": (lambda y, p: subtypes["bacteria"] / (subtypes["bacteria"] + subtypes["virus"]),
                               "prior")}
    for name, (y_val, p_val) in binary_read_offs("subtype", val[:, 0].astype(int), val[:, 1:]).items():
        r = read_off[name]  # its threshold chosen on val by that rule (the val evaluation's, handed on)
        threshold, rule = default_rule[name]
        assert r["at_val_threshold"]["threshold"] == pytest.approx(threshold(y_val, p_val), abs=2e-6)
        assert r["at_val_threshold"]["rule"] == rule and r["at_0.5"]["threshold"] == 0.5
        assert np.array(r["at_val_threshold"]["confusion_matrix"]).sum() == r["images"]
        assert len(r["at_val_threshold"]["specificity"]["ci95"]) == 2
    model = load_trained_model(run / "checkpoints" / "best.ckpt")
    assert model.classes == ("NORMAL", "BACTERIAL", "VIRAL")
    images = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    results = predict_images([model], images, plot_dir=tmp_path, explain_dir=tmp_path)
    for r in results:
        assert r["p_normal"] + r["p_bacterial"] + r["p_viral"] == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(("NORMAL", "BACTERIAL", "VIRAL"), key=lambda c: r[f"p_{c.lower()}"])
        assert r["p_pneumonia"] == pytest.approx(1 - r["p_normal"], abs=1e-6)  # the read-off screened
        assert r["screen"] == ("PNEUMONIA" if r["p_pneumonia"] >= 0.5 else "NORMAL")
    assert format_results(results).splitlines()[0].split() == [
        "file", "label", "screen", "p(pneumonia)", "p(normal)", "p(bacterial)", "p(viral)"]
    # at the threshold this run's val evaluation chose for pneumonia vs normal, as its figures are
    assert decision_threshold([model], "val")[0] == read_off["pneumonia_vs_normal"]["at_val_threshold"]["threshold"]
    between = float(np.mean([r["p_pneumonia"] for r in results]))  # a threshold that splits these two
    assert [r["screen"] for r in predict_images([model], images, threshold=between)] == [
        "PNEUMONIA" if r["p_pneumonia"] >= between else "NORMAL" for r in results]
    assert len({r["screen"] for r in predict_images([model], images, threshold=between)}) == 2
    assert (tmp_path / f"{images[0].stem}_cam.png").exists()
    # TensorBoard: the 3x3 confusion image, one precision-recall curve per class, macro AUC in HParams
    from helpers import events
    acc = events(run)
    assert len(acc.Images("val/confusion_matrix")) == 1 and len(acc.Scalars("val/auc_VIRAL")) == 1
    assert {f"val/pr_curve/{c}" for c in model.classes} <= set(acc.Tags()["tensors"])
    assert acc.Scalars("hparam/best_val_auc")[0].value == pytest.approx(metrics["best_val"]["auc"])
    # the MindIR export has three outputs
    from xray.report import export_mindir
    export_mindir(run / "checkpoints" / "best.ckpt", tmp_path / "model.mindir")
    graph = ms.nn.GraphCell(ms.load(str(tmp_path / "model.mindir")))
    x = np.zeros((1, 1, model.spec.image_size, model.spec.image_size), np.float32)
    assert graph(ms.Tensor(x)).shape == (1, 3)


def test_the_sensitivity_rule_sets_the_pneumonia_threshold_and_leaves_bacterial_vs_viral_to_youden(
        task_run, sample_data, tmp_path):
    """threshold_rule=sensitivity (issue 7): at the end of training, the subtype model's pneumonia
    vs normal read-off is scored at the highest threshold that keeps val sensitivity >= target,
    named so; bacterial vs viral keeps Youden's. Through train's own end-of-run evaluation."""
    from xray.evaluate import evaluate_splits, summary
    from omegaconf import OmegaConf
    run = tmp_path / "run"  # (a copy, made a run trained with the rule: the module's run stays as it is)
    shutil.copytree(task_run("subtype"), run)
    cfg = OmegaConf.merge(OmegaConf.load(run / "config.yaml"),
                          {"train": {"threshold_rule": "sensitivity", "target_sensitivity": 0.9, "eval_bootstrap": 0,
                                     "bacterial_vs_viral_rule": "youden"}})
    OmegaConf.save(cfg, run / "config.yaml")
    out = evaluate_splits(run / "checkpoints" / "best.ckpt", sample_data, read_manifest(sample_data), cfg)
    assert set(out) == {"val", "test"}
    val = np.loadtxt(run / "predictions_val.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    read_offs = binary_read_offs("subtype", val[:, 0].astype(int), val[:, 1:])
    expected = {"pneumonia_vs_normal": (sensitivity_threshold(*read_offs["pneumonia_vs_normal"], 0.9),
                                        "sensitivity>=0.9"),
                "bacterial_vs_viral": (youden_threshold(*read_offs["bacterial_vs_viral"]), "youden")}
    for split in ("val", "test"):
        result = json.loads((run / f"eval_{split}.json").read_text())
        assert summary(result) == out[split]
        for name, (threshold, rule) in expected.items():
            r = result["read_off"][name]["at_val_threshold"]
            assert (r["threshold"], r["rule"]) == (pytest.approx(threshold, abs=2e-6), rule)
    pn_val = json.loads((run / "eval_val.json").read_text())["read_off"]["pneumonia_vs_normal"]
    assert pn_val["at_val_threshold"]["sensitivity"]["value"] >= 0.9


def test_a_subtype_ensemble_with_tta_averages_the_class_probabilities(task_run, tmp_path):
    """evaluate and predict with several K-class checkpoints and test-time views: the mean of
    each member's class probabilities, each member's the mean over its views."""
    from xray.evaluate import evaluate
    # the paper's LRN: with batch norm this one-epoch run (shuffled sampling) answers every sample
    # image about the same, and the scaled output layer below would only saturate that answer
    run = task_run("subtype", "model.norm=lrn")
    other = tmp_path / "other"  # a second member: the same run with a different output layer
    (other / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "train_images.txt"):  # (what a run folder says of its training)
        shutil.copy(run / name, other / name)
    params = ms.load_checkpoint(str(run / "checkpoints" / "best.ckpt"))
    rng = np.random.default_rng(0)
    for name, scale in (("fc3.weight", 50.0), ("fc3.bias", 1.0)):  # (a 1-epoch model is near uniform)
        value = params[name].asnumpy()
        value = scale * value + rng.standard_normal(value.shape) * np.abs(value).mean() * scale
        params[name] = ms.Parameter(ms.Tensor(value.astype(np.float32)), name=name)
    records = {k: v for k, v in params.items() if isinstance(v, str)}  # (the checkpoint's identity)
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items() if k not in records],
                       str(other / "checkpoints" / "best.ckpt"), append_dict=records)
    members = [run / "checkpoints" / "best.ckpt", other / "checkpoints" / "best.ckpt"]

    def probs(folder: Path, tag: str) -> np.ndarray:
        return np.loadtxt(folder / f"predictions_{tag}.csv", delimiter=",", skiprows=1, usecols=(2, 3, 4))

    for member in members:  # (one checkpoint's results go to its run folder)
        evaluate([member], split="test", tta=2, bootstrap=0)
    evaluate([members[1]], split="test", bootstrap=0)
    result = evaluate(members, split="test", tta=2, bootstrap=0, out_dir=tmp_path / "both")
    single = [probs(run, "test_tta2"), probs(other, "test_tta2")]
    assert np.abs(single[0] - single[1]).max() > 0.05  # two different members
    assert np.abs(single[1] - probs(other, "test")).max() > 1e-3  # the views count
    both = probs(tmp_path / "both", "test_tta2")
    assert np.allclose(both, (single[0] + single[1]) / 2, atol=2e-6)
    assert result["checkpoint"] == [str(m) for m in members] and result["tta"] == 2
    labels = np.loadtxt(tmp_path / "both" / "predictions_test_tta2.csv", delimiter=",", skiprows=1, usecols=1)
    assert result["argmax"]["accuracy"]["value"] == pytest.approx(np.mean(both.argmax(axis=1) == labels))
    image = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:1]
    models = [load_trained_model(m) for m in members]
    alone = [predict_images([m], image, tta=2)[0] for m in models]
    mean = predict_images(models, image, tta=2)[0]
    for c in ("normal", "bacterial", "viral"):
        assert mean[f"p_{c}"] == pytest.approx((alone[0][f"p_{c}"] + alone[1][f"p_{c}"]) / 2, abs=1e-6)


def test_the_explain_grid_of_a_subtype_model_has_each_class_wrong_and_right_calls(task_run, tmp_path):
    from xray.evaluate import class_picks, evaluate
    y = np.array([0, 1, 2, 1, 0, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],   # image 2: viral called bacterial
                      [0.3, 0.6, 0.1], [0.4, 0.1, 0.5], [0.1, 0.1, 0.8]])  # image 4: normal called viral
    picks = class_picks(y, probs, ("NORMAL", "BACTERIAL", "VIRAL"), 2)
    assert picks == {"called normal, wrongly": [], "called normal, rightly": [0],
                     "called bacterial, wrongly": [2], "called bacterial, rightly": [1, 3],
                     "called viral, wrongly": [4], "called viral, rightly": [5]}
    assert class_picks(y, probs, ("NORMAL", "BACTERIAL", "VIRAL"), 1)["called bacterial, rightly"] == [1]
    run = tmp_path / "run"  # (a copy: the module's run keeps its own eval files)
    shutil.copytree(task_run("subtype"), run)
    evaluate([run / "checkpoints" / "best.ckpt"], "test", bootstrap=0, workers=1, explain=1)
    assert (run / "cam_errors_test.png").stat().st_size > 0


def test_a_subtype_model_is_temperature_scaled_over_its_three_classes(task_run, tmp_path):
    """calibrate=true on a K-class model (issue 28.4): one temperature fitted on val over the
    three class probabilities (softmax(log p / T)), stored beside the checkpoint with the val
    ECE before and after; evaluate reports the top-class ECE before and after on the split, and
    predict applies it to every class's p."""
    from xray.calibration import calibration_metrics, fit_temperature, scale_probs
    from xray.evaluate import evaluate
    run = tmp_path / "run"  # (a copy: the module's run stays uncalibrated)
    shutil.copytree(task_run("subtype"), run)
    ckpt = run / "checkpoints" / "best.ckpt"
    images = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]
    raw = predict_images([load_trained_model(ckpt)], images)
    result = evaluate([ckpt], "test", bootstrap=0, workers=1, calibrate=True)
    record = json.loads((run / "calibration.json").read_text())
    t = record["temperature"]
    # the fit of the val predictions the training's own evaluation wrote (before any temperature)
    val = np.loadtxt(run / "predictions_val.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    assert t == pytest.approx(fit_temperature(val[:, 0].astype(int), val[:, 1:]), rel=1e-3)
    assert record["val_before"] == pytest.approx(calibration_metrics(val[:, 0].astype(int), val[:, 1:]), rel=1e-3)
    assert record["classes"] == 3 and record["val_after"]["nll"] <= record["val_before"]["nll"] + 1e-9
    calibration = result["calibration"]
    assert calibration["of"] == "top class" and calibration["temperature"] == t
    test = np.loadtxt(run / "predictions_test.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    y, probs = test[:, 0].astype(int), test[:, 1:]
    assert calibration["ece"] == pytest.approx(calibration_metrics(y, probs)["ece"], abs=1e-5)
    assert calibration["uncalibrated"]["ece"] != calibration["ece"]
    model = load_trained_model(ckpt)
    assert model.temperature == t
    now = predict_images([model], images)
    for before, after in zip(raw, now):
        expected = scale_probs(np.array([[before[f"p_{c}"] for c in ("normal", "bacterial", "viral")]]), t)[0]
        assert [after[f"p_{c}"] for c in ("normal", "bacterial", "viral")] == pytest.approx(expected, abs=1e-5)


@pytest.mark.unit
def test_the_report_exports_no_winner_across_tasks(tmp_path):
    from xray.report import Member, export_best
    members = []
    for name, task, auc in (("0", "subtype", 0.9), ("1", "bacterial_vs_viral", 0.95)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "best.ckpt").write_bytes(b"")
        members.append(Member(name, tmp_path / name, "ok", {"task": task}, "subtype", {"best_val": {"auc": auc}}))
    with pytest.raises(XrayError, match=r"train different tasks \(bacterial_vs_viral, subtype\), whose val "
                                        r"AUCs do not compare; sweep one task at a time, or report with --no-best"):
        export_best(members, tmp_path / "best")
    assert not (tmp_path / "best").exists()
    # nor into a best folder that holds another task's model
    (tmp_path / "best" / "subtype").mkdir(parents=True)
    (tmp_path / "best" / "subtype" / "metrics.json").write_text(json.dumps(
        {"best_val": {"auc": 0.5}, "hparams": {"task": "bacterial_vs_viral"}}))
    with pytest.raises(XrayError, match=r"best/subtype holds a task=bacterial_vs_viral model, this sweep trains "
                                        r"task=subtype; give the sweep its own sweep_name, or --force"):
        export_best(members[:1], tmp_path / "best")


@pytest.mark.unit
def test_the_subtype_sweep_is_one_task_named_after_it():
    from hydra import compose, initialize_config_dir
    from xray import CONF_DIR

    def sweep(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=["+sweep=subtype", *overrides], return_hydra_config=True)

    cfg = sweep()
    assert (cfg.task.name, cfg.sweep_name) == ("subtype", "subtype")
    assert "task" not in cfg.hydra.sweeper.params and cfg.hydra.sweep.dir.startswith("outputs/multirun/subtype_")
    cfg = sweep("task=bacterial_vs_viral")  # the command line wins over the overlay
    assert (cfg.task.name, cfg.sweep_name) == ("bacterial_vs_viral", "bacterial_vs_viral")
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/bacterial_vs_viral_")


@pytest.mark.slow
def test_bacterial_vs_viral_uses_pneumonia_images_only(task_run, sample_data, tmp_path, monkeypatch):
    run = task_run("bacterial_vs_viral")
    result = json.loads((run / "eval_test.json").read_text())
    manifest = read_manifest(sample_data)
    subtypes = Counter(manifest["splits"]["test"]["subtypes"])
    assert result["images"] == subtypes["bacteria"] + subtypes["virus"] == 10
    assert result["positives"] == subtypes["bacteria"] and result["classes"] == ["VIRAL", "BACTERIAL"]
    train = manifest["splits"]["train"]["subtypes"]  # the default rule: the training prior (shuffled sampling)
    assert (result["at_val_threshold"]["rule"], result["at_val_threshold"]["threshold"]) == (
        "prior", pytest.approx(train["bacteria"] / (train["bacteria"] + train["virus"]), abs=1e-6))
    import xray.evaluate  # the prior needs no val image: no val pass at all
    from xray.evaluate import evaluate
    monkeypatch.setattr(xray.evaluate, "val_predictions", lambda *a, **k: pytest.fail("val was predicted"))
    again = evaluate([run / "checkpoints" / "best.ckpt"], "test", bootstrap=0, workers=1, out_dir=tmp_path)
    assert again["at_val_threshold"]["threshold"] == result["at_val_threshold"]["threshold"]
    records = task_records(split_file(sample_data, manifest, "train"), "bacterial_vs_viral")
    assert len(records.indices) == manifest["splits"]["train"]["classes"]["PNEUMONIA"]
    images = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    [r, _] = predict_images([load_trained_model(run / "checkpoints" / "best.ckpt")], images)
    assert set(r) == {"file", "label", "p_bacterial"} and r["label"] in ("VIRAL", "BACTERIAL")


@pytest.mark.slow
def test_train_cli_with_a_task_the_data_cannot_train_is_one_line(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=6, splits=("train",))
    for f in (root / "train" / "PNEUMONIA").glob("*virus*"):
        f.unlink()
    convert(root, tmp_path / "data", short_side=64, workers=1)
    proc = subprocess.run([sys.executable, "-m", "xray.train", *TINY, f"data.dir={tmp_path / 'data'}",
                           "task=subtype", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: task=subtype needs training images of every one of its classes" in proc.stderr
