"""Run folders as xray wrote them before checkpoint format 2 (the redesign of issue 25), for the
tests that check old runs stay readable: the small files of real runs trained with the code of
commit b93b4ef (tests/data/old_runs/), and their checkpoints rewritten as that code wrote them."""
from __future__ import annotations

import shutil
from pathlib import Path

import mindspore as ms

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"
FORMAT2_ONLY = ("format_version", "identity", "history")  # what format 1 did not hold


def format1(params: dict) -> dict:
    """A format-2 checkpoint's contents as format 1 held them: parameters and scalars only."""
    return {k: v for k, v in params.items() if k not in FORMAT2_ONLY}


def save_format1(params: dict, path: Path) -> None:
    """Write a checkpoint the way commit b93b4ef did (ms.save_checkpoint of the optimizer or the
    network, RunState's fields appended as scalars)."""
    ms.save_checkpoint([{"name": k, "data": v} for k, v in format1(params).items()], str(path))


def old_run(name: str, dest: Path, checkpoints_from: Path) -> Path:
    """A copy of the saved old run `name` with format-1 checkpoints made from the checkpoints in
    `checkpoints_from` (a new run of the same settings: weights are not kept in the repository)."""
    from xray.checkpoint import read_checkpoint

    shutil.copytree(OLD_RUNS / name, dest)
    (dest / "checkpoints").mkdir(exist_ok=True)
    for ckpt in sorted(checkpoints_from.glob("*.ckpt")):
        save_format1(read_checkpoint(ckpt), dest / "checkpoints" / ckpt.name)
    return dest
