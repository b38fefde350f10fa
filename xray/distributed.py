"""Data-parallel training with MindSpore's own distributed runtime (mindspore.communication).

One process per rank (device). Ranks find each other through MindSpore's dynamic cluster: a
scheduler process (MS_ROLE=MS_SCHED) and one worker per rank (MS_ROLE=MS_WORKER), all given
MS_WORKER_NUM, MS_SCHED_HOST (an IP address) and MS_SCHED_PORT. Who sets those:

- `python -m xray.launch --ranks N -- <xray.train overrides>` on one machine (xray/launch.py);
- `msrun --worker_num=N ... -m xray.train ...` (msrun also runs the script as the scheduler:
  `init_group` is called first thing, so the scheduler does nothing else);
- a Slurm job with one task per rank (the slurm_gpu launcher with cluster.nodes x
  cluster.gpus_per_node tasks): `env_from_slurm` derives the variables from SLURM_* and task 0
  starts the scheduler (`python -m xray.distributed`).

Without those variables everything is one rank and nothing here talks to anything.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from xray.errors import XrayError

log = logging.getLogger(__name__)

# Seconds a CPU collective waits for the other ranks (MindSpore's default is 30 s): at the end
# of a run the ranks wait for rank 0's final evaluation (leave_together), which takes minutes.
# The price: a rank that hangs (rather than dies) mid-training stalls the others this long.
COMM_OP_TIMEOUT_S = 1200

# Seconds without a heartbeat after which MindSpore's scheduler declares a rank dead and ends the
# group (MS_NODE_TIMEOUT; its default, 30 s, ended a healthy group here when ranks compiling
# on an overloaded node went quiet for 34 s). Also how long the others wait after a rank died.
NODE_TIMEOUT_S = 120

# MindSpore's log lines while ranks wait for each other: harmless, left out of what we show
NOISE = ("Topology build timed out", "retry(", "alive nodes")

# Test-only switch: with it set, gradients are NOT averaged across ranks (the test that proves
# the averaging matters runs with it and must then see different losses).
NO_GRAD_REDUCE = "XRAY_DP_NO_GRAD_REDUCE"


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel group."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints, TensorBoard, metrics and logs."""
        return self.rank == 0

    def slice(self, global_batch: int) -> slice:
        """This rank's contiguous part of each global batch."""
        per_rank = global_batch // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def in_cluster() -> bool:
    return bool(os.environ.get("MS_ROLE"))


def init_group() -> Group:
    """Group(0, 1) outside a MindSpore cluster; else join it (mindspore.communication.init),
    switch to data-parallel mode and return this worker's rank and the group size.
    Call it after ms.set_device and before any other MindSpore work."""
    if not in_cluster():
        return Group()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()  # (a scheduler started as the training script stays in here until the end)
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        sys.exit(0)
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return Group(get_rank(), get_group_size())


def check_batch_split(batch_size: int, ranks: int) -> None:
    """batch_size is the global batch: it must split evenly over the ranks."""
    if int(batch_size) % ranks:
        raise XrayError(f"batch_size={batch_size} (the global batch) does not split evenly over "
                        f"{ranks} ranks; use a multiple of {ranks}")


def grad_reducer(params, group: Group):
    """grads -> grads averaged over the ranks (identity on one rank). MindSpore does NOT do
    this for a value_and_grad + optimizer step, even in DATA_PARALLEL mode."""
    if group.size == 1 or os.environ.get(NO_GRAD_REDUCE) == "1":
        def unchanged(grads):
            return grads

        return unchanged
    from mindspore import nn

    return nn.DistributedGradReducer(params, mean=True, degree=group.size)


def mean_over_ranks(group: Group):
    """A function tensor -> its mean over the ranks (identity on one rank); usable in jit."""
    if group.size == 1:
        def unchanged(x):
            return x

        return unchanged
    from mindspore import ops

    allreduce = ops.AllReduce(ops.ReduceOp.SUM)  # CPU supports SUM only
    scale = 1.0 / group.size

    def mean(x):
        return allreduce(x) * scale

    return mean


def average_batch_statistics(net, group: Group) -> None:
    """Batch norm's moving mean and variance, which each rank keeps from its own part of every
    batch, replaced by their mean over the ranks (every rank calls it at the same point: a
    collective), so that all ranks, and the checkpoints rank 0 writes, hold the same model."""
    if group.size == 1:
        return
    mean = mean_over_ranks(group)
    for param in net.get_parameters():
        if param.name.endswith(("moving_mean", "moving_variance")):
            param.set_data(mean(param.value()))


def any_rank(flag: bool, group: Group) -> bool:
    """True on every rank when `flag` is true on at least one (every rank must call it at the
    same point: it is a collective)."""
    if group.size == 1:
        return bool(flag)
    import mindspore as ms
    from mindspore import ops

    # (float32: AllReduce on CPU takes float16/float32 only, and SUM only)
    total = ops.AllReduce(ops.ReduceOp.SUM)(ms.Tensor([float(bool(flag))], ms.float32))
    return float(total.asnumpy()[0]) > 0.5


def barrier(group: Group) -> None:
    if group.size > 1:
        any_rank(False, group)


def leave_together(group: Group) -> None:
    """The group's last collective, at the end of a run or before a requeue: every rank waits
    here until rank 0 has written the result (or last.ckpt), so that all ranks tear MindSpore
    down at once (a rank that tore it down while rank 0 still worked was seen to die of SIGSEGV
    under Slurm, failing a finished job). On CPU the wait is bounded by MS_CPU_COMM_OP_TIMEOUT
    (COMM_OP_TIMEOUT_S from our launchers); past it this rank leaves anyway, with a warning:
    its own part is done, and rank 0 records its own outcome."""
    try:
        barrier(group)
    except RuntimeError as e:
        log.warning("rank %d: leaving without waiting for the other ranks (%s)", group.rank,
                    str(e).strip().splitlines()[0])


def release_group(group: Group) -> None:
    """After leave_together at the end of a finished run: tear the collective library down
    now, with every rank at the same point (MindSpore's `release`), rather than in whatever
    order the interpreter's exit gets to it (a rank of a finished Slurm job was seen to die of
    SIGSEGV at exit). The ranks still leave the cluster itself at their exit."""
    if group.size == 1:
        return
    from mindspore.communication import release

    try:
        release()
    except RuntimeError as e:  # the result is written: this must not fail the run
        log.warning("rank %d: releasing the collective library failed (%s)", group.rank,
                    str(e).strip().splitlines()[0])


def launched_rank() -> int:
    """This process's rank as its launcher set it (MS_NODE_ID, or the Slurm task of a job of
    several tasks), before joining the cluster; 0 when it is not data-parallel."""
    if os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("MS_NODE_ID"):
        return int(os.environ["MS_NODE_ID"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def local_device() -> int:
    """Which of this node's accelerators this rank uses (DEVICE_ID, as msrun and xray.launch
    set it, and env_from_slurm from SLURM_LOCALID); 0 outside data-parallel runs."""
    return int(os.environ.get("DEVICE_ID", "0")) if in_cluster() else 0


def ipv4(host: str) -> str:
    """The IPv4 address of `host` (MindSpore's scheduler address must be an IP, not a name)."""
    return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]


def slurm_head_node(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[03-05,07]" -> "gpu03")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)  # without scontrol: "gpu[03-05]" -> gpu03
    return match.group(1) + (match.group(2) or "")


def cluster_timeouts(env: Mapping[str, str]) -> dict:
    """MindSpore's collective and heartbeat timeouts for our groups; a user's own values kept."""
    return {"MS_CPU_COMM_OP_TIMEOUT": env.get("MS_CPU_COMM_OP_TIMEOUT", str(COMM_OP_TIMEOUT_S)),
            "MS_NODE_TIMEOUT": env.get("MS_NODE_TIMEOUT", str(NODE_TIMEOUT_S))}


def env_from_slurm(environ: Optional[dict] = None) -> dict:
    """The MindSpore cluster variables of this Slurm task: one task = one rank, the scheduler
    on the job's first node, its port from the job id (so that jobs sharing a node differ)."""
    env = os.environ if environ is None else environ
    job = int(env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"]) + int(env.get("SLURM_ARRAY_TASK_ID") or 0)
    return {
        "MS_ROLE": "MS_WORKER",
        "MS_WORKER_NUM": env["SLURM_NTASKS"],
        "MS_NODE_ID": env["SLURM_PROCID"],
        "MS_SCHED_HOST": ipv4(slurm_head_node(env["SLURM_JOB_NODELIST"])),
        "MS_SCHED_PORT": str(20000 + job % 20000),
        "DEVICE_ID": env.get("SLURM_LOCALID", "0"),  # this task's GPU among the node's
        "MS_TOPO_TIMEOUT": env.get("MS_TOPO_TIMEOUT", "300"),
        **cluster_timeouts(env),
    }


def start_scheduler(env: dict, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """The cluster's scheduler as a child process (`python -m xray.distributed`)."""
    child = {k: v for k, v in os.environ.items() if k != "MS_NODE_ID"}
    child.update(env, MS_ROLE="MS_SCHED")
    child.pop("MS_NODE_ID", None)  # (env may carry this task's own id)
    return subprocess.Popen([sys.executable, "-m", "xray.distributed"], env=child, stdout=stdout,
                            stderr=subprocess.STDOUT, start_new_session=True)


def slurm_job_name() -> str:
    """This job as squeue and sacct name it: <array job>_<task> for an array member."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "?")


def join_slurm_job(scheduler_log: Path) -> Optional[subprocess.Popen]:
    """Inside a Slurm job of several tasks and not yet in a cluster: set this task's MindSpore
    variables; task 0 also starts the scheduler (returned, to be waited for at the end), its
    output appended to `scheduler_log` (the run folder's scheduler.log: why a group broke)."""
    if in_cluster() or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return None
    env = env_from_slurm()
    os.environ.update(env)
    log.info("Slurm task %s of %s: MindSpore scheduler at %s:%s", env["MS_NODE_ID"],
             env["MS_WORKER_NUM"], env["MS_SCHED_HOST"], env["MS_SCHED_PORT"])
    if env["MS_NODE_ID"] != "0":
        return None
    try:
        scheduler_log.parent.mkdir(parents=True, exist_ok=True)
        out = open(scheduler_log, "ab")
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} Slurm job {slurm_job_name()}, "
                  f"start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1}\n".encode())
        out.flush()
    except OSError as e:  # a diagnostic file must not fail the run
        log.warning("cannot write %s (%s); the scheduler's output is dropped", scheduler_log, e)
        return start_scheduler(env)
    with out:  # (the child keeps its own copy of the file)
        return start_scheduler(env, stdout=out)


def die_on_sigterm(last_words: Callable[[], None] = lambda: None) -> None:
    """For a data-parallel rank: SIGTERM ends the process, after `last_words()` (the group's
    failure record). MindSpore ends a rank whose peer died (no heartbeat for MS_NODE_TIMEOUT s)
    with SIGTERM; under submitit, whose handler only logs SIGTERM, the rank would wait in its
    collective for MS_CPU_COMM_OP_TIMEOUT (20 min) instead. The main thread may be blocked in
    that collective, so a watchdog thread acts (MindSpore releases the GIL while it waits),
    woken through the signal module's wakeup fd. The time-limit signal (SIGUSR2) is not
    affected."""
    if threading.current_thread() is not threading.main_thread():
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watchdog below acts
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watchdog() -> None:
        while signal.SIGTERM not in os.read(read_end, 64):
            pass  # another signal (e.g. SIGUSR2, which the preemption guard handles)
        try:
            last_words()
        finally:
            die_of(signal.SIGTERM)

    threading.Thread(target=watchdog, name="sigterm-watchdog", daemon=True).start()


def die_of(signum: int) -> None:
    """End this process by `signum` with its default action, from any thread (Python lets only
    the main thread reset a handler; the C library does not care)."""
    import ctypes

    ctypes.CDLL(None).signal(int(signum), 0)  # 0: SIG_DFL
    os.kill(os.getpid(), signum)


def timed_out_ranks(scheduler_log: Path) -> list[str]:
    """The scheduler's lines naming the ranks it declared dead (in task 0's run folder)."""
    try:
        lines = scheduler_log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[-200:] for line in lines if "is timed out" in line]


def main() -> None:
    """The stand-alone scheduler: waits in init() until every worker has finished."""
    if os.environ.get("MS_ROLE") != "MS_SCHED":
        sys.exit("run with MS_ROLE=MS_SCHED (xray.launch and Slurm jobs start it for you)")
    import mindspore as ms

    ms.set_device("CPU")
    from mindspore.communication import init

    init()


if __name__ == "__main__":
    main()
