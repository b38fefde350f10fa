"""Where a result came from: the code (git commit, dirty tree), the libraries, the machine and
the Slurm job, recorded with every run so that a number in a paper can be traced back."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from typing import Optional

from xray import PACKAGE_DIR


def git_state() -> dict:
    """{commit, dirty} of the checkout xray runs from; nulls when it is not a git checkout."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("xray", "mindspore", "numpy", "pillow", "opencv-python-headless", "hydra-core",
                    "tensorboardX"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def provenance(cfg=None) -> dict:
    """Code, libraries, host, device target and Slurm job of this process."""
    job = os.environ.get("SLURM_JOB_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return {
        "git": git_state(),
        "versions": versions(),
        "host": socket.gethostname(),
        "device_target": str(cfg.get("device_target")) if cfg is not None else None,
        "slurm_job_id": f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else job,
    }
