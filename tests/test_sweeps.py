"""Sweeps: the smoke sweep through Hydra's multirun (basic launcher), HParams with the same
keys for every member (diverged and failed ones too), the report's ranking, best-model export."""
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers import SAMPLE
from xray.checkpoint import load_trained_model, resolve_checkpoints
from xray.errors import XrayError
from xray.evaluate import evaluate
from xray.predict import predict_images
from xray.preprocess import preprocess_file
from xray.report import collect, report

pytestmark = pytest.mark.slow  # a real 8-member sweep (about 1.5 min), and a 6-member one over seeds


def hparams_of_run(run_dir) -> dict:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


@pytest.fixture(scope="module")
def smoke_sweep(sample_data, tmp_path_factory):
    """+sweep=smoke with an lr that overflows to NaN and an image size AlexNet cannot take:
    2 losses x 2 lrs x 2 sizes = 8 members: 2 ok, 2 diverged, 4 failed. Binary members: the
    report and export tests below read a two-class model's columns and logits."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "xray.train", "-m", "+sweep=smoke", f"data.dir={sample_data}", "task=binary",
         "lr=0.01,1e30", "momentum=0.99", "optim.warmup_epochs=0", "data.image_size=72,60",
         "train.max_steps_per_epoch=2", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=root, timeout=900)
    return root, sweep_dir, proc


def test_smoke_sweep_runs_every_member_even_after_failures(smoke_sweep):
    _, sweep_dir, proc = smoke_sweep
    members = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(members) == 8, proc.stderr[-3000:]
    assert "0_data.image_size=72,loss=mse,lr=0.01,momentum=0.99,optim.warmup_epochs=0,task=binary," \
           "train.max_steps_per_epoch=2" in members
    assert proc.returncode != 0  # Hydra reports the failed members at the end
    assert "data.image_size=60 must be an integer >= 67" in proc.stderr
    for m in members:
        metrics = json.loads((sweep_dir / m / "metrics.json").read_text())
        hp = metrics["hparams"]
        expected = ("failed" if hp["image_size"] == 60 else "diverged" if hp["lr"] > 1 else "ok")
        assert metrics["status"] == expected, (m, metrics)
    assert len([m for m in members if "lr=1e+30" in m]) == 4  # readable member names


def test_every_member_has_the_same_hparams_keys(smoke_sweep):
    _, sweep_dir, _ = smoke_sweep
    runs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    keys = [set(hparams_of_run(r)) for r in runs]
    assert all(k == keys[0] for k in keys)
    assert {"lr", "momentum", "loss", "batch_size", "epochs", "seed", "schedule", "status"} <= keys[0]
    statuses = sorted(hparams_of_run(r)["status"] for r in runs)
    assert statuses == ["diverged"] * 2 + ["failed"] * 4 + ["ok"] * 2


def test_report_ranks_and_exports_the_best(smoke_sweep, capsys):
    root, sweep_dir, _ = smoke_sweep
    best_root = root / "best"
    members = report(sweep_dir, best_root)
    ok = [m for m in members if m.status == "ok"]
    assert [m.status for m in members[:2]] == ["ok", "ok"]  # finished members first
    assert ok[0].best_val_auc >= ok[1].best_val_auc
    assert {m.status for m in members[2:]} == {"diverged", "failed"}
    printed = capsys.readouterr().out
    assert "2 ok, 2 diverged, 4 failed" in printed
    for name in ("report.csv", "report.md", "heatmap_auc.png", "loss_curves.png"):
        assert (sweep_dir / name).stat().st_size > 0
    csv = (sweep_dir / "report.csv").read_text().splitlines()
    assert csv[0].startswith("rank,member,status") and len(csv) == 9
    best = best_root / "smoke"
    names = {p.name for p in best.iterdir()}
    assert {"best.ckpt", "best.json", "config.yaml", "manifest.json", "metrics.json", "model.mindir",
            "calibration.json", "train_images.txt", "model.onnx", "model_card.md", "model_card.html"} <= names
    # the exported model evaluated on val and test (the card's numbers), through its temperature
    assert {f"{kind}_{split}.{ext}" for kind, ext in (("eval", "json"), ("predictions", "csv"), ("roc", "png"))
            for split in ("val", "test")} <= names
    assert not [n for n in names if n.startswith(".") or "tmp" in n]
    assert json.loads((best / "calibration.json").read_text())["temperature"] > 0  # fitted on val
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["source"] == str(ok[0].path)
    assert metrics["selection"]["value"] == ok[0].best_val_auc and metrics["selection"]["seeds"] == 1
    card = (best / "model_card.html").read_text()
    assert 'id="subgroups"' in card and 'id="provenance"' in card and "data:image/png;base64," in card

    # a worse candidate does not replace it; --force does
    before = (best / "metrics.json").read_text()
    members[0].metrics["best_val"]["auc"] = -1.0
    from xray.report import export_best
    assert export_best([members[1]], best_root) is None
    assert (best / "metrics.json").read_text() == before
    assert export_best([members[1]], best_root, force=True) == best
    assert json.loads((best / "metrics.json").read_text())["source"] == str(members[1].path)


def test_best_folder_works_with_evaluate_predict_and_mindir(smoke_sweep):
    root, sweep_dir, _ = smoke_sweep
    best = root / "best" / "smoke"
    if not best.exists():
        report(sweep_dir, root / "best")
    result = evaluate([best], "test", bootstrap=50, workers=1)
    assert (best / "eval_test.json").exists() and result["images"] == 20
    model = load_trained_model(best)
    images = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:4]
    from_ckpt = predict_images([model], images)
    graph = ms.nn.GraphCell(ms.load(str(best / "model.mindir")))
    for image, r in zip(images, from_ckpt):
        x = preprocess_file(image, model.spec)[None]
        logits = graph(ms.Tensor(x)).asnumpy()
        # the README's recipe: p = sigmoid((l1 - l0) / T), T from calibration.json
        p = 1 / (1 + np.exp(-(logits[0, 1] - logits[0, 0]) / model.temperature))
        assert p == pytest.approx(r["p_pneumonia"], abs=1e-5)
        assert ("PNEUMONIA" if p >= 0.5 else "NORMAL") == r["label"]


def test_report_on_an_unfinished_sweep(smoke_sweep, tmp_path):
    import shutil
    _, sweep_dir, _ = smoke_sweep
    partial = tmp_path / "partial"
    shutil.copytree(sweep_dir, partial, ignore=shutil.ignore_patterns("*.ckpt"))
    member = next(p for p in partial.iterdir() if p.is_dir() and "image_size=72" in p.name
                  and "lr=0.01" in p.name)
    (member / "metrics.json").unlink()  # still running
    members = collect(partial)
    assert [m.status for m in members].count("unfinished") == 1
    report(partial, best_root=None)
    assert "unfinished" in (partial / "report.md").read_text()


def test_report_shows_test_columns_ranks_by_them_and_exports_top_k(smoke_sweep, capsys):
    root, sweep_dir, _ = smoke_sweep
    best_root = root / "best_topk"
    report(sweep_dir, best_root)  # the best model first; later, the same winner and --top-k 2
    members = report(sweep_dir, best_root, rank_by="test_auc", top_k=2)
    ok = [m for m in members if m.status == "ok"]
    assert len(ok) == 2 and all(set(m.evals) == {"val", "test"} for m in ok)
    assert ok[0].evals["test"]["at_val_threshold"]["auc"]["value"] >= ok[1].evals["test"]["at_val_threshold"]["auc"]["value"]
    header = (sweep_dir / "report.csv").read_text().splitlines()[0].split(",")
    assert {"test_auc", "test_accuracy", "test_sensitivity", "test_specificity", "best_val_auc"} <= set(header)
    assert not any(c.startswith("val_") for c in header)  # val at its own threshold is optimistic
    assert {"loss", "lr", "image_size"} <= set(header)  # the levers that vary
    assert "ranked by test_auc" in capsys.readouterr().out
    assert (sweep_dir / "val_vs_test.png").stat().st_size > 0
    # the export chose by val AUC, whatever the ranking shown
    by_val = max(ok, key=lambda m: m.best_val_auc)
    best = best_root / "smoke"
    assert json.loads((best / "metrics.json").read_text())["source"] == str(by_val.path)
    assert sorted(p.name for p in (best / "members").iterdir()) == ["1", "2"]
    assert json.loads((best / "members" / "1" / "metrics.json").read_text())["source"] == str(by_val.path)
    result = evaluate(resolve_checkpoints(str(best), 2), "test", bootstrap=0, workers=1,
                      out_dir=root / "ensemble")
    assert len(result["checkpoint"]) == 2 and (root / "ensemble" / "eval_test.json").exists()
    with pytest.raises(XrayError, match="--rank-by nope is not a column"):
        collect(sweep_dir, rank_by="nope")


def test_report_reads_sweeps_made_before_the_recipe_keys(smoke_sweep, tmp_path):
    """A member whose .hydra/config.yaml predates label_smoothing, sampling, equalize and the
    intensity strengths is reported with the values those runs had."""
    import shutil
    import yaml
    _, sweep_dir, _ = smoke_sweep
    old = tmp_path / "old"
    member = next(p for p in sweep_dir.iterdir() if p.is_dir())
    shutil.copytree(member, old / member.name, ignore=shutil.ignore_patterns("*.ckpt", "events.*"))
    config = old / member.name / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    del cfg["loss"]["label_smoothing"], cfg["data"]["sampling"], cfg["data"]["equalize"]
    for key in ("brightness", "contrast", "gamma", "blur", "noise"):
        del cfg["data"]["augment"][key]
    config.write_text(yaml.safe_dump(cfg))
    metrics = json.loads((old / member.name / "metrics.json").read_text())  # nor did its own record
    for key in ("label_smoothing", "sampling", "equalize", "augment_gamma"):
        metrics.get("hparams", {}).pop(key, None)
    (old / member.name / "metrics.json").write_text(json.dumps(metrics))
    [m] = collect(old)
    assert m.hparams["label_smoothing"] == 0.0 and m.hparams["sampling"] == "shuffle"
    assert m.hparams["equalize"] == "none" and m.hparams["augment_gamma"] == 0.0


def test_a_search_over_a_continuous_lr_gets_no_lr_grid_figures(smoke_sweep, tmp_path):
    """An Optuna search draws a new lr per member: one heat-map column or loss-curve panel per
    lr would make a figure tens of thousands of pixels wide; the report leaves them out."""
    import shutil
    import yaml
    _, sweep_dir, _ = smoke_sweep
    search = tmp_path / "search"
    member = next(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    for i in range(10):
        copy = search / f"{i}_lr={0.001 * (i + 1):g}"
        shutil.copytree(member, copy, ignore=shutil.ignore_patterns("*.ckpt"))
        config = copy / ".hydra" / "config.yaml"
        cfg = yaml.safe_load(config.read_text())
        cfg["lr"] = 0.001 * (i + 1)
        config.write_text(yaml.safe_dump(cfg))
        metrics = json.loads((copy / "metrics.json").read_text())  # what the report reads first
        metrics["hparams"]["lr"] = cfg["lr"]
        (copy / "metrics.json").write_text(json.dumps(metrics))
    members = report(search, best_root=None)
    assert len({m.hparams["lr"] for m in members}) == 10
    assert (search / "report.csv").exists()
    assert not (search / "heatmap_auc.png").exists() and not (search / "loss_curves.png").exists()


@pytest.mark.slow
def test_a_sweep_over_a_config_group_gets_one_folder_per_member(sample_data, tmp_path):
    """+sweep=generalization sweeps data/augment: its "/" must not split a member's folder."""
    sweep_dir = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "xray.train", "-m", "+sweep=generalization", "data=sample",
         f"data.dir={sample_data}", "data/augment=mild,intensity", "data.equalize=none",
         "loss.label_smoothing=0", "data.sampling=shuffle", "data.image_size=72", "epochs=1",
         "batch_size=8", "data.workers=1", "train.max_steps_per_epoch=1", "train.eval_splits=[test]",
         "train.eval_bootstrap=0", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(folders) == 2 and all("data.augment=" in f for f in folders), folders
    members = collect(sweep_dir)
    assert sorted(m.hparams["augment_gamma"] for m in members) == [0.0, 0.3]
    assert all(set(m.evals) == {"test"} and m.status == "ok" for m in members)


def test_plots_never_put_members_that_differ_in_another_lever_together(smoke_sweep):
    """The smoke sweep varies image size too: one heat-map panel and one curve colour per
    (loss, image size), not one per loss."""
    from xray.report import curves_figure, heatmap_figure
    _, sweep_dir, _ = smoke_sweep
    members = collect(sweep_dir)
    heat = heatmap_figure(members)
    titles = sorted(ax.get_title() for ax in heat.axes if ax.get_title())
    assert titles == ["mse, image_size=60: best val AUC", "mse, image_size=72: best val AUC",
                      "softmax_ce, image_size=60: best val AUC", "softmax_ce, image_size=72: best val AUC"]
    curves = curves_figure(members)
    colours = {line.get_label().split(" (")[0]: line.get_color() for ax in curves.axes for line in ax.lines}
    assert len(colours) == 4 and len(set(colours.values())) == 4


def test_the_report_ranks_without_mindspore(smoke_sweep, tmp_path):
    """Ranking a sweep (on a login node, say) needs no MindSpore: only the export does."""
    _, sweep_dir, _ = smoke_sweep
    code = ("import sys; from xray.report import main; main([sys.argv[1], '--no-best']); "
            "assert 'mindspore' not in sys.modules, 'imported mindspore'")
    proc = subprocess.run([sys.executable, "-c", code, str(sweep_dir)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 ok, 2 diverged, 4 failed" in proc.stdout


def test_a_resumed_runs_loss_curve_has_each_step_once_and_no_tensorflow_warning(tmp_path, caplog):
    """A resumed run has two event files, the second restarting at its checkpoint's step (as
    xray.train writes them, purge_step = that step): the curve keeps the first file's steps up
    to it and the second's from it, quietly (the reader's "TensorFlow restart" warning would only
    puzzle a user of the report)."""
    from tensorboardX import SummaryWriter

    from xray.report import Member, train_loss_curve
    for suffix, steps in ((".1", range(0, 100, 10)), (".2", range(50, 150, 10))):  # stopped at 95, resumed at 50
        writer = SummaryWriter(str(tmp_path), filename_suffix=suffix, purge_step=steps[0] or None)
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / (1 + step) + (suffix == ".1" and step > 50), step)
        writer.close()
    caplog.set_level("INFO")
    steps, losses = train_loss_curve(Member("run", tmp_path, "ok", {}, "sweep"))
    assert steps.tolist() == list(range(0, 150, 10))
    assert np.allclose(losses, [1.0 / (1 + s) for s in steps])  # the resumed part's values after 50
    assert not [r for r in caplog.records if "restart" in r.getMessage()], caplog.text


def test_a_sweep_over_seeds_is_reported_per_configuration_and_exported_as_an_ensemble(sample_data, tmp_path):
    """+sweep=seeds beside an lr axis: 2 configurations x 3 seeds, one member folder each; the
    report ranks the configurations by their mean, and --ensemble exports the best one's seeds
    as one model (members/1..3) that evaluate and predict take, with its card."""
    sweep_dir = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "xray.train", "-m", "+sweep=seeds", "data=sample", f"data.dir={sample_data}",
         "lr=0.01,0.02", "data.image_size=72", "epochs=1", "batch_size=8", "data.workers=1",
         "train.max_steps_per_epoch=2", "train.eval_bootstrap=20", "train.cam_images=0",
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(folders) == 6 and all("seed=" in f for f in folders), folders
    members = collect(sweep_dir)
    assert sorted(m.hparams["seed"] for m in members) == [1, 1, 7, 7, 42, 42]
    assert {m.sweep_name for m in members} == {"seeds"}
    from xray.report import configurations
    configs = configurations(members)
    assert [len(c.members) for c in configs] == [3, 3] and {c.levers["lr"] for c in configs} == {0.01, 0.02}
    means = [c.stat("best_val_auc").mean for c in configs]
    assert means == sorted(means, reverse=True)
    proc = subprocess.run([sys.executable, "-m", "xray.report", str(sweep_dir), "--best-root",
                           str(tmp_path / "best"), "--ensemble"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "configurations over seeds" in proc.stdout
    best = tmp_path / "best" / "seeds"
    sources = [json.loads((best / "members" / str(i) / "metrics.json").read_text())["source"] for i in (1, 2, 3)]
    assert sorted(sources) == sorted(str(m.path) for m in configs[0].members)
    assert all((best / "members" / str(i) / "calibration.json").is_file() for i in (1, 2, 3))
    result = json.loads((best / "eval_test.json").read_text())
    assert len(result["checkpoint"]) == 3  # the card's numbers are the ensemble's
    assert "an ensemble of 3" in (best / "model_card.html").read_text()
    assert (sweep_dir / "report_seeds.csv").is_file() and (sweep_dir / "seeds.png").is_file()
    assert len(resolve_checkpoints(str(best), 3)) == 3
