"""The soak test: a real sweep on the local Slurm cluster while a seeded fault injector hits its
members, then the checks and the figures (docs/reliability.md).

    python -m jobs.soak                       # make soak; out: outputs/soak/<time>/
    python -m jobs.soak --seed 3 --members 6 --out /tmp/soak
    python -m jobs.soak --publish outputs/soak/<time>/sweep/soak.json   # -> docs/reliability.md

One run (3-6 minutes on 2 cores):
1. the shipped sample is converted; the sweep is `python -m xray.train -m hydra/launcher=slurm_cpu
   ... seed=1,..,N` (72 px, batch 8, 3 epochs of 3 steps, no evaluation), one Slurm array;
2. random.Random(seed) gives five different members one fault each and says when:
   kill-9        `kill -9` of the member's training process mid-epoch (its pid from the run
                 folder's .xray.lock record); Slurm records the job FAILED, nothing requeues it;
   requeue       `scontrol requeue <job>` mid-epoch: SIGTERM (submitit ignores it), SIGKILL
                 KillWait later, then the same job id runs again and resumes from last.ckpt;
   preempt       SIGUSR2 to the training process mid-epoch, which is what submitit's
                 `--signal=USR2@<delay>` and a preemption send: xray's PreemptionGuard saves
                 last.ckpt at the next step, submitit requeues, the job resumes mid-epoch;
   full-disk     the member's folder is a tmpfs big enough for xray's up-front space check
                 (4 x the weights + 20 MB) but not for best + last + last's temp copy (5 x);
   corrupt-ckpt  between epochs the job is requeued and, once its process is gone (Slurm's
                 SIGCONT + SIGTERM, which submitit ignores, then SIGKILL after KillWait) and
                 before it runs again, its last.ckpt is cut to half its size: the product keeps
                 no previous last.ckpt, so the defined outcome is a clean failure whose
                 one-line reason says overwrite=true;
   and the same sweep is launched a second time (same hydra.sweep.dir) while the first runs:
   each of its members must be a no-op (finished), refused (the lock) or train alone.
   While it runs, /proc is scanned for job processes holding files of a member open for
   writing (logs, lock files and Hydra's .hydra/ record aside: see `writers`): never more than
   one per member. A member that ended `ok` is hashed (sha256 of every file
   but logs) as soon as it has ended;
3. the resume: the operator "frees space" (the tmpfs grows) and launches the same sweep again,
   which finishes what the faults left (the corrupted member needs overwrite=true: a rerun
   of it fails again with the same line, on purpose);
4. checks: every member `ok` or `failed` with its reason; the hashes unchanged; no temp files
   (.*.tmp*) and no locks (.xray.lock*) left; `python -m xray.report <sweep> --no-best` ranks
   exactly the `ok` members first; each `ok` member's history has every epoch once.
   Figures: <out>/sweep/soak.json and a table on stdout; exit 1 if a check failed.

Only one soak runs at a time (a lock in the temp folder). The tmpfs needs root; without it the
full-disk fault is skipped (and said so).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from xray.run_lock import pid_alive

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
DOC_JSON = REPO / "docs" / "reliability" / "soak.json"
BEGIN = "<!-- soak figures: begin (written by python -m jobs.soak --publish) -->"
END = "<!-- soak figures: end -->"

FAULTS = ("kill-9", "requeue", "preempt", "full-disk", "corrupt-ckpt")
SECOND = "second-launch"
LABELS = {"kill-9": "kill -9 mid-epoch", "requeue": "scontrol requeue mid-epoch",
          "preempt": "preemption (SIGUSR2) mid-epoch", "full-disk": "full disk (small tmpfs)",
          "corrupt-ckpt": "last.ckpt cut short, then requeue", SECOND: "second launch of the same sweep"}
SPACE_MARGIN = 20_000_000  # = xray.checkpoint.SPACE_MARGIN (not imported: that pulls in MindSpore)
DISK_SLACK = 48 << 20  # the tmpfs: 4 x weights + margin + this (< 5 x weights)
LOG_NAMES = ("slurm.out", "slurm.err")  # links to the job's log files
STEP = re.compile(r"\] - epoch (\d+) step (\d+)/(\d+) ")
TEMP = re.compile(r"^\..*\.tmp")  # .metrics.json.tmp-<pid>, .last.tmp.ckpt, .xray.lock.tmp-...
LOCK = re.compile(r"\.xray\.lock")  # .xray.lock, .xray.lock.takeover, .xray.lock.stale-...
POLL_S = 0.25


def log(message: str) -> None:
    print(f"[soak {datetime.now():%H:%M:%S}] {message}", flush=True)


# ---------------------------------------------------------------- the plan

def plan(seed: int, members: int, epochs: int, steps: int, disk: bool = True) -> dict:
    """Which member gets which fault and when, from random.Random(seed) only: five different
    members; kill/requeue/preemption at (epoch >= 2 -- before the last for the requeue -- and
    a step before the epoch's last), the cut
    last.ckpt after an epoch before the last; the second launch once that many members of the
    first launch ended ok."""
    if members < len(FAULTS):
        raise SystemExit(f"--members {members}: at least {len(FAULTS)} (one per fault)")
    if epochs < 3 or steps < 2:
        raise SystemExit("the faults need >= 3 epochs of >= 2 steps")
    rng = random.Random(seed)
    victims = rng.sample(range(members), len(FAULTS))
    faults = {}
    for kind, member in zip(FAULTS, victims):
        if kind in ("kill-9", "requeue", "preempt"):
            # (a requeued job trains on for Slurm's KillWait: in the last epoch it would just finish)
            last = epochs - 1 if kind == "requeue" else epochs
            faults[member] = {"kind": kind, "epoch": rng.randint(2, last), "step": rng.randint(1, steps - 1)}
        elif kind == "corrupt-ckpt":  # (not after the second-last: KillWait could see the run end)
            faults[member] = {"kind": kind, "after_epoch": rng.randint(1, max(1, epochs - 2))}
        elif disk:
            faults[member] = {"kind": kind}
    return {"seed": seed, "faults": faults, "second_launch_after_ok": rng.randint(1, 2)}


def disk_size(weights: int) -> int:
    """tmpfs bytes that pass xray's up-front check (4 x weights + margin) but cannot hold
    best.ckpt + last.ckpt (weights + momenta) + last's temp copy (5 x weights)."""
    size = 4 * weights + SPACE_MARGIN + DISK_SLACK
    assert size < 5 * weights, "the model is too small for the full-disk fault"
    return (size + (1 << 20) - 1) // (1 << 20) << 20


def task_overrides(data_dir: Path, members: int, epochs: int) -> list[str]:
    return ["data=sample", f"data.dir={data_dir}", "data.image_size=72", "batch_size=8", f"epochs={epochs}",
            "data.workers=1", "train.eval_splits=[]", "train.cam_images=0", "train.log_every=1",
            "device_target=CPU", "seed=" + ",".join(str(s) for s in range(1, members + 1))]


def sweep_command(data_dir: Path, sweep: Path, members: int, epochs: int) -> list[str]:
    """The sweep, as a user launches it (and launches it again to resume)."""
    return [sys.executable, "-m", "xray.train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=30", "hydra.launcher.array_parallelism=3",
            f"hydra.sweep.dir={sweep}",
            *task_overrides(data_dir, members, epochs)]


def member_names(data_dir: Path, members: int, epochs: int) -> list[str]:
    """The members' folder names, as Hydra will make them (the pipeline's own expansion)."""
    from jobs.pipeline import compose_train, expand_sweep
    from xray import folder_name

    return [f"{i}_{folder_name(compose_train(m).hydra.job.override_dirname)}"
            for i, m in enumerate(expand_sweep(task_overrides(data_dir, members, epochs)))]


def weights_bytes(data_dir: Path, epochs: int) -> int:
    """The size of the members' best.ckpt (their network's parameters), in a child process
    (MindSpore stays out of this one)."""
    code = ("import sys, json\nfrom jobs.pipeline import compose_train\nfrom xray.registry import create_model\n"
            "from xray.checkpoint import checkpoint_bytes\nfrom xray.labels import task_classes\n"
            "cfg = compose_train(json.loads(sys.argv[1]))\n"
            "print(checkpoint_bytes(create_model(cfg.model, cfg.data.image_size, len(task_classes(cfg.task.name)))))")
    overrides = [o for o in task_overrides(data_dir, 1, epochs)]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


# ---------------------------------------------------------------- Slurm and processes

def sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def squeue(array: str) -> dict[str, str]:
    """{<array>_<task>: state} of an array's tasks still queued or running."""
    out = sh("squeue", "-h", "-r", "-j", array, "-o", "%i|%T")
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line) if out.returncode == 0 else {}


def sacct_history(array: str) -> dict[str, list[str]]:
    """{<array>_<task>: [state of each run]} (REQUEUED rows included)."""
    out = sh("sacct", "-n", "-P", "-X", "-D", "-j", array, "--format=JobID,State")
    rows: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        rows.setdefault(job, []).append(state.split()[0] if state else "?")
    return rows


def read_lock(folder: Path) -> Optional[dict]:
    try:
        record = json.loads((folder / ".xray.lock").read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def live_holder(folder: Path) -> Optional[dict]:
    """The lock record of the process training in `folder`, if it runs (on this host)."""
    record = read_lock(folder)
    if record and record.get("pid") and pid_alive(int(record["pid"]), None):
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
            if Path(f"/proc/{record['pid']}/cmdline").exists() else ""
        if "submitit" in cmdline or "xray" in cmdline:
            return record
    return None


def writers(folders: dict[int, Path]) -> dict[int, set]:
    """{member: pids of the job processes that hold one of its files open for writing}. Not
    counted: its logs; its lock's own files (taking the lock is how a second start finds out);
    Hydra's `.hydra/` record, which every start writes before xray runs and which a refused or
    no-op start restores (the hashes check that). A child of such a process (a forked worker)
    counts as its parent: one writer. A second trainer holds the event file open for writing
    for its whole run, so it cannot go unseen."""
    prefixes = {num: str(path.resolve()) + "/" for num, path in folders.items()}
    found: dict[int, dict[int, int]] = {}  # member -> {pid: ppid}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if b"submitit" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            fds = os.listdir(f"/proc/{pid}/fd")
        except (OSError, ValueError, IndexError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not any(target.startswith(prefix) for prefix in prefixes.values()):
                    continue
                flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            except (OSError, ValueError, IndexError):
                continue
            if flags & 0o3 == 0 or is_log(Path(target)) or LOCK.search(Path(target).name):
                continue
            for num, prefix in prefixes.items():
                if target.startswith(prefix) and not target[len(prefix):].startswith(".hydra/"):
                    found.setdefault(num, {})[pid] = ppid
    return {num: {p for p, parent in pids.items() if parent not in pids} for num, pids in found.items()}


# ---------------------------------------------------------------- files

def is_log(path: Path) -> bool:
    return path.suffix == ".log" or path.name in LOG_NAMES


def hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a member but its logs (and log links) and its
    lock's files (the "no locks left" check covers those)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if is_log(path) or path.is_symlink() or LOCK.search(name):
                continue  # lock files come and go while a process releases: checked as leftovers
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(path.relative_to(folder))] = digest.hexdigest()
    return out


def log_links(folder: Path) -> dict[str, str]:
    return {name: os.readlink(folder / name) for name in LOG_NAMES if (folder / name).is_symlink()}


def report_statuses(sweep: Path, out: Path) -> tuple[int, list[tuple[str, str]]]:
    """(exit code, [(member, status)] in rank order) of `python -m xray.report <sweep> --no-best`."""
    proc = subprocess.run([sys.executable, "-m", "xray.report", str(sweep), "--no-best"], cwd=out,
                          capture_output=True, text=True)
    (out / "report.log").open("a").write(proc.stdout + proc.stderr)
    if proc.returncode or not (sweep / "report.csv").exists():
        return proc.returncode or 1, []
    with open(sweep / "report.csv") as f:
        return 0, [(row["member"], row["status"]) for row in csv.DictReader(f)]


def leftovers(sweep: Path) -> tuple[list[str], list[str]]:
    """(temp files, lock files) anywhere in the sweep but submitit's own folder."""
    temps, locks = [], []
    for root, dirs, files in os.walk(sweep):
        dirs[:] = [d for d in dirs if d != ".submitit"]
        for name in files + [d for d in dirs if TEMP.match(d)]:
            rel = str((Path(root) / name).relative_to(sweep))
            if LOCK.search(name):
                locks.append(rel)
            elif TEMP.match(name):
                temps.append(rel)
    return sorted(temps), sorted(locks)


def read_metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def history_epochs(folder: Path) -> list[int]:
    try:
        return [json.loads(line)["epoch"] for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


def job_outcome(text: str) -> str:
    """What one array task did to its member, from its submitit log (stdout + stderr)."""
    found = []
    if "is in use:" in text:
        found.append("refused")
    if "already finished" in text:
        found.append("no-op")
    if " - resume: " in text or "] - train: " in text:
        found.append("trained")
    if "error: " in text and "is in use:" not in text:
        found.append("failed")
    return "+".join(found) or "nothing"


# ---------------------------------------------------------------- the soak

@dataclass
class Member:
    num: int
    name: str
    path: Path
    fault: Optional[dict] = None
    injected: Optional[dict] = None  # what was done to it, when
    due: bool = False  # its fault's moment has come (injected as soon as its trainer is seen)
    pending: Optional[dict] = None  # corrupt-ckpt: requeued, waiting for its process to end
    offset: int = 0  # of train.log, read so far
    finished_hash: Optional[dict] = None  # at the end of its training (status ok)
    finished_in: Optional[str] = None  # "faults" | "resume"
    finished_links: dict = field(default_factory=dict)  # slurm.out/err -> the log of the job that trained it
    max_writers: int = 0
    after_faults: dict = field(default_factory=dict)


class Soak:
    def __init__(self, out: Path, seed: int, members: int, epochs: int, timeout_min: float):
        self.out, self.seed, self.n, self.epochs = out, seed, members, epochs
        self.sweep, self.data = out / "sweep", out / "data"
        self.deadline = time.time() + timeout_min * 60
        self.start = time.time()
        self.events: list[dict] = []
        self.clients: list[subprocess.Popen] = []
        self.arrays: dict[str, str] = {}  # launch name -> Slurm array job id
        self.mounted: Optional[Path] = None
        self.disk_bytes = 0
        self.second_launched = False

    # -- helpers

    def event(self, member: Optional[int], what: str) -> None:
        self.events.append({"t_s": round(time.time() - self.start, 1), "member": member, "event": what})
        log(f"{'' if member is None else f'member {member}: '}{what}")

    def launch(self, name: str) -> None:
        known = self.array_ids()
        logf = open(self.out / f"{name}.log", "w")
        self.clients.append(subprocess.Popen(self.command, cwd=self.out, stdout=logf, stderr=subprocess.STDOUT,
                                             start_new_session=True))
        deadline = time.time() + 120
        while time.time() < deadline:
            new = self.array_ids() - known
            if new:
                self.arrays[name] = new.pop()
                self.event(None, f"{name}: sweep submitted as array {self.arrays[name]}")
                return
            if self.clients[-1].poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit(f"{name}: the sweep was not submitted; see {self.out / (name + '.log')}")

    def array_ids(self) -> set[str]:
        folder = self.sweep / ".submitit"
        return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()

    def queued(self, launches) -> dict[str, str]:
        jobs = {}
        for name in launches:
            jobs.update(squeue(self.arrays[name]))
        return jobs

    # -- setup

    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        log(f"soak folder {self.out} (seed {self.seed}, {self.n} members, {self.epochs} epochs)")
        subprocess.run([sys.executable, "-m", "xray.convert", "data=sample", f"data.dir={self.data}",
                        f"hydra.run.dir={self.out / 'convert'}"], cwd=self.out, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest = json.loads((self.data / "manifest.json").read_text())
        self.steps = manifest["splits"]["train"]["images"] // 8
        self.command = sweep_command(self.data, self.sweep, self.n, self.epochs)
        names = member_names(self.data, self.n, self.epochs)
        can_mount = os.geteuid() == 0 and shutil.which("mount") is not None
        self.plan = plan(self.seed, self.n, self.epochs, self.steps, disk=can_mount)
        if not can_mount:
            log("not root: the full-disk fault (a tmpfs) is skipped")
        self.members = [Member(i, name, self.sweep / name, self.plan["faults"].get(i)) for i, name in enumerate(names)]
        for m in self.members:
            if m.fault:
                log(f"plan: member {m.num} ({m.name}): {m.fault}")
        log(f"plan: second launch once {self.plan['second_launch_after_ok']} member(s) ended ok")
        disk = next((m for m in self.members if m.fault and m.fault["kind"] == "full-disk"), None)
        if disk is not None:
            weights = weights_bytes(self.data, self.epochs)
            self.disk_bytes = disk_size(weights)
            disk.path.mkdir(parents=True)
            sh("mount", "-t", "tmpfs", "-o", f"size={self.disk_bytes}", "tmpfs", str(disk.path), timeout=30).check_returncode()
            self.mounted = disk.path
            disk.injected = {"t_s": 0.0, "what": f"its folder is a {self.disk_bytes >> 20} MiB tmpfs (weights "
                                                 f"{weights / 1e6:.0f} MB: up-front check needs 4x + 20 MB, the "
                                                 f"checkpoints peak at 5x)"}
            self.event(disk.num, f"full-disk: {disk.injected['what']}")

    # -- faults

    def poll_faults(self) -> None:
        for m in self.members:
            lines = self.new_log_lines(m)
            if m.pending and not pid_alive(m.pending["pid"], None):
                self.cut_last_ckpt(m)
            if not m.fault or m.injected or m.pending:
                continue
            kind = m.fault["kind"]
            if kind in ("kill-9", "requeue", "preempt"):
                m.due = m.due or any((int(e), int(s)) >= (m.fault["epoch"], m.fault["step"]) and int(s) < int(t)
                          for e, s, t in (STEP.search(x).groups() for x in lines if STEP.search(x)))
            elif kind == "corrupt-ckpt":
                m.due = (len(history_epochs(m.path)) >= m.fault["after_epoch"] and (m.path / "checkpoints" / "last.ckpt").exists()
                       and read_metrics(m.path).get("status") != "ok")
            else:
                continue
            holder = live_holder(m.path) if m.due else None
            if holder:
                self.inject(m, kind, holder)

    def new_log_lines(self, m: Member) -> list[str]:
        path = m.path / "train.log"
        try:
            with open(path, "rb") as f:
                f.seek(m.offset)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n") + 1
        m.offset += cut
        return data[:cut].decode(errors="replace").splitlines()

    def inject(self, m: Member, kind: str, holder: dict) -> None:
        pid, job = int(holder["pid"]), str(holder.get("slurm_job"))
        if kind == "kill-9":
            os.kill(pid, signal.SIGKILL)
            what = f"kill -9 {pid} (job {job})"
        elif kind == "preempt":
            os.kill(pid, signal.SIGUSR2)
            what = f"kill -USR2 {pid} (job {job})"
        elif kind == "requeue":
            out = sh("scontrol", "requeue", job)
            what = f"scontrol requeue {job}: rc {out.returncode} {out.stderr.strip()}".strip()
        else:  # corrupt-ckpt: requeue between epochs; cut last.ckpt once the process is gone
            out = sh("scontrol", "requeue", job)
            out.check_returncode()
            m.pending = {"pid": pid, "job": job, "epochs": len(history_epochs(m.path))}
            self.event(m.num, f"{kind}: after epoch {m.pending['epochs']}: scontrol requeue {job}; "
                              f"cutting last.ckpt once pid {pid} has ended")
            return
        m.injected = {"t_s": round(time.time() - self.start, 1), "what": what}
        self.event(m.num, f"{kind}: {what}")

    def cut_last_ckpt(self, m: Member) -> None:
        """The requeued job's process has ended and it has not run again: damage last.ckpt."""
        last = m.path / "checkpoints" / "last.ckpt"
        pending, m.pending = m.pending, None
        if not last.exists():
            m.injected = {"t_s": round(time.time() - self.start, 1), "what": "missed: no last.ckpt left"}
            self.event(m.num, "corrupt-ckpt: missed (no last.ckpt once the process had ended)")
            return
        size, mode = last.stat().st_size, last.stat().st_mode
        os.chmod(last, mode | 0o200)  # (MindSpore writes checkpoints read-only)
        os.truncate(last, size // 2)
        os.chmod(last, mode)
        what = (f"scontrol requeue {pending['job']} after epoch {pending['epochs']}; once pid {pending['pid']} "
                f"had ended, last.ckpt cut {size} -> {size // 2} bytes")
        m.injected = {"t_s": round(time.time() - self.start, 1), "what": what}
        self.event(m.num, f"corrupt-ckpt: {what}")

    # -- watching

    def watch(self, phase: str, launches: list[str]) -> None:
        """Until every job of `launches` has left the queue (and the second launch is out, in
        the fault phase): inject faults, start the second launch, count writers, hash members
        as they end ok."""
        quiet_since = None
        while True:
            if time.time() > self.deadline:
                raise SystemExit(f"soak: timed out in the {phase} phase; jobs {self.queued(self.arrays)}")
            if phase == "faults":
                self.poll_faults()
                ok = sum(read_metrics(m.path).get("status") == "ok" for m in self.members)
                if not self.second_launched and ok >= self.plan["second_launch_after_ok"]:
                    self.second_launched = True
                    self.event(None, f"{SECOND}: {ok} member(s) ended ok, launching the same sweep again")
                    self.launch("launch2")
                    launches = [*launches, "launch2"]
            for num, pids in writers({m.num: m.path for m in self.members}).items():
                member = self.members[num]
                if len(pids) > member.max_writers:
                    member.max_writers = len(pids)
                    if len(pids) > 1:
                        self.event(num, f"TWO WRITERS: pids {sorted(pids)}")
            for m in self.members:
                if m.finished_hash is None and read_metrics(m.path).get("status") == "ok" \
                        and not (m.path / ".xray.lock").exists():
                    m.finished_hash, m.finished_in = hashes(m.path), phase
                    m.finished_links = log_links(m.path)
                    self.event(m.num, f"ended ok ({len(m.finished_hash)} files hashed)")
            if self.queued(launches):
                quiet_since = None
            else:
                quiet_since = quiet_since or time.time()
                clients_done = all(c.poll() is not None for c in self.clients)
                if phase == "faults" and not self.second_launched:
                    self.second_launched = True
                    self.event(None, f"{SECOND}: the first launch ended before its trigger; launching now")
                    self.launch("launch2")
                    launches = [*launches, "launch2"]
                    continue
                # a client waits for sacct to see its jobs end; one that hangs is ended after 90 s
                if clients_done or time.time() - quiet_since > 90:
                    for c in self.clients:
                        if c.poll() is None:
                            os.killpg(c.pid, signal.SIGTERM)
                            c.wait(30)
                    return
            time.sleep(POLL_S)

    def outcomes(self, launch: str) -> dict[int, str]:
        """{member: what that launch's task did} from its submitit logs."""
        out = {}
        array = self.arrays.get(launch)
        for m in self.members:
            folder = self.sweep / ".submitit" / f"{array}_{m.num}"
            text = "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*"))) if folder.is_dir() else ""
            out[m.num] = job_outcome(text)
        return out

    # -- the whole run

    def run(self) -> dict:
        self.prepare()
        self.launch("launch1")
        self.watch("faults", ["launch1"])
        _, shown = report_statuses(self.sweep, self.out)
        for m in self.members:
            metrics = read_metrics(m.path)
            m.after_faults = {"status": metrics.get("status", "unfinished"), "error": metrics.get("error"),
                              "report": dict(shown).get(m.name), "lock_left": (m.path / ".xray.lock").exists()}
        summary = ", ".join(f"{m.num}:{m.after_faults['status']}" for m in self.members)
        self.event(None, f"faults phase over: {summary}")
        if self.mounted is not None:  # the operator frees space
            grown = self.disk_bytes + (self.disk_bytes // 2)
            sh("mount", "-o", f"remount,size={grown}", str(self.mounted)).check_returncode()
            self.event(None, f"resume: the full disk grows to {grown >> 20} MiB (space freed)")
        self.event(None, "resume: launching the same sweep again")
        self.launch("resume")
        self.watch("resume", ["resume"])
        return self.check()

    def check(self) -> dict:
        finals = {m.num: read_metrics(m.path) for m in self.members}
        code, ranked = report_statuses(self.sweep, self.out)
        ok = {m.name for m in self.members if finals[m.num].get("status") == "ok"}
        report_ok = (code == 0 and {n for n, _ in ranked[:len(ok)]} == ok
                     and {n for n, s in ranked if s == "ok"} == ok and len(ranked) == len(self.members))
        changed, lost, checked = [], [], 0
        for m in self.members:
            if m.finished_hash is None:
                continue
            now = hashes(m.path)
            checked += len(m.finished_hash)
            lost += [f"{m.name}/{p}" for p in m.finished_hash if p not in now]
            changed += [f"{m.name}/{p}" for p, h in m.finished_hash.items() if p in now and now[p] != h]
        temps, locks = leftovers(self.sweep)
        second = self.outcomes("launch2")
        resume = self.outcomes("resume")
        faulted = [m for m in self.members if m.injected and not m.injected["what"].startswith("missed")]
        recovered = [m for m in faulted if finals[m.num].get("status") == "ok"]
        by_requeue = [m for m in recovered if m.after_faults["status"] == "ok"]
        failed = {m.name: finals[m.num].get("error") for m in self.members if finals[m.num].get("status") == "failed"}
        histories = {m.name: history_epochs(m.path) for m in self.members if finals[m.num].get("status") == "ok"}
        slurm = {name: sacct_history(array) for name, array in self.arrays.items()}
        repointed = [m.name for m in self.members if m.finished_links and log_links(m.path) != m.finished_links]

        def counts(values) -> dict:
            values = list(values)
            return {k: values.count(k) for k in sorted(set(values))}

        figures = {
            "members": self.n,
            "faults_injected": len(faulted) + (1 if self.second_launched else 0),
            "faults_by_kind": {**{k: sum(m.fault["kind"] == k for m in faulted) for k in FAULTS},
                               SECOND: int(self.second_launched)},
            "after_faults": counts(m.after_faults["status"] for m in self.members),
            "members_faulted": len(faulted),
            "members_recovered": len(recovered),
            "recovered_by_requeue": len(by_requeue),
            "recovered_by_resume": len(recovered) - len(by_requeue),
            "members_ok": len(ok),
            "members_failed": len(failed),
            "failed_reasons": failed,
            "second_launch": counts(second.values()),
            "max_writers_per_member": max(m.max_writers for m in self.members),
            "files_checked": checked,
            "files_changed": len(changed),
            "files_lost": len(lost),
            "temp_files_left": len(temps),
            "locks_left": len(locks),
            "log_links_repointed": len(repointed),
            "report_ranks_ok_members": report_ok,
            "wall_time_s": round(time.time() - self.start),
        }
        checks = {
            "every member ok or failed with a reason": all(
                f.get("status") == "ok" or (f.get("status") == "failed" and f.get("error")) for f in finals.values()),
            "every fault injected": len(faulted) == len(self.plan["faults"]) and self.second_launched,
            "never two writers": figures["max_writers_per_member"] <= 1,
            "finished members unchanged": not changed and not lost,
            "no temp files left": not temps,
            "no locks left": not locks,
            "report ranks exactly the ok members": report_ok,
            "ok members trained every epoch once": all(h == list(range(1, self.epochs + 1)) for h in histories.values()),
            "only the corrupted member failed": set(failed) <= {m.name for m in faulted if m.fault["kind"] == "corrupt-ckpt"},
        }
        return {
            "soak": 1, "out": str(self.out), "seed": self.seed, "epochs": self.epochs, "steps_per_epoch": self.steps,
            "command": " ".join(self.command[1:]).replace(str(self.out), "<out>"),
            "figures": figures, "checks": checks, "passed": all(checks.values()),
            "members": [{"num": m.num, "name": m.name, "fault": m.fault, "injected": m.injected,
                         "after_faults": m.after_faults, "final": finals[m.num].get("status", "unfinished"),
                         "error": finals[m.num].get("error"), "finished_in": m.finished_in,
                         "second_launch": second.get(m.num), "resume": resume.get(m.num),
                         "epochs": histories.get(m.name)} for m in self.members],
            "files_changed": changed, "files_lost": lost, "temp_files": temps, "locks": locks,
            "log_links_repointed": repointed,
            "report": [{"member": n, "status": s} for n, s in ranked], "slurm": slurm, "events": self.events,
        }

    def cleanup(self) -> None:
        """End our clients and jobs if we stop early; move the tmpfs member onto the disk."""
        for c in self.clients:
            if c.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(c.pid, signal.SIGTERM)
        for name, array in self.arrays.items():
            if squeue(array):
                sh("scancel", array)
        if self.mounted is not None:
            keep = self.mounted.with_name(f".{self.mounted.name}.off-tmpfs")
            shutil.copytree(self.mounted, keep, symlinks=True)
            if sh("umount", str(self.mounted)).returncode == 0:
                self.mounted.rmdir()
                keep.rename(self.mounted)
            else:
                log(f"could not unmount {self.mounted}; its copy is {keep}")


# ---------------------------------------------------------------- figures

def figure_rows(soak: dict) -> list[tuple[str, str]]:
    """The table printed at the end of a run and shown in docs/reliability.md."""
    f = soak["figures"]
    kinds = ", ".join(f"{LABELS[k]} {n}" for k, n in f["faults_by_kind"].items())
    rows = [
        ("members", str(f["members"])),
        ("faults injected", f"{f['faults_injected']} ({kinds})"),
        ("after the faults, before the resume", ", ".join(f"{n} {s}" for s, n in f["after_faults"].items())),
        ("members recovered", f"{f['members_recovered']} of {f['members_faulted']} faulted "
                              f"({f['recovered_by_requeue']} by a requeue or the second launch, "
                              f"{f['recovered_by_resume']} by the resume)"),
        ("members failed", str(f["members_failed"])),
    ]
    for name, reason in f["failed_reasons"].items():
        rows.append((f"member {name.split('_', 1)[0]} failed", short_reason(reason, name)))
    rows += [
        ("second launch, per member", ", ".join(f"{n} {s}" for s, n in f["second_launch"].items())),
        ("most writers of one member at once", str(f["max_writers_per_member"])),
        ("files of ended members checked", str(f["files_checked"])),
        ("files changed", str(f["files_changed"])),
        ("files lost", str(f["files_lost"])),
        ("temp files left", str(f["temp_files_left"])),
        ("locks left", str(f["locks_left"])),
        ("log links (slurm.out/err) re-pointed after the end", str(f["log_links_repointed"])),
        ("report ranks exactly the ok members", "yes" if f["report_ranks_ok_members"] else "NO"),
        ("wall time", f"{f['wall_time_s'] / 60:.1f} min"),
        ("checks passed", f"{sum(soak['checks'].values())} of {len(soak['checks'])}"),
    ]
    return rows


def short_reason(reason: str, member: str) -> str:
    """A failure's one line with the member's long folder path shortened to <member>."""
    reason = re.sub(r"\S*/" + re.escape(member), "<member>", reason or "")
    return re.sub(r"\(Failed to read the checkpoint file [^)]*\)", "(Failed to read the checkpoint file ...)", reason)


def text_table(soak: dict) -> str:
    rows = figure_rows(soak)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "member  fault / after the faults / second launch / resume / final"]
    lines += [f"{r[0]:<6}  {' / '.join(r[1:])}" for r in member_rows(soak)]
    lines += ["", "checks:"] + [f"  {'ok    ' if v else 'FAILED'} {k}" for k, v in soak["checks"].items()]
    return "\n".join(lines) + "\n"


def fault_text(fault: Optional[dict]) -> str:
    if not fault:
        return "-"
    when = (f" at epoch {fault['epoch']} step {fault['step']}" if "epoch" in fault
            else f" after epoch {fault['after_epoch']}" if "after_epoch" in fault else "")
    return fault["kind"] + when


def member_rows(soak: dict) -> list[list[str]]:
    """One row per member: its fault, its status after the faults, what the second launch and
    the resume did to it, how it ended."""
    return [[str(m["num"]), fault_text(m["fault"]) + ("" if m["injected"] or not m["fault"] else " (not injected)"),
             m["after_faults"]["status"], m["second_launch"] or "-", m["resume"] or "-", m["final"]]
            for m in soak["members"]]


def markdown_table(soak: dict) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| figure | value |", "| --- | --- |"] + [f"| {cell(k)} | {cell(v)} |" for k, v in figure_rows(soak)]
    lines += ["", "| member | fault | after the faults | second launch | resume | final |",
              "| --- | --- | --- | --- | --- | --- |"] + ["| " + " | ".join(map(cell, r)) + " |" for r in member_rows(soak)]
    return "\n".join(lines) + "\n"


def published(soak: dict) -> dict:
    """The copy kept in docs/reliability/soak.json: no events, no Slurm ids, no local paths."""
    text = json.dumps({k: v for k, v in soak.items() if k not in ("events", "slurm", "out")})
    return json.loads(text.replace(soak["out"], "<out>")) if soak.get("out") else json.loads(text)


def publish(soak_json: Path) -> None:
    soak = json.loads(Path(soak_json).read_text())
    DOC_JSON.parent.mkdir(parents=True, exist_ok=True)
    DOC_JSON.write_text(json.dumps(published(soak), indent=1) + "\n")
    page = DOC.read_text()
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{markdown_table(soak)}{END}{tail}")
    print(f"wrote {DOC_JSON.relative_to(REPO)} and the table of {DOC.relative_to(REPO)}")


# ---------------------------------------------------------------- main

@contextlib.contextmanager
def only_soak():
    """One soak at a time on this machine (they share 2 cores and one Slurm node)."""
    from xray.run_lock import FolderLock

    lock = FolderLock(Path(tempfile.gettempdir()) / "xray-soak", "soak", rank=0,
                      alternative="no second soak (wait for the other one)")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="soak folder (default outputs/soak/<time>)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timeout-min", type=float, default=25, help="give up after this long")
    parser.add_argument("--publish", type=Path, metavar="SOAK_JSON",
                        help="copy a run's soak.json to docs/reliability/ and its figures into docs/reliability.md")
    args = parser.parse_args(argv)
    if args.publish:
        publish(args.publish)
        return 0
    if shutil.which("sinfo") is None or sh("sinfo").returncode:
        print("error: no Slurm cluster answers (start one: make slurm-up, as root)", file=sys.stderr)
        return 2
    if sh("sacct", "-n", "-X", "-S", "now").returncode:
        print("error: sacct does not answer (slurmdbd/MariaDB down?): a killed job would hang its sweep's "
              "client; restart the cluster (make slurm-up)", file=sys.stderr)
        return 2
    out = (args.out or REPO / "outputs" / "soak" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    with only_soak():
        soak = Soak(out, args.seed, args.members, args.epochs, args.timeout_min)
        try:
            result = soak.run()
        finally:
            soak.cleanup()
    (soak.sweep / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(text_table(result), end="")
    print(f"\n{soak.sweep / 'soak.json'}  ({'passed' if result['passed'] else 'FAILED'})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
