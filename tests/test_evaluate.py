"""xray.evaluate: the result keys it writes (`at_val_threshold` with its `rule` and `threshold`,
`at_0.5`, `argmax`), the two-class decisions on top of the K-class path, and old runs' files
(the `youden` key) read by evaluate, the report's readers and jobs.status."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xray.data import fingerprint, read_manifest
from xray.errors import XrayError
from xray.evaluate import (ThresholdRule, binary_result, chosen_thresholds, origin, summary, threshold_on_val,
                           training_prior)
from xray.hparams import (NO_RULE, PRIOR, binary_results, metrics_of, read_eval, rule_of_chosen_on, short_rule,
                          with_current_keys)
from xray.metrics import binary_metrics, sensitivity_threshold

OLD_RUN = Path(__file__).parent / "data" / "old_run"  # real files of commit b93b4ef (see its README.md)


def old(task: str, name: str) -> dict:
    return json.loads((OLD_RUN / task / name).read_text())


@pytest.mark.unit
def test_an_old_eval_file_reads_with_todays_keys():
    raw = old("binary", "eval_test.json")
    result = read_eval(OLD_RUN / "binary" / "eval_test.json")
    assert "youden" not in result and result["at_0.5"] == raw["at_0.5"]
    at_val = result["at_val_threshold"]
    assert at_val["rule"] == "sensitivity>=0.93" and "chosen_on" not in at_val  # the rule the run trained with
    assert at_val["threshold"] == raw["youden"]["threshold"] and at_val["auc"] == raw["youden"]["auc"]
    raw = old("subtype", "eval_test.json")
    result = read_eval(OLD_RUN / "subtype" / "eval_test.json")
    assert result["argmax"] == raw["argmax"]
    assert {name: r["at_val_threshold"]["rule"] for name, r in result["read_off"].items()} == {
        "pneumonia_vs_normal": "sensitivity>=0.93", "bacterial_vs_viral": "youden"}
    assert "youden" in raw["read_off"]["bacterial_vs_viral"]  # the dict read stays as it was


@pytest.mark.unit
def test_thresholds_chosen_on_an_old_val_file_are_handed_on():
    """evaluate_splits hands val's thresholds to the other splits; an old eval_val.json gives them too."""
    raw = old("subtype", "eval_val.json")["read_off"]
    assert chosen_thresholds(old("subtype", "eval_val.json")) == {
        "pneumonia_vs_normal": (raw["pneumonia_vs_normal"]["youden"]["threshold"], "sensitivity>=0.93"),
        "bacterial_vs_viral": (raw["bacterial_vs_viral"]["youden"]["threshold"], "youden")}
    raw = old("binary", "eval_val.json")
    assert chosen_thresholds(raw) == {"binary": (raw["youden"]["threshold"], "sensitivity>=0.93")}


@pytest.mark.unit
def test_an_old_metrics_summary_reads_with_todays_keys():
    """metrics.json's `eval` of an old run: its test metrics reach HParams; the rule was not recorded."""
    metrics = old("binary", "metrics.json")
    test = with_current_keys(metrics["eval"]["test"])
    assert test["at_val_threshold"] == {"rule": None, **metrics["eval"]["test"]["youden"]}
    assert metrics_of(metrics)["hparam/test_auc"] == metrics["eval"]["test"]["youden"]["auc"]
    metrics = old("subtype", "metrics.json")
    assert metrics_of(metrics)["hparam/test_accuracy"] == metrics["eval"]["test"]["argmax"]["accuracy"]


@pytest.mark.unit
def test_old_rules_keep_their_captions():
    """Plot titles say where a threshold came from as they did from an old file's `chosen_on`."""
    assert [origin(rule_of_chosen_on(c)) for c in ("val", "val: sensitivity >= 0.93",
                                                   "none: val has one class only, 0.5 used")] == [
        "Youden on val", "sensitivity >= 0.93 on val", "0.5: val has one class only"]


@pytest.mark.unit
def test_jobs_status_reads_the_best_models_old_eval_file(tmp_path):
    from jobs.status import best_line
    for task, decision in (("binary", "youden"), ("subtype", "argmax")):  # (a subtype model: its macro AUC)
        shutil.copy(OLD_RUN / task / "eval_test.json", tmp_path / "eval_test.json")
        auc = old(task, "eval_test.json")[decision]["auc"]
        assert best_line(tmp_path) == (f"best: {tmp_path} (test AUC {auc['value']:.4f}, "
                                       f"95% CI {auc['ci95'][0]:.4f}-{auc['ci95'][1]:.4f})")


@pytest.mark.unit
def test_an_unreadable_eval_file_is_one_line(tmp_path):
    (tmp_path / "eval_test.json").write_text('{"split": "te')  # (a copy cut short)
    with pytest.raises(XrayError, match=r"eval_test.json cannot be read \(JSONDecodeError: .*\); rerun "
                                        r"`python -m xray.evaluate` on that run's checkpoint, or delete the file"):
        read_eval(tmp_path / "eval_test.json")


@pytest.mark.unit
def test_the_prior_rule_is_the_bacterial_vs_viral_one_and_file_tags_name_what_differs():
    """bacterial_vs_viral_rule=prior (issue 27): the bacterial-vs-viral decision's rule, pneumonia
    vs normal keeps its own; a file tag names the parts that differ from the run's own rule,
    among the decisions its task has, so another rule never replaces the run's files."""
    rule = ThresholdRule.of({"threshold_rule": "sensitivity", "target_sensitivity": 0.93,
                             "bacterial_vs_viral_rule": "prior"})
    assert rule.for_decision("bacterial_vs_viral") == ThresholdRule("prior")
    assert rule.for_decision("pneumonia_vs_normal") == rule
    assert origin(PRIOR) == "the training prior"
    assert short_rule(PRIOR) == "training prior, no val" and short_rule("youden") == "youden on val"
    old = ThresholdRule.of({"threshold_rule": "sensitivity", "target_sensitivity": 0.93})  # a run from before
    assert old.subtype_rule == "youden" and ThresholdRule.of({"bacterial_vs_viral_rule": None}).subtype_rule == "youden"
    assert [rule.tag(old, task) for task in ("binary", "subtype", "bacterial_vs_viral")] == ["", "bvprior", "bvprior"]
    assert [old.tag(rule, task) for task in ("binary", "subtype", "bacterial_vs_viral")] == ["", "bvyouden", "bvyouden"]
    other = ThresholdRule("youden", 0.95, "prior")
    assert [other.tag(old, task) for task in ("binary", "subtype", "bacterial_vs_viral")] == [
        "youden", "youden_bvprior", "bvprior"]
    assert rule.tag(rule, "subtype") == ""


def training(tmp_path, sampling: str, weighted: bool = False, images=None):
    """A stand-in TrainedModel: its config, its run folder with the train_images.txt it trained on
    (9 bacterial, 3 viral, 4 normal by default)."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    run = tmp_path / f"run_{sampling}_{weighted}_{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    if images is not False:
        images = images or ([f"1/person{i}_bacteria_{i}.jpeg" for i in range(9)]
                            + [f"1/person{i}_virus_{i}.jpeg" for i in range(3)] + [f"0/IM-000{i}-0001.jpeg" for i in range(4)])
        (run / "train_images.txt").write_text("\n".join(images) + "\n")
    return SimpleNamespace(cfg=OmegaConf.create({"data": {"sampling": sampling}, "loss": {"class_weighted": weighted}}),
                           run_dir=run, checkpoint=run / "checkpoints" / "best.ckpt")


@pytest.mark.unit
def test_the_training_prior_weighs_draws_and_loss_weights_from_the_runs_own_train_images(tmp_path):
    """The odds the training put on bacterial vs viral: balanced sampling or class weights alone
    make them even (0.5, nothing to count); neither: the run's own train split's share (9 of 12);
    both: the weights on equal draws, 3 of 12. Counted from the run's train_images.txt, never
    from whatever data set sits at its data.dir today."""
    assert training_prior([training(tmp_path, "balanced", images=False)]) == 0.5  # (needs no count)
    assert training_prior([training(tmp_path, "shuffle", weighted=True, images=False)]) == 0.5
    assert training_prior([training(tmp_path, "shuffle"), training(tmp_path, "shuffle")]) == 0.75
    assert training_prior([training(tmp_path, "balanced", weighted=True)]) == 0.25
    gone = training(tmp_path, "shuffle", images=False)
    with pytest.raises(XrayError, match=rf"^bacterial_vs_viral_rule=prior: {re.escape(str(gone.run_dir))}/train_images.txt "
                                        r"\(the images its run trained on, for the training prior\) is missing; pass "
                                        r"bacterial_vs_viral_rule=youden$"):
        training_prior([gone])
    with pytest.raises(XrayError, match=r"holds 2 bacterial and 0 viral"):
        training_prior([training(tmp_path, "shuffle", images=["1/person1_bacteria_1.jpeg", "1/person2_bacteria_1.jpeg"])])
    with pytest.raises(XrayError, match=r"the ensemble's members were trained with different priors \[0.5, 0.75\]"):
        training_prior([training(tmp_path, "balanced"), training(tmp_path, "shuffle")])


@pytest.mark.unit
def test_a_decision_carries_its_rule_and_threshold_and_its_summary_the_values():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    threshold, rule = threshold_on_val(y, p, "binary", ThresholdRule("sensitivity", 0.9))
    assert (threshold, rule) == (sensitivity_threshold(y, p, 0.9), "sensitivity>=0.9")
    assert threshold_on_val(y, p, "binary", ThresholdRule("youden"))[1] == "youden"
    assert threshold_on_val(np.ones(5), p[:5], "binary") == (0.5, NO_RULE)
    result = {"task": "binary", **binary_result(y, p, threshold, rule, n_boot=20, seed=0)}
    assert result["images"] == 60 and result["positives"] == int(y.sum())
    at_val = result["at_val_threshold"]
    assert (at_val["rule"], at_val["threshold"]) == (rule, threshold)
    assert np.array(at_val["confusion_matrix"]).sum() == 60 and len(at_val["auc"]["ci95"]) == 2
    assert result["at_0.5"]["threshold"] == 0.5 and "rule" not in result["at_0.5"]
    assert summary(result) == {"at_val_threshold": {"rule": rule, "threshold": threshold,
                                                    **binary_metrics(y, p, threshold)},
                               "at_0.5": {"threshold": 0.5, **binary_metrics(y, p, 0.5)}}
    assert binary_results(result) == {"binary": result}


def test_a_two_class_run_writes_todays_keys_and_files(trained_run):
    """The fixture's run was evaluated at the end of training (val, then test at val's threshold):
    the two-class task's own decision sits at the top level, metrics.json holds its summary."""
    test = json.loads((trained_run / "eval_test.json").read_text())
    assert test["task"] == "binary" and "youden" not in test and "argmax" not in test
    at_val = test["at_val_threshold"]
    assert at_val["rule"] == "sensitivity>=0.93"  # the defaults' rule
    val = np.loadtxt(trained_run / "predictions_val.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    assert at_val["threshold"] == pytest.approx(sensitivity_threshold(val[:, 0], val[:, 1], 0.93), abs=2e-6)
    # (float32: another test may evaluate val again at another batch size; on some CPUs that moves
    # the probabilities in the 8th digit)
    [(name, (threshold, rule))] = chosen_thresholds(json.loads((trained_run / "eval_val.json").read_text())).items()
    assert (name, rule) == ("binary", at_val["rule"]) and threshold == pytest.approx(at_val["threshold"], abs=1e-6)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    expected, got = summary(test), metrics["eval"]["test"]  # (the threshold: float32, as above)
    assert got["at_val_threshold"].pop("threshold") == pytest.approx(expected["at_val_threshold"].pop("threshold"),
                                                                     abs=1e-6)
    assert got == expected
    assert (trained_run / "predictions_test.csv").read_text().splitlines()[0] == "file_name,label,p_pneumonia"
    for figure in ("roc_test.png", "confusion_test.png", "reliability_test.png"):
        assert (trained_run / figure).stat().st_size > 0
    # CIs over patients; the data set by its fingerprint, none of it seen in training
    assert test["bootstrap"]["unit"] == "patient" and test["patients"] == 20  # (the sample: one image each)
    assert test["data"] == {**fingerprint(Path(test["data_dir"]), read_manifest(Path(test["data_dir"])), ["test"]),
                            "overlap_with_train": 0}
    # the subgroups, at the split's threshold: the sample's test half has 7 IM- and 3 NORMAL2-IM-
    # normals, 7 bacterial and 3 viral pneumonias
    block = test["subgroups"]["binary"]
    assert (block["threshold"], block["rule"]) == (at_val["threshold"], at_val["rule"])
    assert {g: c["images"] for g, c in block["by"]["subtype"].items()} == {"normal": 10, "bacteria": 7, "virus": 3}
    assert {g: c["images"] for g, c in block["by"]["family"].items()} == {"IM-": 7, "NORMAL2-IM-": 3, "person": 10}
    assert "specificity" in block["by"]["family"]["IM-"] and "sensitivity" not in block["by"]["family"]["IM-"]
    assert sum(c["images"] for c in block["by"]["aspect_ratio"].values()) == 20
    fp = sum(c["confusion_matrix"][0][1] for c in block["by"]["family"].values())
    assert fp == at_val["confusion_matrix"][0][1]  # the same threshold as the whole split


def synthetic_split(seed: int = 0):
    """A test split like the real one: normal children from the IM- and NORMAL2-IM- families,
    pneumonia from person..., several images for some patients, stored sizes of every shape."""
    from xray.evaluate import ImageInfo, aspect_bucket
    rng = np.random.default_rng(seed)
    rows = []  # (file name, label, subtype)
    for i in range(30):
        rows += [(f"IM-{i:04d}-{k:04d}.jpeg", 0, "normal") for k in range(1 + i % 3)]
    for i in range(20):
        rows += [(f"NORMAL2-IM-{i:04d}-0001.jpeg", 0, "normal")]
    for i in range(40):
        kind = "virus" if i % 3 == 0 else "bacteria"
        rows += [(f"person{i}_{kind}_{k}.jpeg", 1, kind) for k in range(1 + i % 4)]
    from xray.labels import CLASSES, file_family, parse_file_name
    names = [r[0] for r in rows]
    y = np.array([r[1] for r in rows])
    p = np.clip(0.45 * y + rng.uniform(0.05, 0.55, len(y)), 0, 1)
    shapes = [(128, int(128 * r)) for r in rng.choice([1.0, 1.2, 1.4, 1.7], len(y))]
    info = ImageInfo(np.array([parse_file_name(n, CLASSES[label])[1] for n, label, _ in rows]),
                     np.array([r[2] for r in rows]), np.array([file_family(n) for n in names]),
                     np.array([aspect_bucket(h, w) for h, w in shapes]))
    return y, p, info


@pytest.mark.unit
def test_subgroups_report_what_each_group_can_say_at_the_splits_threshold():
    """Per subtype, file-name family and aspect-ratio bucket: counts (images, patients,
    positives), the confusion at the split's own threshold, and only the metrics defined in the
    group (a normal-only family has a specificity, a pneumonia-only one a sensitivity, AUC only
    where both classes are), each with a patient-bootstrap CI."""
    from xray.evaluate import subgroups_of
    y, p, info = synthetic_split()
    threshold = 0.42
    block = subgroups_of(y, p, threshold, "sensitivity>=0.93", info, n_boot=100, seed=0, by_patient=True)
    assert (block["threshold"], block["rule"]) == (threshold, "sensitivity>=0.93")
    assert list(block["by"]) == ["subtype", "family", "aspect_ratio"]
    assert list(block["by"]["subtype"]) == ["normal", "bacteria", "virus"]  # (no "unknown" here: left out)
    assert list(block["by"]["family"]) == ["IM-", "NORMAL2-IM-", "person"]
    assert list(block["by"]["aspect_ratio"]) == ["<1.1", "1.1-1.3", "1.3-1.5", ">=1.5"]
    im, normal2, person = (block["by"]["family"][f] for f in ("IM-", "NORMAL2-IM-", "person"))
    assert (im["images"], im["patients"], im["positives"]) == (60, 30, 0)
    assert (normal2["images"], normal2["patients"]) == (20, 20) and person["positives"] == person["images"] == 100
    assert set(im) == {"images", "patients", "positives", "specificity", "confusion_matrix"}
    assert set(person) == {"images", "patients", "positives", "sensitivity", "confusion_matrix"}
    rows = info.family == "IM-"
    assert im["specificity"]["value"] == binary_metrics(y[rows], p[rows], threshold)["specificity"]
    assert im["confusion_matrix"][0] == [int(np.sum(p[rows] < threshold)), int(np.sum(p[rows] >= threshold))]
    lo, hi = im["specificity"]["ci95"]
    assert lo <= im["specificity"]["value"] <= hi and hi - lo > 0
    mixed = block["by"]["aspect_ratio"]["1.1-1.3"]  # both classes: every metric, AUC too
    assert {"sensitivity", "specificity", "auc", "accuracy", "balanced_accuracy"} <= set(mixed)
    for grouping, groups in block["by"].items():  # every image in exactly one group of each grouping
        assert sum(c["images"] for c in groups.values()) == len(y), grouping
    none = subgroups_of(y, p, threshold, "youden", info, n_boot=0, seed=0, by_patient=True)
    assert none["by"]["family"]["IM-"]["specificity"]["ci95"] is None


@pytest.mark.unit
def test_subgroup_cis_resample_patients_by_default_and_images_when_asked():
    """The IM- family's CI with patients resampled (up to 3 images each here) differs from the
    image one; with one image per patient (NORMAL2-IM-) both are drawn alike."""
    from xray.evaluate import subgroups_of
    y, p, info = synthetic_split(1)
    by_patient = subgroups_of(y, p, 0.42, "youden", info, n_boot=200, seed=3, by_patient=True)["by"]["family"]
    by_image = subgroups_of(y, p, 0.42, "youden", info, n_boot=200, seed=3, by_patient=False)["by"]["family"]
    assert by_patient["IM-"]["specificity"]["ci95"] != by_image["IM-"]["specificity"]["ci95"]
    assert by_patient["IM-"]["specificity"]["value"] == by_image["IM-"]["specificity"]["value"]


@pytest.mark.unit
def test_aspect_ratio_buckets_and_the_console_table():
    from xray.evaluate import aspect_bucket, subgroup_table, subgroups_of
    assert [aspect_bucket(h, w) for h, w in ((100, 109), (110, 100), (100, 129), (130, 100), (100, 149),
                                             (100, 150), (256, 512))] == [
        "<1.1", "1.1-1.3", "1.1-1.3", "1.3-1.5", "1.3-1.5", ">=1.5", ">=1.5"]
    y, p, info = synthetic_split()
    table = subgroup_table(subgroups_of(y, p, 0.42, "youden", info, n_boot=20, seed=0, by_patient=True))
    lines = table.splitlines()
    assert lines[0].split() == ["group", "images", "patients", "pos", "sens", "spec", "AUC"]
    im = next(line for line in lines if line.startswith("family IM-"))
    assert im.split()[2:5] == ["60", "30", "0"] and im.split()[5] == "-"  # no sensitivity among normals
    assert len(lines) == 1 + 3 + 3 + 4


@pytest.mark.unit
def test_a_bad_bootstrap_unit_is_one_line():
    from xray.evaluate import evaluate
    with pytest.raises(XrayError, match="bootstrap_unit=visit must be one of patient, image"):
        evaluate([Path("missing.ckpt")], bootstrap_unit="visit")


def linked_run(run: Path, dest: Path, train_images: bool = True) -> Path:
    """A run folder's config and best checkpoint, hard-linked (no copy of 150 MB), and its
    train_images.txt unless `train_images` is False (a run from before it was recorded)."""
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "checkpoints/best.ckpt") + (("train_images.txt",) if train_images else ()):
        os.link(run / name, dest / name)
    return dest


def test_evaluate_refuses_a_split_that_shares_images_with_the_runs_train_split(trained_run, tmp_path):
    """The run's data.dir re-converted with another split seed (issue 26.2): val now holds some of
    the run's training images. Evaluating it is refused in one line naming the count and an
    example; an old run (no train_images.txt) is evaluated, its overlap `unknown`; a split with
    none of them (the test half) is evaluated with the fingerprint of the data set it came from."""
    from xray.convert import convert
    from xray.data import split_images
    from xray.evaluate import evaluate
    from helpers import SAMPLE
    other = tmp_path / "reconverted"
    convert(SAMPLE, other, short_side=128, val_fraction=0.2, seed=7, workers=1)
    manifest = read_manifest(other)
    trained = set((trained_run / "train_images.txt").read_text().splitlines())
    leaked = sorted(set(split_images(other, manifest, "val")) & trained)
    assert leaked  # (the premise: another seed moves patients between train and val)
    run = linked_run(trained_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "best.ckpt"
    with pytest.raises(XrayError, match=rf"split=val of {other} shares {len(leaked)} of its \d+ images with the "
                                        rf"train split {run} was trained on \(e\.g\. {re.escape(leaked[0])}\): "
                                        r"the data set was re-converted with other splits since; evaluate on the "
                                        r"data set the run trained on"):
        evaluate([ckpt], "val", other, bootstrap=0, workers=1)
    assert not list(run.glob("eval_*"))
    # the test split of the re-conversion holds no training image: evaluated (its threshold given, as
    # for an external test set, since its val cannot choose one), the data set recorded
    result = evaluate([ckpt], "test", other, bootstrap=0, workers=1, val_thresholds={"binary": (0.5, "given")})
    assert result["data"] == {**fingerprint(other, manifest, ["test"]), "overlap_with_train": 0}
    assert result["data"]["dir"] == str(other) and result["data"]["splits"]["test"]["images"] == 20
    old = linked_run(trained_run, tmp_path / "old_run", train_images=False)
    result = evaluate([old / "checkpoints" / "best.ckpt"], "val", other, bootstrap=0, workers=1)
    assert result["data"]["overlap_with_train"] == "unknown"


@pytest.fixture
def read_only_run(trained_run, tmp_path):
    """The shared run seen through a read-only bind mount (root ignores file modes, not a
    read-only mount), as a model published on a read-only share is."""
    mount = tmp_path / "published"
    mount.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(trained_run), str(mount)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot bind-mount here (needs root and mount rights): {e}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True, capture_output=True, timeout=30)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True, timeout=30)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    return line


def test_a_model_in_a_read_only_folder_is_evaluated_into_out_dir(read_only_run, tmp_path):
    """evaluate of a checkpoint whose run folder cannot be written is one line naming the folder
    and out_dir= (before any prediction); with out_dir the results go there; calibrate=true,
    which must write beside the checkpoint, is one line too; so is predict's out_dir."""
    from xray.evaluate import evaluate
    from xray.predict import writable_folder
    from helpers import SAMPLE
    ckpt = read_only_run / "checkpoints" / "best.ckpt"
    cli = [sys.executable, "-m", "xray.evaluate", f"ckpt={ckpt}", "bootstrap=20", "workers=1",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    error = one_line(subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path, timeout=600))
    assert error == (f"error: cannot write into {read_only_run} (Read-only file system): the results of evaluate "
                     "go there; pass out_dir=<a folder you can write>")
    proc = subprocess.run(cli + [f"out_dir={tmp_path / 'results'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "eval_test.json").read_text())
    assert result["checkpoint"] == str(ckpt) and result["data"]["overlap_with_train"] == 0
    assert {p.name for p in (tmp_path / "results").iterdir()} >= {
        "eval_test.json", "predictions_test.csv", "roc_test.png", "confusion_test.png", "reliability_test.png"}
    with pytest.raises(XrayError, match=rf"cannot write into {read_only_run} \(Read-only file system\): calibrate=true "
                                        r"stores the temperature \(calibration.json\) beside the checkpoint; copy "
                                        r"the run folder somewhere you can write and calibrate the copy"):
        evaluate([ckpt], "test", bootstrap=0, workers=1, calibrate=True, out_dir=tmp_path / "results")
    with pytest.raises(XrayError, match=rf"cannot write into {read_only_run / 'plots'} \(Read-only file system\)"):
        writable_folder(read_only_run / "plots")
    image = sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[0]
    error = one_line(subprocess.run(
        [sys.executable, "-m", "xray.predict", f"ckpt={ckpt}", f"image={image}", "plot=true",
         f"out_dir={read_only_run / 'plots'}", f"hydra.run.dir={tmp_path / 'hydra_predict'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600))
    assert error.startswith(f"error: cannot write into {read_only_run / 'plots'} (Read-only file system)")


def test_card_true_evaluates_val_too_and_hands_both_to_the_model_card(trained_run, tmp_path, monkeypatch):
    """card=true (issue 28.4): the requested split and val, both written, then
    xray.card.write_model_card(folder, checkpoints, {"val": ..., split: ...}) (a stand-in here:
    xray.card is another part of xray)."""
    import types
    from xray.evaluate import evaluate
    calls = []
    card = types.ModuleType("xray.card")
    names = []
    card.write_model_card = lambda folder, checkpoints, results, name: (
        calls.append((folder, checkpoints, results)) or names.append(name) or [folder / f"{name}.html"])
    monkeypatch.setitem(sys.modules, "xray.card", card)
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    result = evaluate([ckpt], "test", bootstrap=0, workers=1, out_dir=tmp_path / "out", card=True)
    [(folder, checkpoints, results)] = calls
    assert folder == tmp_path / "out" and checkpoints == [ckpt] and set(results) == {"val", "test"}
    from xray.files import to_json
    assert results["test"] is result
    for split in ("val", "test"):  # (as written: NaN as null)
        assert json.loads(to_json(results[split])) == json.loads((tmp_path / "out" / f"eval_{split}.json").read_text())
    assert result["at_val_threshold"]["threshold"] == results["val"]["at_val_threshold"]["threshold"]
    calls.clear()
    evaluate([ckpt], "val", bootstrap=0, workers=1, out_dir=tmp_path / "out_val", card=True)
    assert set(calls[0][2]) == {"val"}  # val asked for: evaluated once
    evaluate([ckpt], "val", bootstrap=0, workers=1, threshold_rule=ThresholdRule("youden"), card=True)
    assert names == ["model_card", "model_card", "model_card_youden"]  # another rule: never the run's own card
    assert (trained_run / "eval_val_youden.json").is_file()


def test_card_true_writes_the_model_card(trained_run, tmp_path):
    """With the real xray.card, once it exists."""
    pytest.importorskip("xray.card", reason="xray/card.py (the model card) is not written yet")
    from xray.evaluate import evaluate
    evaluate([trained_run / "checkpoints" / "best.ckpt"], "test", bootstrap=0, workers=1, out_dir=tmp_path,
             card=True)
    assert (tmp_path / "model_card.html").stat().st_size > 0
