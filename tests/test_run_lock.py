"""xray.run_lock against real processes: a second writer refuses in one line (exit 2), a killed
holder's lock is taken over, a requeued Slurm job takes its own lock back (even from "another
host"), two processes racing for one stale lock never both win, and the ranks of a group share
one lock. One test submits real jobs to the local Slurm cluster (skipped without one)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from xray.run_lock import LOCK_NAME, FolderLock, hold, read_holder

REPO = Path(__file__).resolve().parents[1]

# A process that holds the lock until `stop` exists (or hold_s passes), like a training job;
# its first stdout line says what it got. Under one_line_errors, as the entrypoints run.
DRIVER = r"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from xray.errors import one_line_errors
from xray.run_lock import hold

@one_line_errors
def main(folder, what, beside, hold_s, stop):
    if os.environ.get("START_AT"):
        time.sleep(max(0.0, float(os.environ["START_AT"]) - time.time()))
    with hold(folder, what=what, beside=beside == "beside") as lock:
        took = lock.took_over
        print(json.dumps({"pid": os.getpid(), "owner": lock.owner,
                          "took_over": took and took.get("pid"),
                          "token": lock.record and lock.record.get("token")}), flush=True)
        deadline = time.time() + float(hold_s)
        while time.time() < deadline and not os.path.exists(stop):
            time.sleep(0.02)

main(*sys.argv[1:])
"""

_CLEAN = ("SLURM_", "SUBMITIT_", "MS_", "XRAY_GROUP_ID", "XRAY_LOCK_", "_XRAY_LOCK_", "DEVICE_ID")


def clean_env(**extra) -> dict:
    """The environment of a plain process (none of the job/launcher variables of whatever runs
    these tests), scontrol not consulted unless a test asks, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEAN)}
    env["XRAY_LOCK_SCONTROL"] = "0"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Holder:
    """A driver process; `.info` is its first line once it holds the lock."""

    def __init__(self, folder: Path, env: dict | None = None, what="training", beside=False,
                 hold_s=60.0):
        self.stop_file = Path(tempfile.gettempdir()) / f"xray-lock-test-stop-{uuid.uuid4().hex}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(folder), what, "beside" if beside else "inside",
             str(hold_s), str(self.stop_file)],
            env=env or clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.info = None

    def wait_held(self, timeout=30) -> dict:
        line = self.proc.stdout.readline()  # (blocks until the lock is held or the process ends)
        assert line, f"no lock (exit {self.proc.wait(timeout)}): {self.proc.stderr.read()}"
        self.info = json.loads(line)
        return self.info

    def stop(self, timeout=30) -> tuple[int, str]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=timeout)
        self.stop_file.unlink()
        return self.proc.returncode, err

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)


def run_once(folder: Path, env: dict | None = None, what="training", beside=False,
             timeout=30) -> subprocess.CompletedProcess:
    """A driver that takes the lock and lets go at once (or refuses)."""
    return subprocess.run([sys.executable, "-c", DRIVER, str(folder), what,
                           "beside" if beside else "inside", "0", "/nonexistent"],
                          env=env or clean_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def lock_record(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def rewrite_record(folder: Path, **changes) -> None:
    """Edit the holder's record in place (as if written from elsewhere)."""
    record = lock_record(folder)
    record.update(changes)
    (folder / LOCK_NAME).write_text(json.dumps(record))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.unit
def test_a_second_process_refuses_in_one_line_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = Holder(run, clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NAME="x"))
    info = first.wait_held()
    assert info["owner"] and read_holder(run)["pid"] == info["pid"]

    second = run_once(run, clean_env(SLURM_JOB_ID="4243"))
    assert second.returncode == 2, second.stderr
    (line,) = error_lines(second.stderr)
    assert second.stderr.strip() == line  # one line, no traceback
    assert f"{run} is in use: training by " in line
    assert f"pid {info['pid']} on host {socket.gethostname()}" in line
    assert "Slurm job 4242" in line and "since 20" in line
    assert "wait for it to end, or use another run folder" in line
    assert lock_record(run)["token"] == info["token"]  # the refusal left the lock alone

    assert first.stop() == (0, "")
    assert os.listdir(run) == []  # lock removed, no temp files left


@pytest.mark.unit
def test_a_data_dir_is_locked_beside_it_while_converting(tmp_path):
    data = tmp_path / "data" / "sample"
    first = Holder(data, what="converting", beside=True)
    first.wait_held()
    assert not data.exists()  # replaced as a whole by convert: the lock is beside it
    assert (data.parent / f".sample{LOCK_NAME}").is_file()
    second = run_once(data, what="converting", beside=True)
    assert second.returncode == 2
    (line,) = error_lines(second.stderr)
    assert "converting by " in line and "or use another data.dir" in line
    assert first.stop()[0] == 0
    assert os.listdir(data.parent) == []


@pytest.mark.unit
def test_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = Holder(run)
    dead = first.wait_held()["pid"]
    first.kill9()  # not reaped yet: a zombie, which has ended all the same
    time.sleep(0.2)
    second = Holder(run)
    info = second.wait_held()
    assert info["took_over"] == dead
    code, err = second.stop()
    assert code == 0 and "taking over the lock of training" in err
    assert f"pid {dead} no longer runs" in err
    first.proc.wait()
    assert os.listdir(run) == []


@pytest.mark.unit
def test_a_reused_pid_is_not_the_holder(tmp_path):
    """A record whose pid now belongs to another process (other start time) is stale; with the
    right start time that process is the holder."""
    run = tmp_path / "run"
    with hold(run):
        record = lock_record(run)
    run.mkdir(exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(record))  # pytest's own pid: alive
    refused = run_once(run)
    assert refused.returncode == 2 and f"pid {os.getpid()} " in refused.stderr
    rewrite_record(run, pid_start=record["pid_start"] + 1)  # the pid's process started later
    taken = run_once(run)
    assert taken.returncode == 0, taken.stderr
    assert f"pid {os.getpid()} no longer runs" in taken.stderr


@pytest.mark.unit
def test_a_requeued_slurm_job_takes_its_lock_back_even_from_another_host(tmp_path):
    run = tmp_path / "run"
    old = Holder(run, clean_env(SLURM_JOB_ID="777"))
    old_info = old.wait_held()
    rewrite_record(run, host="node-b")  # as if the first run were on another node, alive

    other_job = run_once(run, clean_env(SLURM_JOB_ID="778"))
    assert other_job.returncode == 2  # another host cannot be checked: considered alive
    assert "on host node-b, Slurm job 777" in error_lines(other_job.stderr)[0]

    requeued = Holder(run, clean_env(SLURM_JOB_ID="777", SLURM_RESTART_COUNT="1"))
    info = requeued.wait_held()
    assert info["took_over"] == old_info["pid"]
    assert lock_record(run)["token"] == info["token"]
    # the old incarnation ending late must not remove its successor's lock
    code, err = old.stop()
    assert code == 0 and "was taken over by training" in err
    assert lock_record(run)["token"] == info["token"]
    code, err = requeued.stop()
    assert code == 0 and "it belongs to this process's own Slurm job 777" in err
    assert os.listdir(run) == []


def test_array_members_are_distinct_jobs_and_one_allocation_is_not_a_requeue(tmp_path):
    run = tmp_path / "run"
    member = dict(SLURM_JOB_ID="91", SLURM_ARRAY_JOB_ID="90", SLURM_ARRAY_TASK_ID="1")
    first = Holder(run, clean_env(**member))
    first.wait_held()
    assert lock_record(run)["slurm_job"] == "90_1"
    # the same job alive on this host: a second training inside one allocation, not a requeue
    same_here = run_once(run, clean_env(**member))
    assert same_here.returncode == 2 and "Slurm job 90_1" in same_here.stderr
    rewrite_record(run, host="node-b")
    sibling = run_once(run, clean_env(SLURM_JOB_ID="92", SLURM_ARRAY_JOB_ID="90",
                                      SLURM_ARRAY_TASK_ID="2"))
    assert sibling.returncode == 2 and "Slurm job 90_1" in sibling.stderr
    assert run_once(run, clean_env(**member)).returncode == 0  # its own requeue
    first.stop()


@pytest.mark.unit
@pytest.mark.parametrize("scontrol, verdict", [
    ("echo 'JobId=555 JobName=x JobState=COMPLETED Reason=None'", "stale"),
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", "stale"),
    ("echo 'JobId=555 JobName=x JobState=RUNNING Reason=None'", "live"),
    ("exit 1", "live"),  # scontrol cannot tell: alive
])
def test_another_hosts_holder_is_stale_only_if_scontrol_says_its_job_ended(tmp_path, scontrol,
                                                                            verdict):
    run = tmp_path / "run"
    with hold(run):
        record = lock_record(run)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{scontrol}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run.mkdir(exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(dict(record, host="node-b", slurm_job="555")))
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("XRAY_LOCK_SCONTROL")
    proc = run_once(run, env)
    if verdict == "stale":
        assert proc.returncode == 0 and "Slurm job 555 has ended" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 2 and "on host node-b, Slurm job 555" in proc.stderr


def test_two_processes_taking_over_one_stale_lock_never_both_win(tmp_path):
    first = Holder(tmp_path / "seed")
    first.wait_held()
    first.kill9()
    first.proc.wait()
    stale = (tmp_path / "seed" / LOCK_NAME).read_bytes()
    for round_ in range(10):
        run = tmp_path / f"run{round_}"
        run.mkdir()
        (run / LOCK_NAME).write_bytes(stale)
        # both start at once; in half of the rounds both also pause between judging the lock
        # stale and taking it over, so that both have judged it before either acts
        extra = {"START_AT": time.time() + 0.6}
        if round_ % 2 == 0:
            extra["_XRAY_LOCK_PAUSE_BEFORE_TAKEOVER"] = "0.3"
        racers = [Holder(run, clean_env(**extra), hold_s=30) for _ in range(2)]
        results = []
        for racer in racers:
            line = racer.proc.stdout.readline()
            results.append(json.loads(line) if line else None)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, f"round {round_}: {results}"
        loser = racers[results.index(None)]
        assert loser.proc.wait(timeout=30) == 2
        assert f"pid {winners[0]['pid']} on host" in loser.proc.stderr.read()
        assert lock_record(run)["token"] == winners[0]["token"]
        winner = racers[results.index(winners[0])]
        code, err = winner.stop()
        assert code == 0, err
        assert os.listdir(run) == [], f"round {round_}"


@pytest.mark.parametrize("group", [
    {"XRAY_GROUP_ID": "launch:g1"},  # what xray.launch gives its ranks
    {"MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": "18123", "MS_WORKER_NUM": "2"},  # msrun
    {"SLURM_JOB_ID": "900", "SLURM_NTASKS": "2"},  # one Slurm task per rank
])
def test_the_ranks_of_a_group_share_one_lock(tmp_path, group):
    run = tmp_path / "run"

    def rank_env(rank: int, **other):
        env = dict(group, **other)
        if "SLURM_JOB_ID" in env:
            env["SLURM_PROCID"] = str(rank)
        else:
            env.update(MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank))
        return clean_env(**env)

    early = run_once(run, rank_env(1))  # a rank before its lead: no lock yet, creates none
    assert early.returncode == 0 and not (run / LOCK_NAME).exists()
    lead = Holder(run, rank_env(0))
    assert lead.wait_held()["owner"] is True
    peer = Holder(run, rank_env(1))
    assert peer.wait_held()["owner"] is False  # accepts its own group's lock
    assert peer.stop()[0] == 0
    assert lock_record(run)["pid"] == lead.info["pid"]  # a peer's exit leaves the lead's lock

    other = ({"XRAY_GROUP_ID": "launch:g2"} if "XRAY_GROUP_ID" in group else
             {"MS_SCHED_PORT": "18124"} if "MS_SCHED_PORT" in group else {"SLURM_JOB_ID": "901"})
    for rank in (0, 1):  # a rank of another group refuses, lead or not
        refused = run_once(run, rank_env(rank, **other))
        assert refused.returncode == 2 and f"pid {lead.info['pid']} " in refused.stderr
    assert lead.stop()[0] == 0
    assert os.listdir(run) == []


@pytest.mark.unit
def test_nested_holds_in_one_process_share_the_lock(tmp_path):
    run = tmp_path / "run"
    with hold(run) as outer:
        with hold(run) as inner:
            assert inner.record["token"] == outer.record["token"]
        assert (run / LOCK_NAME).is_file()  # the inner exit keeps it
    assert not (run / LOCK_NAME).exists()


@pytest.mark.unit
def test_an_unreadable_lock_is_stale_only_when_old(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text('{"tok')  # a record cut short
    with pytest.raises(Exception, match="unreadable lock record"):
        FolderLock(run).acquire()
    old = time.time() - 3600
    os.utime(run / LOCK_NAME, (old, old))
    with hold(run) as lock:
        assert lock.took_over["corrupt"]


# ----------------------------------------------------------------- the real thing, on Slurm

def _slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo"], capture_output=True).returncode == 0


JOB = r"""#!/bin/bash
#SBATCH --requeue
#SBATCH --time=5
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
cd {repo}
exec {python} -c '
import json, os, sys, time, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from xray.errors import one_line_errors
from xray.run_lock import hold
@one_line_errors
def main():
    with hold(sys.argv[1]) as lock:
        start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        took = lock.took_over and lock.took_over.get("slurm_job")
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps({{"start": start, "took_over": took, "why": lock.took_over_why}}) + "\n")
        time.sleep(300 if start == 0 else 1)
main()' {run} {marks}
"""


@pytest.mark.slurm
@pytest.mark.skipif(not _slurm_up() and os.environ.get("XRAY_REQUIRE_SLURM") != "1",
                    reason="no Slurm cluster (start one with jobs/slurm-up.sh)")
def test_a_requeued_slurm_job_reacquires_its_own_lock(tmp_path):
    """A real job holds the run folder's lock; `scontrol requeue` kills it (SIGTERM: no release)
    and starts it again, which takes its own lock back; another job meanwhile is refused."""
    run, marks = tmp_path / "run", tmp_path / "marks.jsonl"
    script = tmp_path / "job.sh"
    script.write_text(JOB.format(repo=REPO, python=sys.executable, run=run, marks=marks))
    out = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), "--open-mode=append", str(script)],
                         capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    try:
        def marks_lines(n, timeout=120):
            deadline = time.time() + timeout
            while time.time() < deadline:
                lines = marks.read_text().splitlines() if marks.exists() else []
                if len(lines) >= n:
                    return [json.loads(x) for x in lines]
                time.sleep(0.5)
            raise AssertionError(f"job {job}: {n} start(s) expected; logs: "
                                 + " | ".join(p.read_text() for p in tmp_path.glob("*.out")))

        assert marks_lines(1)[0] == {"start": 0, "took_over": None, "why": None}
        assert lock_record(run)["slurm_job"] == job
        intruder = run_once(run, clean_env(SLURM_JOB_ID="999999"))
        assert intruder.returncode == 2 and f"Slurm job {job}" in intruder.stderr

        subprocess.run(["scontrol", "requeue", job], check=True)
        second = marks_lines(2, timeout=240)[1]
        assert second == {"start": 1, "took_over": job,
                          "why": f"it belongs to this process's own Slurm job {job}"}
        deadline = time.time() + 60
        while (run / LOCK_NAME).exists() and time.time() < deadline:
            time.sleep(0.5)
        assert os.listdir(run) == []  # released at the end of the second start
    finally:
        subprocess.run(["scancel", job], capture_output=True)
