"""xray.report: comparing named runs (folders or globs, any splits, with CIs), on saved files of
real old runs and on a run trained now; the sweep table read from old runs' files."""
import io
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

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


# -- sweeps over seeds, unreadable members, the sweep page --------------------------------------

def old_member(sweep: Path, name: str, lr: float, seed: int, auc: float, status: str = "ok",
               checkpoint: bool = True) -> Path:
    """A sweep member made of the old binary run's files, with its own lr, seed and val AUC
    (an empty best.ckpt: enough for the ranking and the export's choice, not for the export)."""
    member = sweep / name
    shutil.copytree(OLD_RUN / "binary", member)
    (member / ".hydra").mkdir()
    (member / ".hydra" / "config.yaml").write_text(f"task:\n  name: binary\nlr: {lr}\nmomentum: 0.9\nseed: {seed}\n"
                                                   "sweep_name: seeds\n")
    metrics = {"status": status, "best_val": {"auc": auc, "accuracy": 0.5}, "best_epoch": 1,
               "hparams": {"task": "binary", "lr": lr, "momentum": 0.9, "seed": seed}}
    (member / "metrics.json").write_text(json.dumps(metrics))
    if checkpoint:
        (member / "checkpoints").mkdir()
        (member / "checkpoints" / "best.ckpt").write_bytes(b"")
    return member


SEED_AUCS = {(0.01, 42): 0.70, (0.01, 7): 0.72, (0.01, 1): 0.74,  # mean 0.72, the best configuration
             (0.03, 42): 0.80, (0.03, 7): 0.60, (0.03, 1): 0.62}  # the best single member, mean 0.673


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    sweep = tmp_path / "seeds"
    for i, ((lr, seed), auc) in enumerate(SEED_AUCS.items()):
        old_member(sweep, f"{i}_lr={lr},seed={seed}", lr, seed, auc)
    return sweep


@pytest.mark.unit
def test_members_that_differ_only_by_seed_are_one_configuration(seed_sweep):
    """Ranked by their mean over seeds (a lucky seed does not win), with sd and a t-interval; the
    export's choice is the best configuration's best member."""
    from xray.report import choose, configurations, seed_stat

    members = collect(seed_sweep)
    assert members[0].name == "3_lr=0.03,seed=42"  # the best single member ...
    configs = configurations(members)
    assert [c.levers for c in configs] == [{"lr": 0.01}, {"lr": 0.03}]  # ... is not the best configuration
    stat = configs[0].stat("best_val_auc")
    half = 4.302652729911275 * 0.02 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert (stat.n, stat.mean, stat.sd) == (3, pytest.approx(0.72), pytest.approx(0.02))
    assert stat.ci95 == pytest.approx((0.72 - half, 0.72 + half))
    assert seed_stat([0.9]).ci95 is None and seed_stat([None, float("nan")]).n == 0
    choice = choose(members)
    assert choice.winner.name == "2_lr=0.01,seed=1" and [m.name for m in choice.exported] == [choice.winner.name]
    assert [m.name for m in choose(members, ensemble=True).exported] == [
        "2_lr=0.01,seed=1", "1_lr=0.01,seed=7", "0_lr=0.01,seed=42"]


@pytest.mark.unit
def test_the_report_of_a_seed_sweep(seed_sweep, capsys):
    """The configuration table (printed, report.md, report_seeds.csv), a point per member in
    seeds.png, each member's model card and the sweep page linking them."""
    import csv

    from xray.report import report
    report(seed_sweep, best_root=None)
    printed = capsys.readouterr().out
    assert "configurations over seeds, ranked by the mean of best_val_auc" in printed
    assert "One seed per configuration" not in printed
    row = next(line for line in printed.splitlines() if line.startswith("1 ") and "1,7,42" in line)
    assert "0.720 ± 0.020 (0.670-0.770)" in row and "2_lr=0.01,seed=1" in row and "3/3" in row
    assert "## Configurations over seeds" in (seed_sweep / "report.md").read_text()
    [first, second] = list(csv.DictReader(open(seed_sweep / "report_seeds.csv")))
    assert float(first["best_val_auc_mean"]) == pytest.approx(0.72) and first["lr"] == "0.01"
    assert float(second["best_val_auc_ci95_high"]) > float(second["best_val_auc_mean"]) > float(
        second["best_val_auc_ci95_low"])
    assert (seed_sweep / "seeds.png").stat().st_size > 0
    page = (seed_sweep / "report.html").read_text()
    assert 'id="configurations"' in page and 'id="members"' in page
    links = re.findall(r'href="(cards/[^"]+\.html)"', page)
    assert len(links) == 6 and all((seed_sweep / unquote(link)).is_file() for link in links)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]*src="([^"]*)"', page))


@pytest.mark.unit
def test_the_figures_show_every_seed(seed_sweep):
    """The val-vs-test figure: a point per member, a cross per configuration's mean; the heat
    map: one cell per lr, the mean over its seeds."""
    from xray.report import heatmap_figure, val_vs_split_figure
    members = collect(seed_sweep)
    auc_panel = val_vs_split_figure(members, "test").axes[0]
    [points] = auc_panel.collections[:1]
    assert len(points.get_offsets()) == 6
    assert sorted(t.get_text() for t in auc_panel.get_legend().get_texts()) == ["#1 lr=0.01", "#2 lr=0.03"]
    heat = heatmap_figure(members).axes[0]
    assert sorted(t.get_text() for t in heat.texts) == ["0.673\n±0.110 n=3", "0.720\n±0.020 n=3"]


@pytest.mark.unit
def test_an_unreadable_member_is_listed_with_its_reason(tmp_path, capsys):
    """A finished, a failed and a half-written member (metrics.json cut mid-write): no
    JSONDecodeError; the cut one is `unreadable` with the reason, the others are ranked."""
    from xray.report import report
    sweep = tmp_path / "sweep"
    old_member(sweep, "0_lr=0.01", 0.01, 42, 0.7)
    old_member(sweep, "1_lr=0.1", 0.1, 42, 0.7, status="failed", checkpoint=False)
    cut = old_member(sweep, "2_lr=0.03", 0.03, 42, 0.8)
    text = (cut / "metrics.json").read_text()
    (cut / "metrics.json").write_text(text[: len(text) // 2])
    members = report(sweep, best_root=None)
    assert [(m.name, m.status) for m in members] == [("0_lr=0.01", "ok"), ("1_lr=0.1", "failed"),
                                                     ("2_lr=0.03", "unreadable")]
    assert members[2].reason.startswith("metrics.json: JSONDecodeError: ")
    printed = capsys.readouterr().out
    assert "unreadable: 2_lr=0.03: metrics.json: JSONDecodeError: " in printed
    # one seed per configuration: the report says what such a ranking is worth, and what to do
    assert "One seed per configuration" in printed and "+sweep=seeds" in (sweep / "report.md").read_text()
    assert "One seed per configuration" in (sweep / "report.html").read_text()
    assert "1 ok, 1 failed, 1 unreadable" in printed
    assert "unreadable: 2_lr=0.03" in (sweep / "report.md").read_text()
    assert "JSONDecodeError" in (sweep / "report.html").read_text()
    # a cut eval_<split>.json and a cut .hydra/config.yaml are the same
    (members[0].path / "eval_test.json").write_text('{"split": "te')
    (members[1].path / ".hydra" / "config.yaml").write_text("lr: [0.1\n")
    statuses = {m.name: (m.status, m.reason) for m in collect(sweep)}
    assert statuses["0_lr=0.01"][0] == "unreadable" and statuses["0_lr=0.01"][1].startswith("eval_test.json: ")
    assert statuses["1_lr=0.1"][0] == "unreadable" and statuses["1_lr=0.1"][1].startswith(".hydra/config.yaml: ")


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--ensemble", "--top-k", "2"], r"--ensemble exports the best configuration's seeds .* does not combine with --top-k"),
    (["--ensemble"], r"--ensemble: the best configuration \(lr=0.03\) has 1 finished member; an ensemble needs"),
])
def test_bad_ensemble_requests_are_one_line(tmp_path, capsys, args, message):
    sweep = tmp_path / "sweep"
    old_member(sweep, "0_lr=0.01", 0.01, 42, 0.7)
    old_member(sweep, "1_lr=0.03", 0.03, 42, 0.8)
    with pytest.raises(SystemExit) as exit_code:
        main([str(sweep), "--best-root", str(tmp_path / "best"), "--no-cards", *args])
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "best").exists()


def copy_run(run: Path, member: Path, **hparams) -> Path:
    """A sweep member made of a real trained run (its checkpoint hard-linked)."""
    import os
    shutil.copytree(run, member, ignore=shutil.ignore_patterns("*.ckpt", "model_card.*", "cam_errors_*"))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        os.link(ckpt, member / "checkpoints" / ckpt.name)
    (member / ".hydra").mkdir()
    shutil.copy(member / "config.yaml", member / ".hydra" / "config.yaml")
    metrics = json.loads((member / "metrics.json").read_text())
    metrics["hparams"].update(hparams)
    (member / "metrics.json").write_text(json.dumps(metrics))
    return member


def test_a_sweep_with_a_failed_and_a_cut_member_exports_the_best_with_its_card(trained_run, tmp_path, capsys):
    """Real member folders: one finished, one failed, one whose metrics.json a node failure cut.
    The report lists the cut one as unreadable, ranks the rest and exports the finished one:
    evaluated on val and test through its temperature, with its model card and ONNX file."""
    from xray.report import report
    sweep, best_root = tmp_path / "sweep", tmp_path / "best"
    ok = copy_run(trained_run, sweep / "0_lr=0.01", lr=0.01)
    failed = copy_run(trained_run, sweep / "1_lr=0.1", lr=0.1)
    shutil.rmtree(failed / "checkpoints")
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom",
                                                     "hparams": {"lr": 0.1}}))
    cut = copy_run(trained_run, sweep / "2_lr=0.03", lr=0.03)
    text = (cut / "metrics.json").read_text()
    (cut / "metrics.json").write_text(text[: len(text) // 2])
    members = report(sweep, best_root)
    assert [m.status for m in members] == ["ok", "failed", "unreadable"]
    assert "unreadable: 2_lr=0.03: metrics.json: JSONDecodeError" in capsys.readouterr().out
    best = best_root / "sweep"
    assert json.loads((best / "metrics.json").read_text())["source"] == str(ok)
    names = {p.name for p in best.iterdir()}
    assert {"best.ckpt", "model.mindir", "model.onnx", "calibration.json", "eval_val.json", "eval_test.json",
            "predictions_test.csv", "model_card.md", "model_card.html", "cam_errors_test.png"} <= names
    assert not [n for n in names if "tmp" in n]
    temperature = json.loads((best / "calibration.json").read_text())["temperature"]
    test = json.loads((best / "eval_test.json").read_text())
    assert test["calibration"]["temperature"] == pytest.approx(temperature)  # evaluated after calibrating
    assert test["checkpoint"] == str(best / "best.ckpt")  # (the temp folder's name does not stay)
    card = (best / "model_card.html").read_text()
    assert ".tmp-" not in card and ".tmp-" not in (best / "model_card.md").read_text()
    assert "temperature scaling (calibration.json)" in card and f"{temperature:.3f}" in card
    onnx = pytest.importorskip("onnx")
    meta = {p.key: p.value for p in onnx.load(str(best / "model.onnx")).metadata_props}
    assert float(meta["temperature"]) == pytest.approx(temperature) and meta["checkpoint"] == str(best / "best.ckpt")
    page = (sweep / "report.html").read_text()
    assert "JSONDecodeError" in page and 'href="../best/sweep/model_card.html"' in page


@pytest.mark.unit
def test_a_member_whose_writer_was_killed_is_failed_not_unfinished(tmp_path):
    """kill -9 leaves no metrics.json and the run folder's lock of a dead pid: the report says
    the member failed and how to go on, instead of showing it as still running."""
    import subprocess
    import sys
    killed = old_member(tmp_path, "0_lr=0.1", 0.1, 42, 0.7)
    (killed / "metrics.json").unlink()
    running = old_member(tmp_path, "1_lr=0.2", 0.2, 42, 0.7)
    (running / "metrics.json").unlink()
    subprocess.run([sys.executable, "-c", "import os, sys; from xray.run_lock import FolderLock; "
                    "FolderLock(sys.argv[1], rank=0).acquire(); os._exit(9)", str(killed)], check=False)
    assert (killed / ".xray.lock").exists()
    statuses = {m.name: (m.status, m.reason) for m in collect(tmp_path)}
    assert statuses["0_lr=0.1"][0] == "failed" and "rerunning it resumes" in statuses["0_lr=0.1"][1]
    assert statuses["1_lr=0.2"] == ("unfinished", None)


@pytest.mark.unit
def test_the_cost_to_a_val_target_counts_training_images_and_minutes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("batch_size: 32\ntrain:\n  max_steps_per_epoch: null\n")
    (run / "train_images.txt").write_text("".join(f"NORMAL/x{i}.jpeg\n" for i in range(100)))  # 3 steps of 32
    (run / "history.jsonl").write_text("".join(json.dumps({"epoch": e, "val_auc": auc, "time_s": 60.0}) + "\n"
                                               for e, auc in [(1, 0.8), (2, 0.95), (3, 0.97)]))
    main(["--compare", str(run), "--val-target", "0.9"])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "val_target", "epoch", "images", "train_min", "best_val_auc"]
    assert row.split() == ["run", "0.9", "2", "192", "2", "0.97"]
    main(["--compare", str(run), "--val-target", "0.99"])
    assert capsys.readouterr().out.splitlines()[1].split() == ["run", "0.99", "-", "-", "-", "0.97"]
    (run / "train_images.txt").unlink()
    with pytest.raises(SystemExit):
        main(["--compare", str(run), "--val-target", "0.9"])
    err = capsys.readouterr().err
    assert err.startswith("error: --val-target: ") and "train_images.txt" in err and "Traceback" not in err
