"""Real jobs on the local Slurm cluster (jobs/slurm-up.sh): conversion on `cpu`, a sweep as a
job array on `gpu` (device_target=CPU forced: no CUDA here), failures recorded truthfully,
a time-limited training job that is requeued and still trains every epoch, a cancelled
sweep member, and the whole pipeline chain with its dependencies.

Skipped when no cluster answers, unless XRAY_REQUIRE_SLURM=1 (as in CI)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xray.distributed import NOISE

pytestmark = pytest.mark.slurm

if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
    if os.environ.get("XRAY_REQUIRE_SLURM") == "1":
        raise RuntimeError("XRAY_REQUIRE_SLURM=1 but no Slurm cluster answers: run jobs/slurm-up.sh")
    pytest.skip("no Slurm cluster (start one with jobs/slurm-up.sh)", allow_module_level=True)

CPU = ["device_target=CPU"]  # the gpu partition's fake GPUs have no CUDA behind them


def run(args, cwd, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def sacct(job_id: str) -> dict[str, dict]:
    """{job id: {State, Partition, Start, End}} for a job (array tasks included), polled until
    accounting has final states (sacct lags a few seconds behind the jobs)."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(job_id),
                              "--format=JobID,State,Partition,Start,End"],
                             capture_output=True, text=True).stdout
        rows = {}
        for line in out.splitlines():
            job, state, partition, start, end = line.split("|")
            rows[job] = {"State": state.split()[0], "Partition": partition, "Start": start, "End": end}
        if rows and all(r["State"] not in ("PENDING", "RUNNING", "REQUEUED") and r["Partition"]
                        for r in rows.values()):
            return rows
        if time.time() > deadline:
            return rows
        time.sleep(1)


def job_report(job_id: str, folder: Path) -> str:
    """What a failed assertion on a job should show: every step's state and exit code (which
    task failed, and how), and the end of each task's log without MindSpore's chatter."""
    steps = subprocess.run(["sacct", "-n", "-P", "-j", str(job_id), "--format=JobID,State,ExitCode,NTasks"],
                           capture_output=True, text=True).stdout
    tails = []
    for log_file in sorted(folder.glob(f".submitit/{job_id}*/*_log.*")):
        lines = [x for x in log_file.read_text(errors="replace").splitlines()
                 if not x.startswith(("[WARNING] ", "[INFO] "))]
        tails.append(f"--- {log_file.name}\n" + "\n".join(lines[-15:]))
    for log_file in sorted(folder.glob("*/scheduler.log")):  # a data-parallel member's scheduler
        lines = [x for x in log_file.read_text(errors="replace").splitlines()
                 if not any(noise in x for noise in NOISE)]
        tails.append(f"--- {log_file.parent.name}/scheduler.log\n" + "\n".join(lines[-10:]))
    return "sacct:\n" + steps + "\n".join(tails)


def submitit_job_ids(folder: Path) -> set[str]:
    return {p.name.split("_")[0] for p in (folder / ".submitit").iterdir() if p.is_dir()}


def test_convert_runs_on_the_cpu_partition(tmp_path):
    proc = run(["-m", "xray.convert", "-m", "hydra/launcher=slurm_cpu", "data=sample",
                f"data.dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["images"] == 20
    (job,) = submitit_job_ids(tmp_path / "sweep")
    states = sacct(job)
    assert [r["State"] for r in states.values()] == ["COMPLETED"], job_report(job, tmp_path / "sweep")
    assert [r["Partition"] for r in states.values()] == ["cpu"]


def test_sweep_is_one_job_array_on_the_gpu_partition(sample_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", "xray.train", "-m", "hydra/launcher=slurm_gpu", "+sweep=smoke", *CPU,
                f"data.dir={sample_data}", "train.max_steps_per_epoch=2",
                f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    members = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(members) == 4
    for m in members:
        assert json.loads((m / "metrics.json").read_text())["status"] == "ok"
        assert json.loads((m / "metrics.json").read_text())["hparams"]["amp"] == "O2"  # the GPU profile's
        assert (m / "slurm.out").resolve().is_file()  # the job's log, linked from the run
    (array,) = submitit_job_ids(sweep)
    states = sacct(array)
    assert sorted(states) == [f"{array}_{i}" for i in range(4)]
    assert {r["State"] for r in states.values()} == {"COMPLETED"}, job_report(array, sweep)
    assert {r["Partition"] for r in states.values()} == {"gpu"}


def test_failed_member_is_failed_in_slurm_and_outputs(sample_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", "xray.train", "-m", "hydra/launcher=slurm_gpu", *CPU,
                f"data.dir={sample_data}", "data=sample", "data.image_size=60,72", "epochs=1",
                "batch_size=8", "train.max_steps_per_epoch=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode != 0  # Hydra reports the failed member after all have run
    (array,) = submitit_job_ids(sweep)
    states = sacct(array)
    assert states[f"{array}_0"]["State"] == "FAILED"
    assert states[f"{array}_1"]["State"] == "COMPLETED"
    failed = next(p for p in sweep.iterdir() if p.name.startswith("0_"))
    metrics = json.loads((failed / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "data.image_size=60 must be an integer >= 67" in metrics["error"]
    assert "data.image_size=60 must be an integer >= 67" in (failed / "slurm.err").read_text()


def test_time_limited_training_is_requeued_and_completes_every_epoch(sample_data, tmp_path):
    sweep = tmp_path / "sweep"
    epochs = 10  # ~55 s of fp32 work on an idle machine: more than the ~45 s before the signal
    start = time.time()
    proc = run(["-m", "xray.train", "-m", "hydra/launcher=slurm_gpu", *CPU,
                f"data.dir={sample_data}", "data=sample", "data.image_size=72", "batch_size=8",
                f"epochs={epochs}", "train.amp=O0", "hydra.launcher.timeout_min=1",
                "hydra.launcher.signal_delay_s=15", "hydra.launcher.max_num_timeout=20",
                f"hydra.sweep.dir={sweep}"], tmp_path, timeout=1200)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    log = (run_dir / "train.log").read_text()
    assert "stopping for requeue" in log, "the job was never interrupted"
    assert "resume:" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == epochs
    history = [json.loads(x)["epoch"] for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == list(range(1, epochs + 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = sorted({e.step for e in acc.Scalars("train/loss")})
    per_epoch = json.loads((sample_data / "manifest.json").read_text())["splits"]["train"]["images"] // 8
    assert steps == list(range(epochs * per_epoch))  # every step once: the TensorBoard step continued
    (job,) = submitit_job_ids(sweep)
    assert [r["State"] for r in sacct(job).values()] == ["COMPLETED"], job_report(job, sweep)
    # Slurm sends SIGCONT with every time-limit signal: no dataset worker may die of it (a dead
    # worker leaves the training waiting for a batch until the job is killed, unrequeued)
    job_log = (sweep / ".submitit" / job / f"{job}_0_log.err").read_text()
    # (a worker's wait failed on a signal, or SIGUSR2 killed it; not the deaths of Slurm's SIGTERM)
    worker_deaths = re.findall(r"errno: 4\b|killed by signal: User defined signal 2", job_log)
    assert not worker_deaths, job_report(job, sweep)
    history_rows = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "--format=State"],
                                  capture_output=True, text=True).stdout.split()
    requeues = history_rows.count("REQUEUED")
    assert requeues >= 1 and history_rows[-1] == "COMPLETED"
    print(f"requeued run: {elapsed:.0f} s wall, {requeues} requeues, {epochs} epochs")


def test_pipeline_chain_and_a_cancelled_member(tmp_path):
    out = tmp_path / "pipe"
    proc = run(["-m", "jobs.pipeline", "data=sample", f"data.dir={tmp_path / 'data'}",
                "+sweep=smoke", *CPU, "train.max_steps_per_epoch=2", "--out", str(out)], tmp_path,
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "jobs.json").read_text())
    assert set(record["jobs"]) == {"doctor", "convert", "train", "evaluate"}
    members = record["members"]
    assert len(members) == 4
    victim_name, victim = sorted(members.items())[0]
    deadline = time.time() + 300
    while time.time() < deadline:  # cancel it while it runs, as a user would
        state = subprocess.run(["squeue", "-h", "-r", "-j", victim, "-o", "%T"],
                               capture_output=True, text=True).stdout.strip()
        if state == "RUNNING":
            break
        time.sleep(0.5)
    assert state == "RUNNING"
    subprocess.run(["scancel", victim], check=True)

    deadline = time.time() + 600
    while time.time() < deadline:
        if sacct(record["jobs"]["evaluate"]).get(record["jobs"]["evaluate"], {}).get("State") \
                in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(5)
    jobs = {k: sacct(v)[v] for k, v in record["jobs"].items() if k != "train"}
    tasks = sacct(record["jobs"]["train"])
    assert jobs["convert"]["State"] == "COMPLETED" and jobs["convert"]["Partition"] == "cpu"
    assert jobs["doctor"]["State"] == "COMPLETED" and jobs["doctor"]["Partition"] == "gpu"
    assert json.loads((out / "doctor.json").read_text())["devices"]["CPU"]["ok"]
    assert tasks[victim]["State"] == "CANCELLED"
    others = [j for n, j in members.items() if n != victim_name]
    assert {tasks[j]["State"] for j in others} == {"COMPLETED"}
    # afterok / afterany: training started after conversion and doctor ended, evaluation after training
    assert min(tasks[j]["Start"] for j in others) >= max(jobs["convert"]["End"], jobs["doctor"]["End"])
    assert jobs["evaluate"]["Start"] >= max(tasks[j]["End"] for j in others)
    assert jobs["evaluate"]["State"] == "COMPLETED"
    best = Path(record["best_dir"])
    assert json.loads((best / "eval_test.json").read_text())["images"] == 20

    status = run(["-m", "jobs.status", str(out)], tmp_path).stdout
    victim_line = next(line for line in status.splitlines() if victim_name in line)
    assert victim_line.split()[:2] == ["CANCELLED", "cancelled"] and "log:" in victim_line
    assert "array of 4: 1 CANCELLED, 3 COMPLETED" in status and "progress: 1 cancelled, 3 ok" in status


def test_a_pipeline_whose_gpu_nodes_cannot_train_stops_at_the_doctor(tmp_path):
    """device_target=GPU on a partition whose 'GPUs' have no CUDA: the doctor job fails with its
    one line, nothing trains, and jobs.status says why."""
    out = tmp_path / "pipe"
    proc = run(["-m", "jobs.pipeline", "data=sample", f"data.dir={tmp_path / 'data'}",
                "device_target=GPU", "epochs=1", "--out", str(out)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "jobs.json").read_text())
    doctor = record["jobs"]["doctor"]
    deadline = time.time() + 600
    while time.time() < deadline and sacct(doctor).get(doctor, {}).get("State") not in ("COMPLETED", "FAILED"):
        time.sleep(5)
    assert sacct(doctor)[doctor]["State"] == "FAILED"
    verdict = json.loads((out / "doctor.json").read_text())["verdict"]
    assert verdict.startswith("device_target=GPU cannot train on")
    deadline = time.time() + 120
    while time.time() < deadline:  # Slurm cancels what waited on the doctor
        pending = subprocess.run(["squeue", "-h", "-r", "-j", f"{record['jobs']['train']},{record['jobs']['evaluate']}"],
                                 capture_output=True, text=True).stdout.strip()
        if not pending:
            break
        time.sleep(2)
    assert not pending
    assert not (out / "sweep").exists() or not any((out / "sweep").iterdir())  # nothing trained
    status = run(["-m", "jobs.status", str(out)], tmp_path).stdout
    assert f"doctor: {verdict}" in status


def test_a_data_parallel_member_runs_as_two_slurm_tasks(sample_data, tmp_path):
    """cluster.gpus_per_node=2: the slurm_gpu profile asks for 2 tasks, each one rank of the
    same run (MindSpore's scheduler started by task 0); the run says ranks 2, only rank 0
    wrote, and its losses are those of one rank (tests/test_distributed.py checks that step by
    step without Slurm)."""
    sweep = tmp_path / "sweep"
    proc = run(["-m", "xray.train", "-m", "hydra/launcher=slurm_gpu", *CPU, "train.amp=O0",
                "cluster.gpus_per_node=2", "cluster.cpus_per_gpu_job=1", f"data.dir={sample_data}",
                "data=sample", "data.image_size=72", "batch_size=8", "epochs=1",
                "train.max_steps_per_epoch=2", "train.eval_splits=[]", "train.cam_images=0",
                f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = submitit_job_ids(sweep)
    assert [r["State"] for r in sacct(job).values()] == ["COMPLETED"], job_report(job, sweep)
    (member,) = [p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()]
    metrics = json.loads((member / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["ranks"] == 2
    assert len(list(member.glob("events.out.tfevents.*"))) == 1
    assert f"Slurm job {job}, start 1" in (member / "scheduler.log").read_text()  # task 0's scheduler
    tasks = subprocess.run(["sacct", "-n", "-P", "-j", job, "--format=JobID,NTasks"],
                           capture_output=True, text=True).stdout
    assert any(line.split("|")[1] == "2" for line in tasks.splitlines() if line.count("|") == 1), tasks


def test_a_subtype_pipeline_trains_ranks_and_evaluates_three_classes(tmp_path):
    """`jobs.pipeline task=...` (issue 8): the subtype sweep's four members train as one array,
    the evaluate job exports the winner to outputs/best/subtype and evaluates it as a 3-class
    model, with the two-class read-offs."""
    out = tmp_path / "pipe"
    proc = run(["-m", "jobs.pipeline", "data=sample", f"data.dir={tmp_path / 'data'}",
                "+sweep=subtype", *CPU, "epochs=1", "batch_size=8", "data.image_size=72",
                "data.workers=1", "train.max_steps_per_epoch=2", "--out", str(out)], tmp_path,
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "jobs.json").read_text())
    evaluate_job = record["jobs"]["evaluate"]
    deadline = time.time() + 600
    while time.time() < deadline and sacct(evaluate_job).get(evaluate_job, {}).get("State") \
            not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(5)
    tasks = sacct(record["jobs"]["train"])
    assert len(record["members"]) == 4
    assert {tasks[j]["State"] for j in record["members"].values()} == {"COMPLETED"}, \
        job_report(record["jobs"]["train"], out / "sweep")
    assert sacct(evaluate_job)[evaluate_job]["State"] == "COMPLETED", job_report(evaluate_job, out)
    best = Path(record["best_dir"])
    assert best.name == "subtype"
    result = json.loads((best / "eval_test.json").read_text())
    assert result["classes"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    assert np.asarray(result["argmax"]["confusion_matrix"]).shape == (3, 3)
    assert set(result["read_off"]) == {"pneumonia_vs_normal", "bacterial_vs_viral"}
