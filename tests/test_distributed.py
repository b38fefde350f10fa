"""Data-parallel training (xray/distributed.py, xray/launch.py): 2 CPU ranks of one run, for
real, through MindSpore's own distributed runtime, against the same run on 1 rank.

A 2-rank step averages the gradients of the two halves of the global batch, so it equals a
1-rank step on the whole batch up to float rounding: same per-step losses, same validation.
Without the averaging (the test-only XRAY_DP_NO_GRAD_REDUCE=1) the losses part after step 0."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xray.distributed
import xray.train
from helpers import TINY, events, make_cfg
from xray.data import epoch_plan, rank_part
from xray.distributed import NO_GRAD_REDUCE, Group, env_from_slurm, join_slurm_job, slurm_head_node

# 3 steps an epoch on the sample, 2 epochs; no final evaluation or Grad-CAM (not what is compared);
# the paper's LRN, not batch norm (the default), whose ranks normalise each with its half of the
# batch and so do not train exactly like one rank (test_two_ranks_with_batch_norm_train_together)
RUN = TINY + ["lr=0.05", "model.norm=lrn", "train.max_steps_per_epoch=3", "train.eval_splits=[]", "train.cam_images=0"]


def step_losses(run_dir):
    """train/loss of every step logged, in step order (a step logged twice counts twice)."""
    return [e.value for e in sorted(events(run_dir).Scalars("train/loss"), key=lambda e: e.step)]


def history(run_dir):
    return [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]


def launch(ranks, overrides, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "xray.launch", "--ranks", str(ranks), "--", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_as_slurm_tasks(script, args, tmp_path, job_offset=0, extra=None):
    """Two processes of `script args` with only the SLURM_* variables of a 2-task job, as srun
    starts them (no Slurm needed: the variables are all they read). Each logs to a file (a full
    pipe would block a rank); returns the processes and their log paths."""
    job = str(1000 + (os.getpid() + job_offset) % 9000)  # -> scheduler port 21000-29999, below the ephemeral ports
    slurm = {"SLURM_JOB_ID": job, "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
             "GLOG_v": "2", **(extra or {})}  # (MindSpore's warnings on: the scheduler's log lines)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "SLURM_"))}
    logs = [tmp_path / f"task{task}.log" for task in range(2)]
    procs = []
    for task in range(2):
        with open(logs[task], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, *script, *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                env={**env, **slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}))
    return procs, logs


def wait_all(procs, timeout=600):
    """{task: time it exited}; kills whatever still runs at the deadline."""
    ended = {}
    try:
        deadline = time.time() + timeout
        while len(ended) < len(procs) and time.time() < deadline:
            for task, p in enumerate(procs):
                if task not in ended and p.poll() is not None:
                    ended[task] = time.time()
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return ended


@pytest.mark.unit
def test_each_rank_gets_its_contiguous_part_of_every_global_batch():
    order, _ = epoch_plan(np.array([0] * 10 + [1] * 22), seed=3, epoch=2)
    parts = [rank_part(order, 8, r, 2).reshape(-1, 4) for r in range(2)]
    whole = order[:32].reshape(-1, 8)
    assert np.array_equal(np.concatenate(parts, axis=1), whole)  # rank 0 | rank 1 = the global batch
    assert Group(1, 2).slice(8) == slice(4, 8)


@pytest.mark.unit
def test_slurm_tasks_become_mindspore_ranks():
    env = env_from_slurm({"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
                          "SLURM_JOB_NODELIST": "localhost"})
    assert env["MS_ROLE"] == "MS_WORKER" and env["MS_WORKER_NUM"] == "4" and env["MS_NODE_ID"] == "3"
    assert env["MS_SCHED_HOST"] == "127.0.0.1"  # an IP: MindSpore cannot parse a host name
    assert env["MS_SCHED_PORT"] == "21234"
    assert env["MS_CPU_COMM_OP_TIMEOUT"] == "1200"  # the ranks' last wait outlasts rank 0's evaluation
    assert env["MS_NODE_TIMEOUT"] == "120"  # a busy rank is not taken for dead after 30 s
    users = env_from_slurm({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                            "SLURM_JOB_NODELIST": "localhost",
                            "MS_CPU_COMM_OP_TIMEOUT": "60", "MS_NODE_TIMEOUT": "45"})
    assert users["MS_CPU_COMM_OP_TIMEOUT"] == "60" and users["MS_NODE_TIMEOUT"] == "45"
    assert slurm_head_node("gpu[03-05,07],cpu1") == "gpu03"


@pytest.mark.unit
def test_task_0_keeps_the_schedulers_output_and_an_unwritable_log_does_not_fail_it(monkeypatch, tmp_path,
                                                                                   caplog):
    """Task 0 of a 2-task job starts the scheduler with its output appended to scheduler.log,
    under a header per start; where that file cannot be written, a warning, and the job goes on."""
    started = []
    monkeypatch.setattr(xray.distributed, "start_scheduler",
                        lambda env, stdout=subprocess.DEVNULL: started.append(stdout) or "scheduler")
    monkeypatch.setattr(os, "environ", {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                                        "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": "1"})
    log_file = tmp_path / "run" / "scheduler.log"
    assert join_slurm_job(log_file) == "scheduler"
    assert started[0].name == str(log_file) and started[0].closed  # the child has its own copy
    assert log_file.read_text().startswith("--- ") and log_file.read_text().endswith("Slurm job 77, start 2\n")

    (tmp_path / "file").write_text("")
    os.environ.pop("MS_ROLE")  # (join_slurm_job set it: a second job, same process)
    assert join_slurm_job(tmp_path / "file" / "run" / "scheduler.log") == "scheduler"
    assert started[1] == subprocess.DEVNULL and "cannot write" in caplog.text


@pytest.fixture(scope="module")
def one_rank(sample_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = xray.train.train(make_cfg("config", RUN + [f"data.dir={sample_data}"]), run_dir)
    assert result["status"] == "ok" and result["ranks"] == 1
    return run_dir


@pytest.mark.slow
def test_two_ranks_train_exactly_like_one(sample_data, one_rank, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(2, RUN + [f"data.dir={sample_data}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rank 0]" in proc.stdout and "[rank 1]" in proc.stdout

    one, two = step_losses(one_rank), step_losses(run_dir)
    assert len(one) == len(two) == 6 and len(set(one)) == 6
    np.testing.assert_allclose(two, one, rtol=1e-4)  # step for step: gradients averaged
    for a, b in zip(history(one_rank), history(run_dir)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["val_auc"] == pytest.approx(a["val_auc"], abs=1e-6)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["ranks"] == 2

    # only rank 0 wrote: one event file, one metrics.json, rank 0's log lines only
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert len(list(run_dir.rglob("metrics.json"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "best.json"]
    assert (run_dir / "train.log").read_text().count("2 rank(s)") == 1


@pytest.mark.slow
def test_two_ranks_with_batch_norm_train_together(sample_data, tmp_path):
    """model.norm=batch: each rank normalises with its half of the batch; at every epoch's end
    all ranks replace the moving statistics by their mean over the ranks. That is a collective:
    a rank that skipped it would leave the other waiting (this test's timeout). The checkpoint
    holds the statistics (the values of the mean are not checked here)."""
    import mindspore as ms

    run_dir = tmp_path / "run"
    proc = launch(2, RUN + ["model.norm=batch", f"data.dir={sample_data}", f"hydra.run.dir={run_dir}"],
                  tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(history(run_dir)) == 2
    stats = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(run_dir / "checkpoints" / "best.ckpt")).items()
             if k.endswith(("moving_mean", "moving_variance"))}
    assert len(stats) == 10 and not np.allclose(stats["features.1.moving_mean"], 0)


@pytest.mark.slow
def test_without_gradient_averaging_the_ranks_do_not_match(sample_data, one_rank, tmp_path):
    """The guard of the test above: skip the averaging and the losses are no longer those of
    one rank (each rank then steps on its own half-batch gradient)."""
    run_dir = tmp_path / "run"
    proc = launch(2, RUN + [f"data.dir={sample_data}", f"hydra.run.dir={run_dir}"], tmp_path,
                  env={NO_GRAD_REDUCE: "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = step_losses(one_rank), step_losses(run_dir)
    assert two[0] == pytest.approx(one[0], rel=1e-5)  # same weights before the first update
    rel = np.abs(np.array(two[1:]) - np.array(one[1:])) / np.abs(one[1:])
    assert rel.max() > 1e-3, rel


@pytest.mark.slow
def test_batch_not_divisible_by_ranks_is_one_line(sample_data, tmp_path):
    proc = launch(2, RUN + [f"data.dir={sample_data}", "batch_size=7"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: batch_size=7 (the global batch) does not split evenly over "
                                   "2 ranks; use a multiple of 2")
    assert not (tmp_path / "outputs").exists()  # nothing started
    # the same check inside a rank (a Slurm task, msrun), before it waits for the others
    proc = subprocess.run([sys.executable, "-m", "xray.train", *RUN, f"data.dir={sample_data}",
                           "batch_size=7", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2",
                               "MS_NODE_ID": "0", "MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: batch_size=7 (the global batch) does not "
                                                    "split evenly over 2 ranks; use a multiple of 2")


@pytest.mark.slow
def test_a_stopped_group_resumes_with_the_exact_batches(sample_data, one_rank, tmp_path, capfd,
                                                        monkeypatch):
    """The time-limit signal reaches rank 1 only, during step 4 (epoch 2, mid-epoch): every rank
    stops after that step, rank 0 saves last.ckpt and requeues; the resumed group ends exactly as
    an uninterrupted run (the 1-rank run, which the 2-rank run equals)."""
    from xray.launch import launch as launch_ranks

    run_dir = tmp_path / "run"
    overrides = RUN + [f"data.dir={sample_data}", f"hydra.run.dir={run_dir}"]
    with monkeypatch.context() as env:
        env.setenv("XRAY_TEST_STOP_STEP", "4")
        env.setenv("XRAY_TEST_SIGNAL_RANK", "1")
        env.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
        code = launch_ranks(2, overrides, module="dp_requeue_driver")
    out = capfd.readouterr().out
    assert code == 3, out[-3000:]  # rank 0 requeued (exit code of the submitit-like handler)
    assert "[rank 0] requeued" in out and "stopping for requeue" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(step_losses(run_dir)) == 5  # steps 0..4 ran

    proc = launch(2, overrides, tmp_path)  # the requeued group
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resume:" in (run_dir / "train.log").read_text()
    np.testing.assert_allclose(step_losses(run_dir), step_losses(one_rank), rtol=1e-4)
    for a, b in zip(history(one_rank), history(run_dir)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_completed"] == 2


@pytest.mark.slow
def test_tasks_started_as_slurm_starts_them_train_like_one_rank(sample_data, one_rank, tmp_path):
    """Two `python -m xray.train` processes with only the SLURM_* variables of a 2-task job (as
    srun starts them): they derive MindSpore's cluster variables, task 0 starts the scheduler,
    and the run equals the 1-rank run (no Slurm needed: the variables are all they read)."""
    run_dir = tmp_path / "run"
    procs, logs = start_as_slurm_tasks(["-m", "xray.train"], RUN + [f"data.dir={sample_data}",
                                       f"hydra.run.dir={run_dir}"], tmp_path)
    wait_all(procs)
    outs = [path.read_text(errors="replace") for path in logs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    np.testing.assert_allclose(step_losses(run_dir), step_losses(one_rank), rtol=1e-4)
    assert json.loads((run_dir / "metrics.json").read_text())["ranks"] == 2
    log = (run_dir / "train.log").read_text()
    assert "Slurm task 0 of 2: MindSpore scheduler at 127.0.0.1:" in log and "Slurm task 1" not in log
    scheduler_log = (run_dir / "scheduler.log").read_text()  # task 0's scheduler wrote its output there
    assert scheduler_log.startswith("--- ") and "MetaServerNode" in scheduler_log, scheduler_log[:2000]


@pytest.mark.slow
def test_every_rank_leaves_after_rank_0_has_written_the_result(sample_data, tmp_path):
    """Rank 0 evaluates after training while the others have nothing left to do; they wait for
    it (a rank tearing MindSpore down while rank 0 still worked died of SIGSEGV under Slurm),
    also past MindSpore's default 30 s wait of a CPU collective, and every rank exits 0."""
    run_dir = tmp_path / "run"
    driver = Path(__file__).with_name("dp_slow_end_driver.py")
    procs, logs = start_as_slurm_tasks([str(driver)], RUN + [f"data.dir={sample_data}",
                                       f"hydra.run.dir={run_dir}"], tmp_path, job_offset=1,
                                       extra={"XRAY_TEST_END_DELAY": "40"})
    ended = wait_all(procs)
    outs = [path.read_text(errors="replace") for path in logs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "leaving without waiting" not in outs[1], outs[1][-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["eval_time_s"] >= 40  # rank 0 was slow
    written = (run_dir / "metrics.json").stat().st_mtime
    assert ended[1] >= written, f"rank 1 left {written - ended[1]:.0f} s before rank 0 wrote the result"


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_group(sample_data, tmp_path):
    """Rank 1 dies mid-training (as after a segfault): rank 0, waiting in that step's AllReduce,
    is ended by MindSpore (SIGTERM) once rank 1 has missed its heartbeats for MS_NODE_TIMEOUT
    seconds (a user's value, 60 here; MindSpore's default is 30), also under submitit's SIGTERM
    handler, which only logs it: the job ends and frees its nodes instead of waiting out the
    collective timeout (300 s here, 20 minutes by default)."""
    run_dir = tmp_path / "run"
    driver = Path(__file__).with_name("dp_crash_driver.py")
    procs, logs = start_as_slurm_tasks([str(driver)], RUN + [f"data.dir={sample_data}",
                                       f"hydra.run.dir={run_dir}"], tmp_path, job_offset=2,
                                       extra={"XRAY_TEST_CRASH_STEP": "4", "XRAY_TEST_CRASH_RANK": "1",
                                              "MS_NODE_TIMEOUT": "60", "MS_CPU_COMM_OP_TIMEOUT": "300"})
    ended = wait_all(procs, timeout=600)
    outs = [path.read_text(errors="replace") for path in logs]
    assert "rank 1 dies at step 4" in outs[1] and procs[1].returncode == 9, outs[1][-3000:]
    assert 0 in ended and procs[0].returncode == -signal.SIGTERM, outs[0][-3000:]  # MindSpore ended it
    waited = ended[0] - ended[1]  # (60 s and the heartbeat's own lag; our default 120 would not fit)
    assert 55 <= waited <= 110, f"rank 0 ended {waited:.0f} s after rank 1 died\n" + outs[0][-2000:]
    assert "is timed out" in (run_dir / "scheduler.log").read_text()  # which rank, for a post-mortem
    record = json.loads((run_dir / "metrics.json").read_text())  # the group's record says so too
    assert record["status"] == "failed" and record["error"].startswith("rank 0: ended by SIGTERM"), record
    assert "is timed out" in record["error"] and set(record["ranks"]) == {"0"}
