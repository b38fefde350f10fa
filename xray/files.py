"""Small file helpers: every result file is written to a temp name and renamed into place,
so a crash never leaves a half-written file where a complete one was."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from xray.run_lock import pid_alive


def write_text(path: Path, text: str) -> None:
    """Durably: a crash or a node failure leaves the old file or the new one, never a cut one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException:  # e.g. a full disk: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a complete (fsynced) temp file into place and make the rename itself durable: a
    rename without fsync can leave an empty or cut file after a power or node failure."""
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return  # (a folder that cannot be opened, e.g. on some network file systems)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, to_json(obj, indent=2) + "\n")


def to_json(obj: Any, indent: Any = None) -> str:
    """Strict JSON: NaN and infinities (an undefined metric) become null, which every JSON
    reader accepts (bare NaN is a Python extension)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values): nested settings as dotted keys."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy arrays and scalars -> Python lists and numbers
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder into place; an existing one is removed only afterwards."""
    old = target.parent / f".{target.name}.old-{_owner()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; when the block succeeds it replaces
    `target`, when it fails it is removed and `target` is left as it was. Temp folders that
    a killed process (kill -9, node failure) left beside `target` are removed first."""
    target = Path(target)
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{_owner()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def _owner() -> str:
    """host-pid: names a temp folder after the process that writes it (folders may be shared
    between the nodes of a cluster)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove .<name>.tmp-<host>-<pid> / .old- folders beside target whose process, on this
    host, is gone; returns them. Another host's folders are left alone: their process may live."""

    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        m = pattern.match(path.name)
        if m and m["host"] == socket.gethostname() and not pid_alive(int(m["pid"]), None):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
