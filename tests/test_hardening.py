"""What a hostile (or tired) user does: rerun a finished run with a typo, fill the disk, kill
a conversion, pass nonsense values, feed broken files. Each gets one line and a non-zero exit,
and nothing already written is lost."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, SAMPLE, TINY, bomb_png, copy_sample, make_cfg
from xray.convert import convert
from xray.report import collect
from xray.train import train


def run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def one_line_error(proc) -> str:
    """The error line; fails if a traceback or tensorboardX's NaN warning came with it."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "NaN or Inf" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


FINISHED = TINY + ["epochs=1", "train.max_steps_per_epoch=1", "train.eval_splits=[]"]  # the finished run's


@pytest.fixture
def finished_run(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg("config", FINISHED + [f"data.dir={sample_data}"])
    assert train(cfg, run_dir)["status"] == "ok"
    return run_dir


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


@pytest.mark.slow
def test_rerunning_a_finished_run_with_a_typo_changes_nothing(finished_run, tmp_path):
    """A typo in a key that does not define the run (data.dir) returns the finished result; one
    in a key that does (lr) is refused (tests/test_run_folder.py)."""
    before = snapshot(finished_run)
    lr = json.loads((finished_run / "metrics.json").read_text())["hparams"]["lr"]
    proc = run(["xray.train", *FINISHED, "data.dir=/nonexistent", f"hydra.run.dir={finished_run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished (status ok); not training it again" in proc.stdout + proc.stderr
    assert snapshot(finished_run) == before  # metrics.json, config.yaml, events, checkpoints
    proc = run(["xray.train", *FINISHED, f"lr={lr * 10}", f"hydra.run.dir={finished_run}"], tmp_path)
    assert proc.returncode == 2 and f"lr: {lr} -> {lr * 10}" in one_line_error(proc)
    assert snapshot(finished_run) == before
    [member] = collect(finished_run.parent)  # the report shows what the run trained with
    assert member.hparams["lr"] == lr


@pytest.mark.slow
def test_overwrite_starts_a_finished_run_over(finished_run, sample_data):
    first = json.loads((finished_run / "metrics.json").read_text())
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "epochs=2", "train.max_steps_per_epoch=1",
                                     "train.eval_splits=[]", "overwrite=true"])
    (finished_run / "calibration.json").write_text('{"temperature": 3.0}')  # the old model's
    (finished_run / "reliability_val.png").write_bytes(b"old")
    result = train(cfg, finished_run)
    assert result["epochs_completed"] == 2 and first["epochs_completed"] == 1
    assert len(list(finished_run.glob("events.out.tfevents.*"))) == 1  # the old events went
    assert not (finished_run / "calibration.json").exists() and not (finished_run / "reliability_val.png").exists()


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_one_line_and_touches_nothing(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "epochs=2", "train.max_steps_per_epoch=1",
                                     "train.eval_splits=[]", "train.keep_last=true"])
    train(cfg, run_dir)
    (run_dir / "metrics.json").unlink()  # as if it had been stopped before the end
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    before = snapshot(run_dir)
    proc = run(["xray.train", *TINY, f"data.dir={sample_data}", "epochs=2", "train.max_steps_per_epoch=1",
                f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert str(last) in line and "overwrite=true" in line
    after = snapshot(run_dir)
    for name in ("config.yaml", "history.jsonl", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert after[name] == before[name], name
    assert json.loads(after["metrics.json"])["status"] == "failed"


def test_a_bad_value_is_one_line_and_exit_2(sample_data, tmp_path):
    proc = run(["xray.train", *TINY, f"data.dir={sample_data}", "lr=abc", f"hydra.run.dir={tmp_path / 'r'}"],
               tmp_path)
    assert proc.returncode == 2
    assert one_line_error(proc) == "error: lr=abc must be a number > 0"
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_predict_keeps_file_order_shows_errors_and_exits_non_zero(trained_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[:2]
    shutil.copy(good[0], folder / "a.jpeg")
    (folder / "b.jpeg").write_bytes(b"not an image")
    shutil.copy(good[1], folder / "c.jpeg")
    bomb_png(folder / "d.png")
    proc = run(["xray.predict", f"ckpt={trained_run}/checkpoints/best.ckpt", f"image={folder}",
                f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2
    rows = [ln.split()[:2] for ln in proc.stdout.splitlines() if ln.startswith(str(folder))]
    assert [Path(r[0]).name for r in rows] == ["a.jpeg", "b.jpeg", "c.jpeg", "d.png"]
    assert [r[1] for r in rows][1::2] == ["error", "error"] and "error" not in (rows[0][1], rows[2][1])
    assert "2 of 4 images could not be read" in one_line_error(proc)


def test_convert_lists_links_and_bombs_under_skipped(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=3)
    normal = root / "train" / "NORMAL"
    (normal / "dangling.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    (normal / "loop1.jpeg").symlink_to(normal / "loop2.jpeg")
    (normal / "loop2.jpeg").symlink_to(normal / "loop1.jpeg")
    bomb_png(normal / "IM-9999-0001.png")
    manifest = convert(root, tmp_path / "out", short_side=64, workers=1)
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["dangling.jpeg"].startswith("dangling symlink ->")
    assert reasons["loop1.jpeg"] == reasons["loop2.jpeg"] == "symlink loop"
    assert "bomb" in reasons["IM-9999-0001.png"] or "exceeds limit" in reasons["IM-9999-0001.png"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_leaves_no_temp_files_and_records_the_failure(sample_data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], check=True)
    try:
        proc = run(["xray.train", *TINY, f"data.dir={sample_data}", f"hydra.run.dir={disk / 'run'}"], tmp_path)
        assert proc.returncode == 2
        assert "MB free but this run's checkpoints needs" in one_line_error(proc)
        assert json.loads((disk / "run" / "metrics.json").read_text())["status"] == "failed"
        assert not [p for p in (disk / "run").rglob(".*") if p.is_file()]  # no temp files
        proc = run(["xray.convert", "data=sample", f"data.dir={disk / 'data'}",
                    f"hydra.run.dir={tmp_path / 'c'}", "data.short_side=1024"], tmp_path)
        assert proc.returncode == 2 and "disk full" in one_line_error(proc)
        assert not any(p.name.startswith(".data") for p in disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_result_files_are_strict_json_with_provenance(trained_run):
    for path in [trained_run / "metrics.json", trained_run / "history.jsonl",
                 *trained_run.glob("eval_*.json")]:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path
    metrics = json.loads((trained_run / "metrics.json").read_text())
    prov = metrics["provenance"]
    # a commit of this repository, the versions imported here, this host
    commit = subprocess.run(["git", "-C", str(REPO), "cat-file", "-t", prov["git"]["commit"] or "-"],
                            capture_output=True, text=True)
    assert commit.stdout.strip() == "commit", prov["git"]
    assert isinstance(prov["git"]["dirty"], bool)
    import mindspore
    import numpy
    assert (prov["versions"]["mindspore"], prov["versions"]["numpy"]) == (mindspore.__version__, numpy.__version__)
    assert prov["host"] == socket.gethostname() and prov["device_target"] == "CPU"
    if "SLURM_ARRAY_JOB_ID" not in os.environ:  # (an array task's id is <array>_<task>)
        assert prov["slurm_job_id"] == os.environ.get("SLURM_JOB_ID")


@pytest.mark.slow
def test_a_second_training_into_a_busy_run_folder_is_refused(sample_data, tmp_path):
    """Two trainings started into one hydra.run.dir: the second is refused in one line naming
    the holder, and the first writes its history alone (issue 26, item 4)."""
    run_dir = tmp_path / "run"
    args = ["xray.train", *TINY, f"data.dir={sample_data}", "epochs=3", "train.eval_splits=[]",
            f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "history.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # the first has trained an epoch: it holds the folder
    second = run(args, tmp_path)
    assert second.returncode == 2
    line = one_line_error(second)
    assert f"pid {first.pid}" in line and "training" in line and "another run folder" in line
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3] and json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    assert not (run_dir / ".xray.lock").exists()
