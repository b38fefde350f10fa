"""xray.paired (`python -m xray.report --compare NEW... --baseline OLD...`): runs paired by seed,
each read at its own recorded threshold, differences averaged over the pairs with a CI from one
patient resample shared by every run."""
import io
import json
from pathlib import Path

import numpy as np
import pytest

from xray.errors import XrayError
from xray.metrics import binary_metrics, roc_auc
from xray.paired import note, paired
from xray.report import main

# 12 patients: 4 healthy (2 images each), 4 bacterial, 4 viral (1 image each)
NAMES = ([f"IM-{i:04d}-000{k}.jpeg" for i in range(4) for k in (1, 2)]
         + [f"person{i}_bacteria_{i}.jpeg" for i in range(4)] + [f"person{10 + i}_virus_{i}.jpeg" for i in range(4)])
SUBTYPE = np.array([0] * 8 + [1] * 4 + [2] * 4)  # NORMAL, BACTERIAL, VIRAL


def binary_run(folder: Path, seed: int, p: np.ndarray, threshold: float, names=NAMES, reverse=False) -> Path:
    """A binary model's run folder: config.yaml, eval_test.json (its recorded threshold), predictions
    (reverse: its rows in the opposite order, as another data set's file order would give)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    (folder / "eval_test.json").write_text(json.dumps({
        "task": "binary", "classes": ["NORMAL", "PNEUMONIA"],
        "at_val_threshold": {"rule": "youden", "threshold": threshold}, "at_0.5": {"threshold": 0.5}}))
    rows = [f"{n},{int(s > 0)},{q:.6f}" for n, s, q in zip(names, SUBTYPE, p)]
    (folder / "predictions_test.csv").write_text("file_name,label,p_pneumonia\n"
                                                 + "\n".join(rows[::-1] if reverse else rows) + "\n")
    return folder


def subtype_run(folder: Path, seed: int, probs: np.ndarray, thresholds: tuple[float, float]) -> Path:
    """A 3-class model's run folder, its two read-offs at recorded thresholds."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    (folder / "eval_test.json").write_text(json.dumps({
        "task": "subtype", "classes": ["NORMAL", "BACTERIAL", "VIRAL"], "argmax": {},
        "read_off": {"pneumonia_vs_normal": {"at_val_threshold": {"rule": "sensitivity>=0.93",
                                                                  "threshold": thresholds[0]}},
                     "bacterial_vs_viral": {"at_val_threshold": {"rule": "prior", "threshold": thresholds[1]}}}}))
    rows = [f"{n},{s},{a:.6f},{b:.6f},{c:.6f}" for n, s, (a, b, c) in zip(NAMES, SUBTYPE, probs)]
    (folder / "predictions_test.csv").write_text("file_name,label,p_normal,p_bacterial,p_viral\n"
                                                 + "\n".join(rows) + "\n")
    return folder


def scores(seed: int, skill: float) -> np.ndarray:
    """p(pneumonia) that separates the classes more the higher `skill` is."""
    rng = np.random.default_rng(seed)
    return np.clip(0.5 + skill * np.where(SUBTYPE > 0, 1, -1) * rng.uniform(0, 1, len(SUBTYPE))
                   + rng.normal(0, 0.25, len(SUBTYPE)), 0.01, 0.99)


def three_class(p_pneumonia: np.ndarray) -> np.ndarray:
    """Class probabilities whose pneumonia-vs-normal read-off is `p_pneumonia`."""
    bacterial = np.where(SUBTYPE == 1, 0.7, 0.4)
    return np.stack([1 - p_pneumonia, p_pneumonia * bacterial, p_pneumonia * (1 - bacterial)], axis=1)


@pytest.mark.unit
def test_a_binary_baseline_and_a_3_class_candidate_pair_by_seed_on_pneumonia_vs_normal(tmp_path):
    old = {s: scores(s, 0.1) for s in (42, 7)}
    new = {s: scores(100 + s, 0.4) for s in (42, 7)}
    baselines = [binary_run(tmp_path / f"old_s{s}", s, old[s], 0.45, reverse=s == 7) for s in (42, 7)]
    candidates = [subtype_run(tmp_path / f"new_s{s}", s, three_class(new[s]), (0.55, 0.5)) for s in (7, 42)]
    rows = paired(candidates, baselines, "test", resamples=200)
    assert [r["metric"] for r in rows] == ["auc", "accuracy", "sensitivity", "specificity"]  # the shared decision
    y = (SUBTYPE > 0).astype(int)
    for r in rows:
        def value(p, threshold):
            return roc_auc(y, p) if r["metric"] == "auc" else binary_metrics(y, p, threshold)[r["metric"]]
        per_seed = {s: value(new[s], 0.55) - value(old[s], 0.45) for s in (42, 7)}
        assert r["decision"] == "pneumonia_vs_normal" and r["images"] == 16
        assert r["rule"] == "youden -> sensitivity>=0.93"  # the two sides' rules differ: shown
        assert r["per_seed"] == pytest.approx(per_seed, abs=1e-5)  # each at its own recorded threshold
        assert r["difference"] == pytest.approx(np.mean(list(per_seed.values())), abs=1e-5)
        assert r["baseline"] == pytest.approx(np.mean([value(old[s], 0.45) for s in (42, 7)]), abs=1e-5)
        assert r["ci95"][0] <= r["difference"] + 1e-9 and r["difference"] - 1e-9 <= r["ci95"][1]
    auc = rows[0]
    assert auc["difference"] > 0 and auc["ci95"][1] > auc["ci95"][0]
    assert "pneumonia_vs_normal: the two sides' thresholds come from different rules" in note(rows, "test")


@pytest.mark.unit
def test_a_recipe_against_itself_differs_by_exactly_zero_and_both_decisions_pair(tmp_path):
    probs = {s: three_class(scores(s, 0.3)) for s in (42, 7)}
    same = [subtype_run(tmp_path / f"a_s{s}", s, probs[s], (0.5, 0.5)) for s in (42, 7)]
    copies = [subtype_run(tmp_path / f"b_s{s}", s, probs[s], (0.5, 0.5)) for s in (42, 7)]
    rows = paired(copies, same, "test", resamples=100)
    assert {r["decision"] for r in rows} == {"pneumonia_vs_normal", "bacterial_vs_viral"}
    assert [r["images"] for r in rows if r["decision"] == "bacterial_vs_viral"] == [8] * 4  # pneumonia only
    for r in rows:
        assert r["difference"] == 0 and r["ci95"] == [0, 0]
        assert r["rule"] == {"pneumonia_vs_normal": "sensitivity>=0.93", "bacterial_vs_viral": "prior"}[r["decision"]]


@pytest.mark.unit
def test_seeds_or_images_that_do_not_pair_are_one_line(tmp_path):
    p = scores(0, 0.3)
    a42, a7 = binary_run(tmp_path / "a42", 42, p, 0.5), binary_run(tmp_path / "a7", 7, p, 0.5)
    b42, b1 = binary_run(tmp_path / "b42", 42, p, 0.5), binary_run(tmp_path / "b1", 1, p, 0.5)
    with pytest.raises(XrayError, match=r"^--compare seeds \[1, 42\] and --baseline seeds \[7, 42\] differ; a "
                                        r"paired comparison needs the same seeds on both sides$"):
        paired([b42, b1], [a42, a7])
    with pytest.raises(XrayError, match=r"--compare: two runs share a seed \(\[42, 42\]\)"):
        paired([a42, b42], [a42, a7])
    other = binary_run(tmp_path / "other", 7, p, 0.5, names=[n.replace("IM-", "IM-9") for n in NAMES])
    with pytest.raises(XrayError, match=r"were evaluated on different test images \(pneumonia_vs_normal\); a paired "
                                        r"comparison needs the same images"):
        paired([b42, other], [a42, a7])
    with pytest.raises(XrayError, match=r"^--baseline: .*/nothing cannot be read \(FileNotFoundError: .*\); pass "
                                        r"training run folders evaluated on test"):
        paired([b42], [tmp_path / "nothing"])
    (b1 / "config.yaml").write_text("lr: 0.1\n")  # (no seed)
    with pytest.raises(XrayError, match=r"^--compare: .*/b1 cannot be read \(ConfigAttributeError: .*seed"):
        paired([b42, b1], [a42, a7])


@pytest.mark.unit
def test_the_report_cli_prints_the_paired_table(tmp_path, capsys):
    for s in (42, 7):
        binary_run(tmp_path / "old" / f"s{s}", s, scores(s, 0.1), 0.5)
        binary_run(tmp_path / "new" / f"s{s}", s, scores(s, 0.4), 0.5)
    main(["--compare", str(tmp_path / "new" / "*"), "--baseline", str(tmp_path / "old" / "*"), "--markdown"])
    out = capsys.readouterr().out
    assert out.startswith("| decision ") and "| pneumonia_vs_normal | auc " in out
    assert "means over 2 seed pair(s)" in out and "42: +" in out and "the two sides' thresholds" not in out
    with pytest.raises(SystemExit) as e:
        main(["--baseline", str(tmp_path / "old" / "*")])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "new" / "*"), "--baseline", str(tmp_path / "old"), "--val-target", "0.9"])
    assert "two different reports" in capsys.readouterr().err


@pytest.mark.unit
def test_the_report_cli_names_the_option_whose_folder_is_missing(tmp_path, capsys):
    binary_run(tmp_path / "new", 42, scores(42, 0.4), 0.5)
    with pytest.raises(SystemExit) as e:
        main(["--compare", str(tmp_path / "new"), "--baseline", str(tmp_path / "old")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert f"--baseline {tmp_path / 'old'}: no such folder" in err and "Traceback" not in err
