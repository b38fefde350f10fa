"""One writer per folder: a lock held for a whole job on a training run folder (or, while
converting, on a data.dir), safe on a shared NFS file system.

    with hold(run_dir, what="training"):                 # lock file <run_dir>/.xray.lock
        ...
    with hold(data_dir, what="converting", beside=True): # <parent>/.<name>.xray.lock (the folder
        ...                                              #  itself is replaced atomically)

A second writer refuses with an XrayError (one line, exit 2 under `one_line_errors`) naming
the folder and the holder (user, pid, host, Slurm job, since when, what it does) and what to do.

How it works (no flock/fcntl: unreliable over NFS):
- The holder's record (JSON) is written to a unique temp file, fsynced, and hard-linked into
  place (`os.link` fails if the lock exists; the temp's link count tells whether a link whose
  reply NFS lost was made). The directory is fsynced after every change.
- A lock whose holder is gone is taken over, with a warning: holder on this host (same boot,
  same pid namespace) whose pid is not alive, or alive but with another start time (pid
  reused); a holder of the same Slurm job (a requeued job, perhaps on another node: job id
  <array job>_<task> for array members, as submitit and squeue name them) or of the same
  launcher group (XRAY_GROUP_ID) -- unless that holder is provably alive on this host (two
  trainings inside one allocation); a holder on another host whose Slurm job `scontrol`
  reports ended (optional: skipped when scontrol is missing, slow or XRAY_LOCK_SCONTROL=0).
  Anything else on another host counts as alive: the message says which file to delete.
- Takeover is race-free: it happens under a short-lived guard file (`<lock>.takeover`, made
  the same way), and only if the lock still holds the very record judged stale; so of two
  processes taking over one stale lock exactly one wins, the other then meets a live holder.
- A data-parallel group holds one lock: rank 0 creates and removes it; the other ranks only
  check that no other live writer holds it, and accept their own group's lock. The group is
  the Slurm job, else XRAY_GROUP_ID (which a launcher sets to one value for all its ranks:
  `env[GROUP_ENV] = new_group_id()`), else submitit's local job id, else the MindSpore
  scheduler address of the ranks (MS_SCHED_HOST:MS_SCHED_PORT, as msrun sets it).
- Re-entrant within a process (a nested hold of the same folder shares the lock).
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

from xray.errors import XrayError

log = logging.getLogger(__name__)

LOCK_NAME = ".xray.lock"  # inside the folder; beside it: .<folder name>.xray.lock
GROUP_ENV = "XRAY_GROUP_ID"  # one value for all ranks of a launcher's group
SCONTROL_ENV = "XRAY_LOCK_SCONTROL"  # "0": never ask scontrol whether a holder's job ended
SCONTROL_TIMEOUT_S = 10.0
GUARD_STALE_S = 30.0  # a takeover guard older than this is a leftover of a killed process
LEFTOVER_S = 60.0  # temp files of a lock older than this are leftovers of killed processes
# test-only: seconds to sleep between judging a lock stale and taking it over (widens the race)
PAUSE_ENV = "_XRAY_LOCK_PAUSE_BEFORE_TAKEOVER"

# Slurm job states after which none of the job's processes runs any more
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
               "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}

_held: dict[str, dict] = {}  # lock path -> {"pid", "count", "owner", "record"} of this process
_held_mutex = threading.Lock()


# ---------------------------------------------------------------- who we are

def slurm_job() -> Optional[str]:
    """This process's Slurm job as squeue/sacct/submitit name it (<array job>_<task> for an
    array member), None outside Slurm. It survives a requeue."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def group_id() -> Optional[str]:
    """What all ranks of one data-parallel group launched outside Slurm share (see the module
    docstring); None for a process of its own."""
    if os.environ.get(GROUP_ENV):
        return os.environ[GROUP_ENV]
    host = socket.gethostname()
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"submitit-local:{host}:{os.environ['SUBMITIT_LOCAL_JOB_ID']}"
    if os.environ.get("MS_ROLE") and os.environ.get("MS_SCHED_PORT"):
        sched = os.environ.get("MS_SCHED_HOST", "")
        local = sched.startswith("127.") or sched in ("", "localhost", "::1")
        return f"ms:{host + ':' if local else ''}{sched}:{os.environ['MS_SCHED_PORT']}"
    return None


def new_group_id() -> str:
    """A fresh value for GROUP_ENV, for a launcher to give all the ranks it starts."""
    return f"launch:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def launched_rank() -> int:
    from xray.distributed import launched_rank as rank

    return rank()


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks after boot) of a process, from /proc; None if unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_ns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _record(what: str, folder: Path, rank: int) -> dict:
    pid = os.getpid()
    stat = _proc_stat(pid)
    now = time.time()
    ranks = os.environ.get("MS_WORKER_NUM") if os.environ.get("MS_ROLE") else os.environ.get("SLURM_NTASKS")
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (containers)
        user = str(os.getuid())
    return {
        "xray_lock": 1,
        "token": uuid.uuid4().hex,
        "what": what,
        "folder": str(folder),
        "user": user,
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_ns(),
        "pid": pid,
        "pid_start": stat[1] if stat else None,
        "since": datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "since_unix": round(now, 3),
        "slurm_job": slurm_job(),
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME") or None,
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "group": group_id(),
        "rank": rank,
        "ranks": int(ranks) if ranks and ranks.isdigit() else 1,
        "command": " ".join(sys.argv)[:300],
    }


def describe(holder: dict) -> str:
    """'training by alice, pid 4242 on host node03, Slurm job 5678_2, since 2025-...'"""
    if holder.get("corrupt"):
        return f"an unreadable lock record ({holder['corrupt']})"
    parts = [f"{holder.get('what') or 'a job'} by {holder.get('user', '?')}, pid {holder.get('pid', '?')} "
             f"on host {holder.get('host', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"Slurm job {holder['slurm_job']}")
    elif holder.get("group"):
        parts.append(f"group {holder['group']}")
    if (holder.get("ranks") or 1) > 1:
        parts.append(f"{holder['ranks']} ranks")
    parts.append(f"since {holder.get('since', '?')}")
    return ", ".join(parts)


# ---------------------------------------------------------------- files

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _create(path: Path, record: dict) -> bool:
    """Create `path` holding `record` if it does not exist; True if this call created it."""
    data = (json.dumps(record, indent=1) + "\n").encode()
    tmp = path.with_name(f"{path.name}.tmp-{record['token']}-{random.getrandbits(32):08x}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            return _create_without_links(path, data)  # a file system without hard links
        # over NFS a link whose reply was lost reports EEXIST (the retry met our own link):
        # the temp file's link count says what happened
        created = os.stat(tmp).st_nlink == 2
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if created:
        _fsync_dir(path.parent)
    return created


def _create_without_links(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return True


def _read(path: Path) -> tuple[Optional[bytes], Optional[dict]]:
    """(raw bytes, record) of a lock file; (None, None) when there is none. A record that does
    not parse (a half-written file of a file system without links) is retried for a moment,
    then reported as {"corrupt": why, "age_s": ...}."""
    for _ in range(5):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and record.get("token"):
                return raw, record
            why = "no holder in it"
        except ValueError as e:
            why = f"not JSON: {e}"
        time.sleep(0.1)
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return None, None
    return raw, {"corrupt": why, "age_s": age}


def _remove_if(path: Path, raw: bytes, trash_tag: str) -> bool:
    """Remove `path` if it still holds `raw`; True if this call removed it. The caller holds
    the guard (or `path` is the guard itself): rename first, then verify, put back if not."""
    trash = path.with_name(f"{path.name}.stale-{trash_tag}-{random.getrandbits(32):08x}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    try:
        with open(trash, "rb") as f:
            moved = f.read()
    except OSError:
        moved = None
    if moved != raw:  # another process's fresh file: put it back (never over a newer one)
        with contextlib.suppress(OSError):
            os.link(trash, path)
        with contextlib.suppress(OSError):
            os.unlink(trash)
        _fsync_dir(path.parent)
        return False
    os.unlink(trash)
    _fsync_dir(path.parent)
    return True


def _remove_leftovers(path: Path) -> None:
    """Temp and renamed files of this lock that killed processes left behind."""
    prefix = f"{path.name}."
    now = time.time()
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and (".tmp-" in name or ".stale-" in name):
            leftover = path.parent / name
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > LEFTOVER_S:
                    leftover.unlink()


# ---------------------------------------------------------------- is the holder alive?

def pid_alive(pid: int, start: Optional[int]) -> bool:
    """Whether process `pid` of this host (and pid namespace) runs and is the one that started
    at `start` (clock ticks after boot; None: not checked)."""
    if pid <= 0:  # (kill(0) would signal our own process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:  # it has just ended, or there is no /proc to tell (then: it exists)
        return not os.path.exists("/proc/self/stat")
    state, started = stat
    if state in ("Z", "X"):  # a zombie has ended: only its parent has not reaped it
        return False
    return start is None or started == start


def slurm_job_state(job: str, timeout: float = SCONTROL_TIMEOUT_S) -> Optional[str]:
    """The job's state per `scontrol show job`, "GONE" when Slurm no longer knows it, None when
    it cannot be told (no scontrol, disabled, too slow, an error)."""
    if os.environ.get(SCONTROL_ENV) == "0" or shutil.which("scontrol") is None:
        return None
    if not re.fullmatch(r"\d+(_\d+)?", job):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return "GONE" if "invalid job id" in (out.stderr + out.stdout).lower() else None
    states = re.findall(r"\bJobState=(\S+)", out.stdout)
    return states[0] if states else None


# ---------------------------------------------------------------- the lock

class FolderLock:
    """A lock on `folder` for this process (or this data-parallel group) while held.

    `beside=False`: the lock file is <folder>/.xray.lock and the folder is created if needed
    (a run folder). `beside=True`: it is <parent>/.<name>.xray.lock and only the parent is
    created (a folder that is replaced as a whole, such as a data.dir being converted).
    `rank`: this process's rank in its data-parallel group (default: from the launcher's
    variables, xray.distributed.launched_rank); only rank 0 creates and removes the file.
    `alternative`: what to use instead, for the refusal (default by `what`)."""

    def __init__(self, folder, what: str = "training", *, beside: bool = False,
                 rank: Optional[int] = None, alternative: Optional[str] = None):
        self.folder = Path(os.path.abspath(folder))
        self.what = what
        self.beside = beside
        self.path = (self.folder.parent / f".{self.folder.name}{LOCK_NAME}" if beside
                     else self.folder / LOCK_NAME)
        self.guard = self.path.with_name(self.path.name + ".takeover")
        self.rank = launched_rank() if rank is None else int(rank)
        self.alternative = alternative or ("another data.dir" if what.startswith("convert")
                                           else "another run folder (hydra.run.dir=...)")
        self.record: Optional[dict] = None  # ours (rank 0), or the group's lock we accepted
        self.owner = False  # True: this process created the file and removes it
        self.took_over: Optional[dict] = None  # the stale holder this process replaced
        self.took_over_why: Optional[str] = None  # and why it was judged gone
        self._acquired = False

    # -- public

    def acquire(self) -> "FolderLock":
        if self._acquired:
            return self
        key = str(self.path)
        with _held_mutex:
            entry = _held.get(key)
            if entry and entry["pid"] == os.getpid():  # a nested hold in this process
                entry["count"] += 1
                self.record, self.owner, self._acquired = entry["record"], entry["owner"], True
                return self
        try:
            if self.rank == 0:
                self._acquire_as_lead()
            else:
                self._check_as_follower()
        except (PermissionError, OSError) as e:
            if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES):
                raise XrayError(f"cannot lock {self.folder} for {self.what}: {e.strerror} "
                                f"({e.filename or self.path}); use {self.alternative} that you "
                                f"can write") from e
            raise
        with _held_mutex:
            _held[key] = {"pid": os.getpid(), "count": 1, "owner": self.owner, "record": self.record}
        self._acquired = True
        return self

    def release(self) -> None:
        """Remove the lock file if this process created it and still holds it (never raises:
        a lock left behind is taken over later as stale)."""
        if not self._acquired:
            return
        self._acquired = False
        with _held_mutex:
            entry = _held.get(str(self.path))
            if entry and entry["pid"] == os.getpid():
                entry["count"] -= 1
                if entry["count"] > 0:
                    return
                del _held[str(self.path)]
        if not self.owner or self.record is None or self.record["pid"] != os.getpid():
            return  # a follower rank, or a forked child of the holder
        try:
            with self._guarded():
                raw, current = _read(self.path)
                if current and current.get("token") == self.record["token"]:
                    _remove_if(self.path, raw, self.record["token"])
                elif current is not None:
                    log.warning("%s: not removing %s: it was taken over by %s", self.folder,
                                self.path, describe(current))
        except Exception as e:  # noqa: BLE001 -- the job's outcome matters more than the lock
            log.warning("%s: could not remove the lock %s (%s); the next job takes it over when "
                        "this one is seen gone", self.folder, self.path, e)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def judge(self, holder: dict) -> tuple[str, str]:
        """("own" | "stale" | "live", why) for a holder's record, as seen from this process."""
        if holder.get("corrupt"):
            if holder.get("age_s", 0) > LEFTOVER_S:
                return "stale", f"its record is unreadable ({holder['corrupt']})"
            return "live", "its record is being written"
        me = self.record or _record(self.what, self.folder, self.rank)
        here = (holder.get("host") == me["host"] and holder.get("pid_ns") == me["pid_ns"])
        if here and holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return "stale", f"host {me['host']} has rebooted since"
        alive_here = here and pid_alive(int(holder.get("pid") or 0), holder.get("pid_start"))
        same_job = (holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]
                    and holder.get("slurm_cluster") == me["slurm_cluster"])
        same_group = holder.get("group") and holder["group"] == me["group"]
        if same_job or same_group:
            name = f"Slurm job {me['slurm_job']}" if same_job else f"group {me['group']}"
            if not alive_here or self.rank != 0:
                return "own", f"it belongs to this process's own {name}"
            # alive on this host: another process of one allocation, not a requeue
        if here:
            if alive_here:
                return "live", "its process runs on this host"
            return "stale", f"pid {holder.get('pid')} no longer runs on {me['host']}"
        job = holder.get("slurm_job")
        if job and holder.get("slurm_cluster") == me["slurm_cluster"]:
            state = slurm_job_state(job)
            if state == "GONE" or (state or "").split("+")[0] in SLURM_ENDED:
                return "stale", f"Slurm job {job} has ended ({state})"
        return "live", "it runs on another host, which cannot be checked from here"

    def refusal(self, holder: dict) -> XrayError:
        return XrayError(
            f"{self.folder} is in use: {describe(holder)} (lock {self.path}); wait for it to end, "
            f"or use {self.alternative}; if you are sure it has ended, delete {self.path}")

    # -- internals

    def _acquire_as_lead(self) -> None:
        (self.folder if not self.beside else self.folder.parent).mkdir(parents=True, exist_ok=True)
        self.record = _record(self.what, self.folder, self.rank)
        for _ in range(100):
            if _create(self.path, self.record):
                self.owner = True
                _remove_leftovers(self.path)
                return
            raw, holder = _read(self.path)
            if holder is None:
                continue  # removed meanwhile: try again
            verdict, why = self.judge(holder)
            if verdict == "live":
                raise self.refusal(holder)
            pause = float(os.environ.get(PAUSE_ENV) or 0)
            if pause:
                time.sleep(pause)
            with self._guarded():
                if _remove_if(self.path, raw, self.record["token"]):
                    self.took_over, self.took_over_why = holder, why
                    log.warning("%s: taking over the lock of %s: %s", self.folder,
                                describe(holder), why)
        raise XrayError(f"{self.folder}: could not take the lock {self.path} (it keeps changing "
                        f"hands); try again")

    def _check_as_follower(self) -> None:
        """A rank other than 0: its lead holds the lock; refuse only another live writer."""
        self.record = _record(self.what, self.folder, self.rank)
        raw, holder = _read(self.path)
        verdict = self.judge(holder)[0] if holder is not None else None
        if verdict == "live":
            raise self.refusal(holder)
        if verdict == "own":
            self.record = holder

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """The takeover guard: one process at a time judges and replaces this lock's file."""
        record = dict(self.record or _record(self.what, self.folder, self.rank),
                      token=uuid.uuid4().hex)
        deadline = time.monotonic() + 2 * GUARD_STALE_S
        while not _create(self.guard, record):
            raw, other = _read(self.guard)
            if other is None:
                continue
            here = other.get("host") == record["host"] and other.get("pid_ns") == record["pid_ns"]
            gone = here and not other.get("corrupt") and not pid_alive(int(other["pid"]), other.get("pid_start"))
            age = other.get("age_s")
            if age is None:
                with contextlib.suppress(OSError):
                    age = time.time() - os.stat(self.guard).st_mtime
            if gone or (age or 0) > GUARD_STALE_S:
                _remove_if(self.guard, raw, record["token"])
                continue
            if time.monotonic() > deadline:
                raise XrayError(f"{self.folder}: the lock {self.path} is busy (guard "
                                f"{self.guard} held by {describe(other)}); try again")
            time.sleep(0.02 + random.random() * 0.05)
        try:
            yield
        finally:
            raw, current = _read(self.guard)
            if current and current.get("token") == record["token"]:
                _remove_if(self.guard, raw, record["token"])


@contextlib.contextmanager
def hold(folder, what: str = "training", **kwargs) -> Iterator[FolderLock]:
    """`with hold(run_dir, what="training") as lock:` -- see FolderLock."""
    lock = FolderLock(folder, what, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def read_holder(folder, beside: bool = False) -> Optional[dict]:
    """The record of whoever holds the lock on `folder` (None: nobody), for status tools."""
    lock = FolderLock(folder, beside=beside, rank=0)
    return _read(lock.path)[1]
