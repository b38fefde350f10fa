"""xray.report: comparing named runs (folders or globs, any splits, with CIs), on saved files of
real old runs and on a run trained now; the sweep table read from old runs' files."""
import io
import json
import shutil
from pathlib import Path

import pytest

from xray.report import collect, compare, compare_figure, main, table

OLD_RUN = Path(__file__).parent / "data" / "old_run"  # real files of commit b93b4ef (see its README.md)


def with_ci(metric: dict) -> str:
    return f"{metric['value']:.3f} ({metric['ci95'][0]:.3f}-{metric['ci95'][1]:.3f})"


@pytest.mark.unit
def test_compare_lists_every_decision_of_old_runs_with_cis():
    out = io.StringIO()
    decisions = compare([str(OLD_RUN / "*")], ["test", "val"], out=out)
    assert [(d.run.name, d.split, d.name, d.at) for d in decisions if d.split == "test"] == [
        ("binary", "test", "binary", "0.501 (sensitivity>=0.93 on val)"), ("binary", "test", "binary", "0.5"),
        ("subtype", "test", "argmax", "argmax"),
        ("subtype", "test", "pneumonia_vs_normal", "0.665 (sensitivity>=0.93 on val)"),
        ("subtype", "test", "pneumonia_vs_normal", "0.5"),
        ("subtype", "test", "bacterial_vs_viral", "0.503 (youden on val)"),
        ("subtype", "test", "bacterial_vs_viral", "0.5")]
    assert len(decisions) == 14  # and the same on val
    raw = json.loads((OLD_RUN / "subtype" / "eval_test.json").read_text())["read_off"]["bacterial_vs_viral"]
    row = next(line for line in out.getvalue().splitlines() if "youden on val" in line and "test" in line)
    cells = [with_ci(raw["youden"][m]) for m in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")]
    assert row.split("  ")[-1].strip() == cells[-1] and all(c in row for c in cells)


@pytest.mark.unit
def test_compare_keeps_the_decisions_named_and_draws_them(tmp_path, capsys):
    main(["--compare", str(OLD_RUN / "subtype"), str(OLD_RUN / "binary"), "--decisions",
          "bacterial_vs_viral,argmax", "--figure", str(tmp_path / "compare.png"), "--markdown"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run ") and len(lines) == 2 + 3  # header, rule, argmax + bacterial_vs_viral twice
    assert (tmp_path / "compare.png").stat().st_size > 0
    decisions = compare([str(OLD_RUN / "subtype")], ["test"], ["bacterial_vs_viral", "argmax"], out=io.StringIO())
    roc, bars = compare_figure(decisions, ["test"]).axes
    assert (roc.get_title(), bars.get_title()) == ("bacterial_vs_viral, test", "per class, test")
    # the curve from predictions_test.csv has the AUC eval_test.json holds (its p rounded to 6 digits)
    auc = json.loads((OLD_RUN / "subtype" / "eval_test.json").read_text())["read_off"]["bacterial_vs_viral"][
        "youden"]["auc"]["value"]
    [line] = roc.get_lines()[:-1]  # (the last: the diagonal)
    assert line.get_label() == f"subtype (read off): AUC {auc:.3f}"


@pytest.mark.unit
@pytest.mark.parametrize("given, message", [
    (["missing"], r"--compare .*missing: no such folder; pass run folders"),
    (["nothing_*"], r"--compare .*nothing_\*  ?matches no folder; check the path"),
    (["empty"], r"--compare: no eval_<test>.json in the folders given; evaluate the runs first"),
    (["cut"], r"cut/eval_test.json cannot be read \(JSONDecodeError: .*\); rerun `python -m xray.evaluate`"),
])
def test_bad_compare_input_is_one_line(tmp_path, capsys, given, message):
    import re
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "eval_test.json").write_text('{"split": "te')
    with pytest.raises(SystemExit) as exit_code:
        main(["--compare", *(str(tmp_path / g) for g in given)])
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.unit
def test_the_sweep_table_reads_old_members(tmp_path):
    """A sweep whose members' eval_test.json hold `youden`: their test columns are filled."""
    for name in ("binary", "subtype"):
        member = tmp_path / "sweep" / f"0_task={name}"
        shutil.copytree(OLD_RUN / name, member)
        (member / ".hydra").mkdir()
        (member / ".hydra" / "config.yaml").write_text(f"task:\n  name: {name}\n")
    members = collect(tmp_path / "sweep")
    test = {m.hparams["task"]: json.loads((m.path / "eval_test.json").read_text()) for m in members}
    assert {m.hparams["task"]: m.values()["test_auc"] for m in members} == {
        "binary": test["binary"]["youden"]["auc"]["value"], "subtype": test["subtype"]["argmax"]["auc"]["value"]}
    text = table(members).splitlines()
    assert text[0].split()[:4] == ["rank", "member", "status", "task"] and len(text) == 3
    markdown = table(members, markdown=True).splitlines()
    header = [cell.strip() for cell in markdown[0].strip("|").split("|")]
    assert header[:2] == ["rank", "member"] and header[-1] == "checkpoint" and len(markdown) == 4


def test_compare_puts_a_run_trained_now_beside_an_old_one(trained_run, tmp_path):
    """A glob over a folder holding this code's run (no checkpoints needed) and an old run."""
    shutil.copytree(trained_run, tmp_path / "runs" / "2_new", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(OLD_RUN / "binary", tmp_path / "runs" / "10_old")
    decisions = compare([str(tmp_path / "runs" / "*")], ["test"], out=io.StringIO())
    assert [(d.run.name, d.at.split(" ")[-3:]) for d in decisions] == [  # natural order: 2 before 10
        ("2_new", ["(sensitivity>=0.93", "on", "val)"]), ("2_new", ["0.5"]),
        ("10_old", ["(sensitivity>=0.93", "on", "val)"]), ("10_old", ["0.5"])]
    new = json.loads((trained_run / "eval_test.json").read_text())["at_val_threshold"]
    assert decisions[0].metrics == new
    [roc] = compare_figure(decisions, ["test"]).axes
    assert [line.get_label().split(":")[0] for line in roc.get_lines()[:-1]] == ["2_new", "10_old"]
