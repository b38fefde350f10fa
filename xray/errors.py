"""User-facing errors: raise XrayError with a message that says what to do; entrypoints
print it as one line instead of a traceback."""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Any, Callable, Optional


class XrayError(Exception):
    """A user-facing problem (bad input, bad config). Its message says what to do."""


class RunRefused(XrayError):
    """The request contradicts what a run folder holds (other settings, another model): refused
    before anything in the folder is written."""


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function.

    - An XrayError becomes one line on stderr and exit code 2.
    - In a Slurm/submitit job any failure exits the process with code 1, so that the scheduler
      records the job as FAILED (Hydra's launcher would otherwise report it COMPLETED).
    - In a local multirun the error is raised, so Hydra marks that member failed and runs the rest.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            message = user_message(e)
            if message is None:  # a bug: the traceback is what helps
                if in_batch_job():
                    traceback.print_exc()
                    sys.exit(1)
                raise
            print(f"error: {message}", file=sys.stderr, flush=True)
            if in_batch_job():
                sys.exit(1)
            if _in_multirun():
                raise
            sys.exit(2)

    return wrapper


def user_message(error: Exception) -> Optional[str]:
    """The one line a user gets for an error they can act on, None for anything else."""
    if isinstance(error, XrayError):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"disk full{where}; free some space and rerun (a training run resumes from its last checkpoint)"
    return None


def in_batch_job() -> bool:
    """True inside a job that submitit runs (Slurm or its local executor)."""
    return "SUBMITIT_FOLDER" in os.environ


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
