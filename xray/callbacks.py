"""What hangs off the training loop: TensorBoard logging (rank 0 only), fixed Grad-CAM images,
and the preemption guard that turns submitit's "time is up" signal into a saved state and a
requeue. The loop calls them; none of them changes what it trains."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import numpy as np
from tensorboardX import SummaryWriter

from xray.checkpoint import save_model
from xray.data import make_eval_dataset
from xray.distributed import Group, any_rank, leave_together
from xray.metrics import confusion_k
from xray.plots import confusion_figure

log = logging.getLogger(__name__)


class TensorBoard:
    """The run's one event file, written by rank 0 only (other ranks get a logger that writes
    nothing). Events of an epoch go at its last step, so that a resume (purge_step = the next
    step) never drops them."""

    def __init__(self, run_dir: Path, purge_step: int, enabled: bool = True) -> None:
        self.writer = (SummaryWriter(logdir=str(run_dir), purge_step=purge_step or None, flush_secs=10)
                       if enabled else None)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, step: int, epoch: int, train_loss: float, val_loss: float, val: dict,
              y: np.ndarray, probs: np.ndarray, classes: tuple) -> None:
        """Validation metrics (two classes: at threshold 0.5; more: of the argmax; AUC = macro
        one-vs-rest), the confusion matrix and the precision-recall curves."""
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("train/epoch_loss", train_loss, step)
        w.add_scalar("val/loss", val_loss, step)
        for k, v in val.items():
            if k not in ("ppv", "npv") and math.isfinite(v):  # e.g. no AUC on a one-class split
                w.add_scalar(f"val/{k}", v, step)
        predicted = probs[:, 1] >= 0.5 if len(classes) == 2 else probs.argmax(axis=1)
        cm = confusion_k(y, predicted, len(classes))
        w.add_figure("val/confusion_matrix", confusion_figure(cm, f"val, epoch {epoch}", classes), step)
        if len(classes) == 2:
            w.add_pr_curve("val/pr_curve", y, probs[:, 1], step)
        else:  # one precision-recall curve per class, one-vs-rest
            for c, name in enumerate(classes):
                w.add_pr_curve(f"val/pr_curve/{name}", y == c, probs[:, c], step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step)

    def result(self, cfg, result: dict, step: int) -> None:
        """HParams and provenance of the run's result."""
        from xray.files import to_json
        from xray.hparams import write_hparams

        if self.writer is None:
            return
        write_hparams(self.writer, cfg, result, step)
        if "provenance" in result:
            self.writer.add_text("provenance", "    " + to_json(result["provenance"], indent=2).replace("\n", "\n    "))

    def close(self) -> None:
        """Close the event file; on a full disk say so in one line (and keep tensorboardX's
        exit hook from retrying with a traceback)."""
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as e:
            log.error("TensorBoard events in %s not fully written: %s", self.writer.logdir, e)
            self.writer.file_writer.event_writer._closed = True  # noqa: SLF001 - its atexit hook checks this


class RunWriter:
    """The run's checkpoints and history, written by rank 0 only (every rank keeps the same
    state in memory; the others write nothing)."""

    def __init__(self, run, enabled: bool) -> None:
        self.run, self.enabled = run, enabled

    def best(self, model, state, epoch: int) -> None:
        """best.ckpt: `model`, the network the run keeps (state.model())."""
        if self.enabled:
            save_model(model, self.run.best_ckpt, state.identity, epoch, state.run.best_auc)

    def state(self, state) -> None:
        """last.ckpt (to resume), then history.jsonl (for people and plots)."""
        if self.enabled:
            state.save(self.run.last_ckpt)
            self.run.write_history(state.history)


class GradCamImages:
    """Where the model looks, epoch by epoch: Grad-CAM maps of a fixed set of validation
    images, the first of each class in turn."""

    def __init__(self, records, spec, classes: tuple, count: int) -> None:
        self.images = fixed_val_images(records, spec, classes, count) if count > 0 else None

    def epoch(self, net, tensorboard: TensorBoard, step: int) -> None:
        if self.images is not None and tensorboard.writer is not None:
            from xray.explain import cam_panel

            tensorboard.figure("val/grad_cam", cam_panel(net, *self.images), step)


def fixed_val_images(records, spec, classes: tuple, count: int):
    """(inputs, captions, classes) of `count` validation images, the first of each class in
    turn, or None."""
    firsts = [list(np.flatnonzero(records.targets == c)) for c in range(len(classes))]
    wanted = sorted({int(firsts[k % len(classes)][k // len(classes)]) for k in range(count)
                     if k // len(classes) < len(firsts[k % len(classes)])})
    found: dict[int, tuple] = {}
    rows = make_eval_dataset(records, spec, 32, workers=1, with_names=True).create_tuple_iterator(
        num_epochs=1, output_numpy=True)
    for start, (x, y, names) in zip(range(0, len(records.targets), 32), rows):
        for i in set(wanted) & set(range(start, start + len(y))):
            found[i] = (x[i - start], f"{classes[int(y[i - start])]}\n{names[i - start]}")
        if len(found) == len(wanted):
            break
    if not wanted:
        return None
    return np.stack([found[i][0] for i in wanted]), [found[i][1] for i in wanted], classes


def _leave_job_signals_to_the_parent() -> None:
    """In a process forked from the training (MindSpore's dataset workers): Slurm signals every
    process of the job, with SIGCONT alongside the time-limit SIGUSR2. An inherited Python
    handler makes the worker's blocking msgrcv fail with EINTR and the worker die, and the
    training then waits for a batch that never comes until the job is killed, unrequeued.
    So the worker ignores SIGUSR2 (the parent saves and requeues), SIGCONT does nothing to it,
    and SIGTERM ends it (MindSpore's worker may install its own SIGTERM handler after this)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_FORK_HOOK_REGISTERED = False


class PreemptionGuard:
    """Under submitit, SIGUSR2 means "time limit near, or preempted". Remember it so that the
    training loop can save last.ckpt at the next step boundary, then hand over to submitit's
    own handler, which requeues the job and exits. Outside submitit it does nothing."""

    def __init__(self, group: Group = Group()) -> None:
        global _FORK_HOOK_REGISTERED
        self.pending: Optional[tuple] = None
        self.group = group
        self.previous = signal.getsignal(signal.SIGUSR2)
        if callable(self.previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR2, self._remember)
            if not _FORK_HOOK_REGISTERED:  # a hook cannot be unregistered: once per process
                os.register_at_fork(after_in_child=_leave_job_signals_to_the_parent)
                _FORK_HOOK_REGISTERED = True

    def _remember(self, signum, frame) -> None:
        self.pending = (signum, frame)

    def time_is_up(self) -> bool:
        """This process got the signal (no collective: for rank 0's evaluation at the end)."""
        return self.pending is not None

    def release(self) -> None:
        """Training is done: a late "time is up" signal must not kill the finished job while
        it writes its result (SIG_IGN, unlike a Python handler, survives interpreter shutdown)."""
        if self.previous is not signal.getsignal(signal.SIGUSR2) and callable(self.previous):
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def stop_requested(self) -> bool:
        """Stop at this step boundary? The same answer on every rank (a collective: every rank
        asks at the same points), yes as soon as one rank got the signal."""
        return any_rank(self.pending is not None, self.group)

    def hand_over(self) -> None:
        """After last.ckpt is saved: rank 0 lets submitit requeue the job (the whole group);
        the other ranks leave with it."""
        leave_together(self.group)
        signal.signal(signal.SIGUSR2, self.previous)
        if not self.group.is_main:
            raise SystemExit(0)
        self.previous(*(self.pending or (signal.SIGUSR2, None)))  # requeues and raises SystemExit
