"""One-line errors for users: raise XrayError, entrypoints print it without a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable


class XrayError(Exception):
    """A user-facing problem (bad input, bad config). Its message says what to do."""


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: an XrayError becomes one line on stderr and exit code 2. In a
    multirun it is raised instead, so Hydra marks that member failed and runs the others."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XrayError as e:
            print(f"error: {e}", file=sys.stderr)
            if _in_multirun():
                raise
            sys.exit(2)

    return wrapper


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
