"""The learning-rate range test (Smith 2015; fastai's and Lightning's `lr_find`, MONAI's
`LearningRateFinder`): train the run's own network, loss, optimizer and step on the run's own
batches while the learning rate grows exponentially from lr_find.min_lr to lr_find.max_lr, and
suggest the rate where the smoothed loss falls fastest.

    python -m xray.lr_find data.dir=outputs/data/kermany                      # the training defaults
    python -m xray.lr_find +experiment=demo lr_find.steps=100 lr_find.max_lr=10
    python -m xray.lr_find task=subtype data.image_size=72 train.amp=O2 ...    # any xray.train override

Writes into the Hydra run folder: lr_find.csv (step, lr, loss, smoothed), lr_find.png (loss vs
lr, the suggestion marked), lr_find.json (the suggestion, how it was chosen, the settings and
provenance) and a TensorBoard event file (lr_find/* scalars and the figure). No checkpoint: the
weights are thrown away.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Optional

import hydra
import mindspore as ms
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from xray import CONF_DIR
from xray.callbacks import TensorBoard
from xray.checks import FRACTION, POSITIVE, TRAIN, Rule, check
from xray.data import make_train_dataset
from xray.device import setup_device
from xray.errors import XrayError, one_line_errors
from xray.files import write_json, write_text
from xray.hparams import hparams_of
from xray.plots import plt, save_figure
from xray.provenance import provenance
from xray.run_folder import RunFolder
from xray.step import build_training
from xray.train import iterate, load_data

log = logging.getLogger(__name__)

MIN_STEPS = 10
LR_FIND: dict[str, Rule] = {
    "lr_find.min_lr": POSITIVE,
    "lr_find.max_lr": POSITIVE,
    "lr_find.steps": ("int", lambda v: v >= MIN_STEPS, f"an integer >= {MIN_STEPS}"),
    "lr_find.beta": FRACTION,
    "lr_find.diverge": ("number", lambda v: v > 1, "a number > 1"),
    "lr_find.skip_start": ("int", lambda v: v >= 0, "an integer >= 0"),
    "lr_find.skip_end": ("int", lambda v: v >= 0, "an integer >= 0"),
}
HOW = "steepest descent of the smoothed loss"
FLAT = 0.02  # a smoothed loss that fell by less than this fraction never left its plateau
# hyper-parameters of the training config that the range test does not use
NOT_USED = ("lr", "epochs", "schedule", "warmup_epochs")


def check_lr_find(cfg: DictConfig) -> None:
    """The training config's rules, the lr_find keys', and max_lr > min_lr."""
    check(cfg, TRAIN)
    check(cfg, LR_FIND)
    low, high = float(cfg.lr_find.min_lr), float(cfg.lr_find.max_lr)
    if high <= low:
        raise XrayError(f"lr_find.max_lr={cfg.lr_find.max_lr} must be > lr_find.min_lr ({cfg.lr_find.min_lr})")


def lr_range(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """`steps` rates growing geometrically from min_lr to max_lr (both included)."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


class Smoother:
    """Exponential moving average of the loss, bias-corrected (fastai, Lightning): the first
    values are not pulled towards 0."""

    def __init__(self, beta: float = 0.98) -> None:
        self.beta, self.average, self.count = beta, 0.0, 0

    def __call__(self, loss: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta ** self.count)


def suggest(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int = 10, skip_end: int = 5) -> Optional[dict]:
    """The lr at the steepest descent of the smoothed loss over log10(lr), or None when fewer
    than 3 finite points were recorded.

    Like Lightning's default and fastai's `steep`: the first `skip_start` points (the loss has
    not reacted yet) and the last `skip_end` (it is diverging) are left out, and so is everything
    after the lowest smoothed loss of what is left (a fall on the divergent side is noise). If
    the skips leave fewer than 3 points (an early stop), at most the first quarter and the last
    eighth are skipped. `relative_fall`: how much the smoothed loss fell from its first value
    to its lowest, as a fraction of the first."""
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    finite = np.flatnonzero(np.isfinite(smoothed) & (lrs > 0))
    if len(finite) < 3:
        return None
    n = len(finite)
    if n - skip_start - skip_end < 3:  # an early stop: skip fewer (a quarter and an eighth at most)
        skip_start, skip_end, fewer = min(skip_start, n // 4), min(skip_end, n // 8), " (fewer than asked: few points)"
        if n - skip_start - skip_end < 3:
            skip_start, skip_end = 0, 0
    else:
        fewer = ""
    window = finite[skip_start:n - skip_end]
    how = [f"skipping the first {skip_start} and last {skip_end} of {n} finite points{fewer}"]
    lowest = window[:np.argmin(smoothed[window]) + 1]
    if len(lowest) >= 3:
        window = lowest
        how.append("up to the lowest smoothed loss")
    # the rows are the schedule's steps, equally spaced in log10(lr): the slope over the step
    # index, in loss per decade (with train.amp, a skipped step repeats its lr: no 0/0)
    x = np.log10(lrs[window])
    slope = np.gradient(smoothed[window]) * (len(window) - 1) / max(x[-1] - x[0], 1e-12)
    best = int(np.argmin(slope))
    index = int(window[best])
    first, low = smoothed[finite[0]], float(np.min(smoothed[finite]))
    return {"lr": float(lrs[index]), "step": index, "smoothed_loss": float(smoothed[index]),
            "slope_per_decade": float(slope[best]),
            "lowest_smoothed_loss": low, "lr_at_lowest_smoothed_loss": float(lrs[finite[np.argmin(smoothed[finite])]]),
            "relative_fall": float((first - low) / abs(first)) if first else None,
            "how": f"{HOW}: min d(smoothed loss)/d(log10 lr) over steps {int(window[0])}-{int(window[-1])} "
                   f"({', '.join(how)})"}


def range_test(cfg: DictConfig, run: RunFolder) -> dict:
    """Run the range test per `cfg` (a composed conf/lr_find.yaml), write its files into
    `run`, return the content of lr_find.json."""
    start = time.perf_counter()
    check_lr_find(cfg)
    setup_device(cfg.device_target, cfg.mode)
    settings = cfg.lr_find
    steps = int(settings.steps)
    ms.set_seed(cfg.seed)  # as xray.train.fit: the same initial weights
    data = load_data(cfg, run, saved=None)
    lrs = lr_range(float(settings.min_lr), float(settings.max_lr), steps)
    # the lr array is the optimizer's per-step schedule: step i runs at lrs[i]
    net, loss_fn, optimizer, scaler, step_fn = build_training(cfg, cfg.data.image_size, data.train_counts, lrs)
    log.info("lr_find: %s, task %s, %d train images, %d steps/epoch, input %d px, loss=%s, batch %d, "
             "lr %g -> %g over %d steps (device %s, %s mode)", data.dir, data.identity["task"],
             len(data.train.targets), data.steps_per_epoch, data.spec.image_size, cfg.loss.name,
             cfg.batch_size, lrs[0], lrs[-1], steps, cfg.device_target, cfg.mode)

    run.path.mkdir(parents=True, exist_ok=True)
    tensorboard = TensorBoard(run.path, purge_step=0)
    rows: list[tuple[int, float, float, float]] = []
    smooth, best, stopped = Smoother(float(settings.beta)), math.inf, None
    try:
        net.set_train(True)
        epoch = 0
        while len(rows) < steps and stopped is None:
            epoch += 1  # the training's batches, in its order: epoch 1, 2, ... as needed
            batches = make_train_dataset(data.train, data.spec, cfg.batch_size, cfg.seed, epoch, 0,
                                         cfg.data.augment, cfg.data.sampling, cfg.data.workers)
            for x, y in iterate(batches, min(data.steps_per_epoch, steps - len(rows))):
                step = len(rows)
                # the rate this step applies: the optimizer's own counter (with train.amp, a
                # step whose gradients overflow is skipped and the next one applies its rate)
                lr = float(lrs[min(int(optimizer.global_step.asnumpy().reshape(-1)[0]), steps - 1)])
                loss = float(step_fn(x, y, step).asnumpy())
                smoothed = smooth(loss) if math.isfinite(loss) else math.nan
                rows.append((step, lr, loss, smoothed))
                if math.isfinite(loss):
                    tensorboard.writer.add_scalar("lr_find/loss", loss, step)
                    tensorboard.writer.add_scalar("lr_find/smoothed", smoothed, step)
                tensorboard.writer.add_scalar("lr_find/lr", lr, step)
                if step % cfg.train.log_every == 0:
                    log.info("step %d/%d  lr %.3g  loss %.4f  smoothed %.4f", step, steps, lr, loss, smoothed)
                if not math.isfinite(loss):
                    stopped = f"the loss became {loss} at lr {lr:.3g} (step {step})"
                elif step > 0 and smoothed > float(settings.diverge) * best:
                    stopped = (f"the smoothed loss {smoothed:.4g} exceeded {float(settings.diverge):g} x its "
                               f"lowest ({best:.4g}) at lr {lr:.3g} (step {step})")
                best = min(best, smoothed) if math.isfinite(smoothed) else best
                if stopped is not None:
                    break
        if stopped is not None:
            log.info("stopped early: %s", stopped)
        table = np.array([r[1:] for r in rows], dtype=float).reshape(-1, 3)
        suggestion = suggest(table[:, 0], table[:, 2], int(settings.skip_start), int(settings.skip_end))
        write_csv(run.path / "lr_find.csv", rows)
        fig = figure(table[:, 0], table[:, 1], table[:, 2], suggestion, cfg)
        tensorboard.figure("lr_find/loss_vs_lr", figure(table[:, 0], table[:, 1], table[:, 2], suggestion, cfg),
                           len(rows) - 1)
        save_figure(fig, run.path / "lr_find.png")
        result = {
            "suggested_lr": suggestion["lr"] if suggestion else None,
            "suggestion": suggestion,
            "try": ([suggestion["lr"], 10 * suggestion["lr"] / 3] if suggestion else None),
            "steps_planned": steps,
            "steps_run": len(rows),
            "stopped_early": stopped,
            "lr_find": OmegaConf.to_container(settings, resolve=True),
            "settings": {**{k: v for k, v in hparams_of(cfg).items() if k not in NOT_USED},
                         "nesterov": bool(cfg.optim.nesterov), "data_dir": str(data.dir),
                         "train_images": len(data.train.targets), "steps_per_epoch": data.steps_per_epoch,
                         "device_target": str(cfg.device_target), "mode": str(cfg.mode)},
            "wall_time_s": round(time.perf_counter() - start, 2),
            "provenance": provenance(cfg),
        }
        write_json(run.path / "lr_find.json", result)
        if suggestion is None:
            log.warning("no suggested lr: fewer than 3 finite losses were recorded (lower lr_find.min_lr "
                        "or lr_find.max_lr)")
        else:
            x = suggestion["lr"]
            log.info("suggested lr: %.3g (%s; try %.3g to %.3g as the peak of a one-cycle or cosine schedule)",
                     x, HOW, x, 10 * x / 3)
            fall = suggestion["relative_fall"]
            if suggestion["slope_per_decade"] >= 0 or fall is None or fall < FLAT:
                log.warning("the smoothed loss fell by only %.2g %% over the range tested: the suggestion is "
                            "within its noise; add lr_find.steps, widen the range or use more data",
                            100 * max(fall or 0.0, 0.0))
        log.info("lr_find: %d steps, %.0f s -> %s", len(rows), result["wall_time_s"], run.path)
        return result
    finally:
        tensorboard.close()


def write_csv(path: Path, rows: list) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed"])
    writer.writerows((step, repr(lr), repr(loss), repr(smoothed)) for step, lr, loss, smoothed in rows)
    write_text(path, out.getvalue())


def figure(lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray, suggestion: Optional[dict], cfg: DictConfig):
    """Loss against lr (log axis): each step's loss, the smoothed loss, the suggestion."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(lrs, losses, color="C0", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smoothed, color="C0", lw=2, label=f"smoothed (beta {float(cfg.lr_find.beta):g})")
    if suggestion is not None:
        ax.axvline(suggestion["lr"], color="C3", ls="--", lw=1)
        ax.plot(suggestion["lr"], suggestion["smoothed_loss"], "o", color="C3",
                label=f"suggested lr {suggestion['lr']:.3g}")
    finite = smoothed[np.isfinite(smoothed)]
    if len(finite):  # the descent fills the height; the diverging end leaves through the top
        low = float(finite.min())
        top = float(finite[:int(np.argmin(finite)) + 1].max())
        span = max(top - low, 0.01 * abs(low), 1e-6)
        ax.set_ylim(low - 0.1 * span, top + 0.6 * span)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"training loss ({cfg.loss.name})")
    ax.set_title(f"LR range test: {cfg.task.name}, {cfg.data.image_size} px, batch {cfg.batch_size}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="lr_find")
@one_line_errors
def main(cfg: DictConfig) -> Optional[float]:
    run = RunFolder(Path(HydraConfig.get().runtime.output_dir))
    return range_test(cfg, run)["suggested_lr"]


if __name__ == "__main__":
    # the module under its real name: MindSpore's jit reads the source of what it compiles
    from xray.lr_find import main as entrypoint

    entrypoint()
