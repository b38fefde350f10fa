"""xray.evaluate: the result keys it writes (`at_val_threshold` with its `rule` and `threshold`,
`at_0.5`, `argmax`), the two-class decisions on top of the K-class path, and old runs' files
(the `youden` key) read by evaluate, the report's readers and jobs.status."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xray.errors import XrayError
from xray.evaluate import ThresholdRule, binary_result, chosen_thresholds, origin, summary, threshold_on_val
from xray.hparams import NO_RULE, binary_results, metrics_of, read_eval, rule_of_chosen_on, with_current_keys
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
    assert chosen_thresholds(json.loads((trained_run / "eval_val.json").read_text())) == {
        "binary": (at_val["threshold"], at_val["rule"])}
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["eval"]["test"] == summary(test)
    assert (trained_run / "predictions_test.csv").read_text().splitlines()[0] == "file_name,label,p_pneumonia"
    for figure in ("roc_test.png", "confusion_test.png", "reliability_test.png"):
        assert (trained_run / figure).stat().st_size > 0
