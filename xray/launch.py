"""Data-parallel training on this machine: N ranks of one run, one process each.

    python -m xray.launch --ranks 2 -- data=sample epochs=2 batch_size=16

Starts MindSpore's scheduler and N `python -m xray.train <overrides>` workers with the
dynamic-cluster variables (MS_ROLE, MS_WORKER_NUM, MS_NODE_ID, MS_SCHED_HOST, MS_SCHED_PORT),
prints their output prefixed with the rank, and waits. If a rank fails, the others are stopped
and the launcher exits with that rank's exit code; else 0. `batch_size` is the global batch
(each rank trains on batch_size / ranks images a step); only rank 0 writes into the run folder.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

from xray.distributed import NOISE, check_batch_split, cluster_timeouts, start_scheduler
from xray.errors import XrayError, one_line_errors
from xray.run_lock import GROUP_ENV, new_group_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_batch(overrides: list[str], ranks: int) -> None:
    """batch_size must split evenly over the ranks: one line and exit 2 before anything starts."""
    from hydra import compose, initialize_config_dir

    from xray import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])
    check_batch_split(cfg.batch_size, ranks)


def pump(stream, prefix: str, out, keep: collections.deque | None = None) -> None:
    """Copy a child's output line by line, prefixed (or into `keep` only, for the scheduler)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if keep is not None:
            keep.append(line)
        elif not any(n in line for n in NOISE):
            out.write(f"{prefix}{line}")
            out.flush()
    stream.close()


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 15
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def launch(ranks: int, overrides: list[str], port: int = 0, module: str = "xray.train",
           topo_timeout: int = 120) -> int:
    if not any(o.startswith("hydra.run.dir=") for o in overrides):  # one run folder for all ranks
        overrides = [*overrides, f"hydra.run.dir=outputs/train/{datetime.now():%Y-%m-%d_%H-%M-%S}"]
    env = dict(os.environ, MS_WORKER_NUM=str(ranks), MS_SCHED_HOST="127.0.0.1",
               MS_SCHED_PORT=str(port or free_port()), MS_TOPO_TIMEOUT=str(topo_timeout))
    env.update(cluster_timeouts(env))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env.pop("MS_NODE_ID", None)
    env[GROUP_ENV] = new_group_id()  # the ranks share one lock on the run folder
    sched_out: collections.deque = collections.deque(maxlen=40)
    scheduler = start_scheduler(env, stdout=subprocess.PIPE)
    threads = [threading.Thread(target=pump, args=(scheduler.stdout, "", None, sched_out), daemon=True)]
    workers = []
    for rank in range(ranks):
        p = subprocess.Popen([sys.executable, "-m", module, *overrides],
                             env=dict(env, MS_ROLE="MS_WORKER", MS_NODE_ID=str(rank), DEVICE_ID=str(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        workers.append(p)
        threads.append(threading.Thread(target=pump, args=(p.stdout, f"[rank {rank}] ", sys.stdout),
                                        daemon=True))
    for t in threads:
        t.start()
    code = 0
    try:
        while True:
            codes = [p.poll() for p in workers]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                code = failed[0]
                rank = codes.index(code)
                print(f"xray.launch: rank {rank} exited with code {code}; stopping the other ranks",
                      file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if scheduler.poll() not in (None, 0):
                code = 1
                print("xray.launch: the MindSpore scheduler failed:\n" + "".join(sched_out),
                      file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        code = 130
    if code == 0:
        try:
            scheduler.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    stop([*workers, scheduler])
    for t in threads:
        t.join(timeout=5)
    return code


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="python -m xray.launch --ranks N -- <xray.train overrides>")
    ap.add_argument("--ranks", type=int, required=True, help="processes (devices) of the run")
    ap.add_argument("--port", type=int, default=0, help="scheduler port (default: a free one)")
    ap.add_argument("--topo-timeout", type=int, default=120,
                    help="seconds the ranks wait for each other to start (MS_TOPO_TIMEOUT)")
    ap.add_argument("overrides", nargs="*", help="xray.train overrides (after --)")
    args = ap.parse_args(argv)
    if args.ranks < 1:
        raise XrayError(f"--ranks={args.ranks} must be >= 1")
    check_batch(args.overrides, args.ranks)
    sys.exit(launch(args.ranks, args.overrides, args.port, topo_timeout=args.topo_timeout))


if __name__ == "__main__":
    main()
