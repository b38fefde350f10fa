"""Where a pipeline is: each job's Slurm state, the sweep's progress, where the logs are.

    python -m jobs.status outputs/pipeline/<time>
"""
from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Optional

from xray.errors import XrayError, one_line_errors
from xray.hparams import decision_metrics, read_eval


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from sacct (array tasks as <array>_<task>) and squeue (one line per
    pending array task). A job in neither never ran: cancelled while pending, or its
    dependency failed."""
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states: dict[str, str] = {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ids, "--format=JobID,State"],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job] = state.split()[0] if state else "UNKNOWN"
    out = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T"], capture_output=True,
                         text=True)
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job] = state  # squeue is the fresher source while a job is queued or running
    for job in job_ids:
        states.setdefault(job, "NOT_RUN")
    return states


ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "NOT_RUN")


def member_status(run_dir: Path, slurm_state: str) -> str:
    """What the member's own outputs say, or else what Slurm says happened to it."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text()).get("status", "unknown")
    if slurm_state in ENDED_BADLY:
        return slurm_state.lower()
    return "running" if run_dir.exists() else "waiting"


def status(pipeline_dir: Path) -> str:
    record_file = Path(pipeline_dir) / "jobs.json"
    if not record_file.is_file():
        raise XrayError(f"{record_file} not found; pass the folder jobs.pipeline printed")
    record = json.loads(record_file.read_text())
    members = record["members"]
    states = slurm_states(list(record["jobs"].values()) + list(members.values()))
    lines = [f"pipeline {pipeline_dir}"]
    for step, job_id in record["jobs"].items():
        if step == "train":
            counted = Counter(states[j] for j in members.values())
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counted.items()))
            lines.append(f"  {step:<9} {job_id:<8} array of {len(members)}: {summary}")
        else:
            lines.append(f"  {step:<9} {job_id:<8} {states[job_id]}")
    doctor = Path(pipeline_dir) / "doctor.json"
    if doctor.is_file():  # why nothing trains, when the GPU nodes cannot
        verdict = json.loads(doctor.read_text()).get("verdict")
        if verdict:
            lines.append(f"doctor: {verdict}")
    lines.append(f"sweep {record['sweep_dir']}")
    sweep = Path(record["sweep_dir"])
    done = Counter()
    for name, job_id in members.items():
        state = states[job_id]
        st = member_status(sweep / name, state)
        done[st] += 1
        log = Path(record["logs"]) / job_id / f"{job_id}_0_log.err"
        show_log = st not in ("ok", "diverged", "waiting") or state in ENDED_BADLY
        lines.append(f"  {state:<10} {st:<9} {name}" + (f"   log: {log}" if show_log else ""))
    lines.append("progress: " + ", ".join(f"{n} {s}" for s, n in sorted(done.items())))
    best = Path(record["best_dir"])
    if (best / "eval_test.json").exists():
        lines.append(best_line(best))
    return "\n".join(lines)


def best_line(best: Path) -> str:
    """The exported best model's test AUC (a K-class model's macro AUC) with its CI, from its
    eval_test.json (one written before `youden` was renamed too)."""
    auc = decision_metrics(read_eval(best / "eval_test.json"))["auc"]
    ci = f", 95% CI {auc['ci95'][0]:.4f}-{auc['ci95'][1]:.4f}" if auc["ci95"] else ""
    return f"best: {best} (test AUC {auc['value']:.4f}{ci})"


@one_line_errors
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__.split("\n")[0])
    parser.add_argument("pipeline_dir", type=Path)
    print(status(parser.parse_args(argv).pipeline_dir))


if __name__ == "__main__":
    main()
