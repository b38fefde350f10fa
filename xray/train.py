"""Train AlexNet on a converted data set; logs to TensorBoard, checkpoints best/last.

    python -m xray.train lr=0.01 momentum=0.9 loss=softmax_ce [data=sample] [epochs=..]
    python -m xray.train -m lr=1e-3,1e-2 loss=mse,softmax_ce momentum=0.9,0.99

Everything lands in the Hydra run dir: config.yaml, history.jsonl, metrics.json,
checkpoints/{last,best}.ckpt and the TensorBoard event file.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import hydra
import mindspore as ms
import numpy as np
from hydra.core.hydra_config import HydraConfig
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf
from tensorboardX import SummaryWriter

from xray import CONF_DIR
from xray.calibration import FILE as CALIBRATION
from xray.checks import TRAIN, check
from xray.checkpoint import read_checkpoint
from xray.data import (check_task, make_eval_dataset, make_train_dataset, preprocess_spec,
                       read_manifest, split_file, task_records)
from xray.device import setup_device
from xray.distributed import (Group, any_rank, barrier, check_batch_split, die_on_sigterm, grad_reducer,
                               init_group, join_slurm_job, launched_rank, leave_together, local_device,
                               mean_over_ranks, release_group)
from xray.errors import XrayError, in_batch_job, one_line_errors
from xray.files import to_json, write_json, write_text
from xray.hparams import hparams_of, write_hparams
from xray.losses import build_loss
from xray.metrics import confusion_k, task_metrics
from xray.model import build_model, dropout_masks
from xray.explain import cam_panel
from xray.plots import confusion_figure
from xray.provenance import provenance

log = logging.getLogger(__name__)

SPACE_MARGIN = 20_000_000  # bytes kept free beyond a checkpoint (logs, TensorBoard, JSON)

def lr_schedule(base_lr: float, optim: DictConfig, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """Learning rate of every step: warm-up from base_lr/10, then constant, step or cosine."""
    total = epochs * steps_per_epoch
    step = np.arange(total, dtype=np.float64)
    epoch = step / steps_per_epoch
    if optim.schedule == "constant":
        lr = np.full(total, base_lr)
    elif optim.schedule == "step":
        lr = base_lr * optim.gamma ** np.floor(epoch / optim.step_epochs)
    elif optim.schedule == "cosine":
        lr = 0.5 * base_lr * (1 + np.cos(np.pi * step / max(total, 1)))
    else:
        raise XrayError(f"optim.schedule={optim.schedule} is unknown; use constant, step or cosine")
    warmup = optim.warmup_epochs * steps_per_epoch
    if warmup > 0:
        lr = np.where(step < warmup, base_lr * (0.1 + 0.9 * step / warmup), lr)
    return lr.astype(np.float32)


def build_optimizer(net: nn.Cell, cfg: DictConfig, lr: np.ndarray) -> nn.Momentum:
    """nn.Momentum with weight decay on weights only (biases are not decayed)."""
    params = net.trainable_params()
    weights = [p for p in params if p.name.endswith("weight")]
    others = [p for p in params if not p.name.endswith("weight")]
    groups = [{"params": weights, "weight_decay": cfg.optim.weight_decay},
              {"params": others, "weight_decay": 0.0},
              {"order_params": params}]
    # float(): a sweep value like momentum=0 arrives as an int, which nn.Momentum rejects
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr), momentum=float(cfg.momentum),
                       use_nesterov=cfg.optim.nesterov)


def validate(net: nn.Cell, loss_fn: nn.Cell, dataset) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, class probabilities NxK, mean loss) over a whole eval dataset."""
    net.set_train(False)
    labels, probs, loss_sum = [], [], 0.0
    for x, y in dataset.create_tuple_iterator(num_epochs=1):  # net(x): no dropout masks
        logits = net(x)
        loss_sum += float(loss_fn(logits, y).asnumpy()) * len(y)
        probs.append(ops.softmax(logits, axis=1).asnumpy())
        labels.append(y.asnumpy())
    y, p = np.concatenate(labels), np.concatenate(probs)
    return y, p, loss_sum / max(len(y), 1)


class PreemptionGuard:
    """Under submitit, SIGUSR2 means "time limit near, or preempted". Remember it so that the
    training loop can save last.ckpt at the next step boundary, then hand over to submitit's
    own handler, which requeues the job and exits. Outside submitit it does nothing."""

    def __init__(self, group: Group = Group()) -> None:
        self.pending: Optional[tuple] = None
        self.group = group
        self.previous = signal.getsignal(signal.SIGUSR2)
        if callable(self.previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR2, self._remember)

    def _remember(self, signum, frame) -> None:
        self.pending = (signum, frame)

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


@dataclass
class RunState:
    """The loop's bookkeeping: exactly what last.ckpt stores beside the weights and the
    optimizer state, and all a resumed run needs to continue where this one stopped."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done of the next epoch (a job stopped mid-epoch)
    epoch_loss_sum: float = 0.0  # their summed training loss
    best_auc: float = -1.0  # best val AUC so far, and its epoch (0: none yet)
    best_epoch: int = 0
    loss_scale: float = 0.0  # the dynamic loss scale of train.amp O1-O3 (0: fp32, no scaling)


def checkpoint_bytes(obj: nn.Cell) -> int:
    """The size of obj's checkpoint (its parameters; an optimizer's include the network's)."""
    return sum(p.nbytes for p in obj.parameters_dict().values())


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """A full disk is one clear line before writing, not a half-written file after."""
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise XrayError(f"{folder} has {free / 1e6:.0f} MB free but {what} needs "
                        f"{(needed + SPACE_MARGIN) / 1e6:.0f} MB; free some space (e.g. the "
                        "checkpoints/last.ckpt of finished runs) and rerun: it resumes from its "
                        "last checkpoint")


def save_ckpt(obj: nn.Cell, path: Path, meta: dict) -> None:
    """save_checkpoint to a temp name, then rename: a crash or a full disk never leaves half a
    checkpoint, nor a temp file."""
    ensure_space(path.parent, checkpoint_bytes(obj), path.name)
    tmp = path.with_name(f".{path.stem}.tmp.ckpt")
    try:
        ms.save_checkpoint(obj, str(tmp), append_dict=meta)
        tmp.replace(path)
    except BaseException:
        for leftover in path.parent.glob(f".{path.stem}.tmp.*"):  # MindSpore writes .tmp.tmp first
            leftover.unlink(missing_ok=True)
        raise


def load_state(path: Path, optimizer: nn.Cell) -> RunState:
    """Weights + optimizer state from last.ckpt into the optimizer; returns the loop state."""
    try:
        params = read_checkpoint(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise XrayError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]}); "
                        "rerun with overwrite=true to start this run over") from None
    state = RunState(**{f.name: type(getattr(RunState, f.name))(params.pop(f.name).asnumpy())
                        for f in fields(RunState) if f.name in params})
    params.pop("learning_rate", None)  # the schedule comes from the config, not the file
    ms.load_param_into_net(optimizer, params, strict_load=True)
    return state


def finished_result(run_dir: Path) -> Optional[dict]:
    """metrics.json of a run folder whose training ended (ok or diverged), else None."""
    path = run_dir / "metrics.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("status") in ("ok", "diverged") else None


def start_over(run_dir: Path) -> None:
    """overwrite=true: remove what an earlier attempt wrote (not .hydra/ or the logs), also what
    evaluating it wrote (a stale calibration.json would give the new model the old temperature)."""
    for path in [run_dir / "checkpoints", *run_dir.glob("events.out.tfevents.*"),
                 *(run_dir / name for name in ("metrics.json", "history.jsonl", "config.yaml", CALIBRATION)),
                 *(path for kind in ("eval_*.json", "predictions_*.csv", "roc_*.png", "confusion_*.png",
                                     "reliability_*.png", "cam_errors_*.png") for path in run_dir.glob(kind))]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train per `cfg`, writing everything into `run_dir`; returns the metrics.json content.

    A run folder whose training already ended is left as it is (its result is returned;
    overwrite=true starts it over). A run that raises leaves metrics.json and HParams saying
    `failed`, then re-raises."""
    run_dir = Path(run_dir)
    finished = finished_result(run_dir)
    if finished is not None and not cfg.get("overwrite"):
        log.info("%s already finished (status %s); not training it again (overwrite=true starts "
                 "it over)", run_dir, finished["status"])
        return finished
    writers: list[SummaryWriter] = []  # the run's one TensorBoard writer, once it is open
    # a Slurm job of several tasks: one rank each (task 0 also starts the scheduler)
    scheduler = join_slurm_job(run_dir / "scheduler.log")
    group = Group(rank=launched_rank())  # (until it has joined the others)
    try:
        check(cfg, TRAIN)
        check_ranks(cfg)
        setup_device(cfg.device_target, cfg.mode, local_device())
        group = init_group()
        if group.size > 1:
            die_on_sigterm()
        if cfg.get("overwrite") and group.is_main:
            start_over(run_dir)
        barrier(group)
        result = _train(cfg, run_dir, writers, group)
        leave_together(group)
        release_group(group)
        return result
    except Exception as e:
        if group.is_main:
            record_failure(cfg, run_dir, e, writers)
        raise
    finally:
        for writer in writers:
            close_quietly(writer)
        # the scheduler (task 0's child) ends by itself once every rank has finalized, which is
        # at their exit; after a failure the group is broken and it would wait in vain
        if scheduler is not None and sys.exc_info()[0] is not None:
            scheduler.kill()


def check_ranks(cfg: DictConfig) -> None:
    """batch_size is the global batch: it must split evenly over the ranks (known from the
    cluster variables before joining it, so that a mistake fails at once on every rank)."""
    ranks = int(os.environ.get("MS_WORKER_NUM", "1")) if os.environ.get("MS_ROLE") == "MS_WORKER" else 1
    check_batch_split(cfg.batch_size, ranks)


class NullWriter:
    """The TensorBoard writer of ranks other than 0: writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def close_quietly(writer: SummaryWriter) -> None:
    """Close a TensorBoard writer; on a full disk say so in one line (and keep tensorboardX's
    exit hook from retrying with a traceback)."""
    try:
        writer.close()
    except OSError as e:
        log.error("TensorBoard events in %s not fully written: %s", writer.logdir, e)
        writer.file_writer.event_writer._closed = True  # noqa: SLF001 - its atexit hook checks this


def record_failure(cfg: DictConfig, run_dir: Path, error: Exception, writers: list) -> None:
    """metrics.json and HParams say `failed` with the error, where the disk still lets them."""
    result = {"status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0],
              "epochs": cfg.get("epochs"), "hparams": hparams_of(cfg), "provenance": provenance(cfg)}
    try:
        if not writers:
            writers.append(SummaryWriter(logdir=str(run_dir)))
        write_hparams(writers[0], cfg, result, 0)
        write_json(run_dir / "metrics.json", result)
    except OSError as e:  # e.g. the full disk that made it fail
        log.error("could not record the failure in %s: %s", run_dir, e)


def input_pipeline(run_dir: Path, resume: bool) -> str:
    """The input pipeline (preprocess.pipeline) of a run: a resumed run keeps the one it began
    with (runs from before data format 2 recorded none: Pillow's), a new one gets MindSpore's."""
    config = run_dir / "config.yaml"
    if resume and (run_dir / "checkpoints" / "last.ckpt").exists() and config.is_file():
        return str(OmegaConf.select(OmegaConf.load(config), "preprocess.pipeline", default="pil"))
    return "mindspore"


def _train(cfg: DictConfig, run_dir: Path, writers: list, group: Group = Group()) -> dict:
    """The training itself. With several ranks, every rank runs all of it on its part of each
    batch, and only rank 0 writes (checkpoints, TensorBoard, history, metrics, evaluation)."""
    start_time = time.perf_counter()
    main = group.is_main
    ms.set_seed(cfg.seed)  # weight init; data order, augmentation and dropout come from (seed, step)

    data_dir = Path(cfg.data.dir)
    manifest = read_manifest(data_dir)
    spec = preprocess_spec(manifest, cfg.data.image_size, cfg.model.in_channels, cfg.data.equalize,
                           pipeline=input_pipeline(run_dir, cfg.train.resume))
    task, classes = check_task(manifest, cfg.task.name, data_dir)
    # (reading the records also checks the files: a damaged one is one line now, not later)
    train = task_records(split_file(data_dir, manifest, "train"), task)
    val = task_records(split_file(data_dir, manifest, "val"), task)
    train_counts = np.bincount(train.targets, minlength=len(classes)).tolist()
    val_ds = make_eval_dataset(val, spec, cfg.batch_size, workers=cfg.data.workers)
    cam_set = fixed_val_images(val, spec, classes, cfg.train.cam_images) if main else None
    steps_per_epoch = len(train.targets) // cfg.batch_size
    if steps_per_epoch == 0:
        raise XrayError(f"batch_size={cfg.batch_size} is larger than the train split "
                        f"({len(train.targets)} images); lower batch_size")
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(cfg.train.max_steps_per_epoch))

    lr = lr_schedule(float(cfg.lr), cfg.optim, cfg.epochs, steps_per_epoch)
    net, loss_fn, optimizer, scaler, step_fn = build_training(cfg, cfg.data.image_size, train_counts,
                                                              lr, group)

    ckpt_dir = run_dir / "checkpoints"
    last_ckpt, best_ckpt = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    history_path = run_dir / "history.jsonl"
    state, history = RunState(), []
    if cfg.train.resume and last_ckpt.exists():
        state = load_state(last_ckpt, optimizer)
        if history_path.exists():
            history = [json.loads(line) for line in history_path.read_text().splitlines()]
            history = [h for h in history if h["epoch"] <= state.epoch]
        if scaler is not None and state.loss_scale > 0:
            scaler.scale_value.set_data(ms.Tensor(state.loss_scale, ms.float32))
        log.info("resume: %s after epoch %d step %d (best val AUC %.4f at epoch %d)",
                 last_ckpt, state.epoch, state.step_in_epoch, state.best_auc, state.best_epoch)
    elif cfg.train.resume:
        log.info("resume: no %s yet, starting from scratch", last_ckpt)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # best.ckpt + last.ckpt (weights and momenta) + a temp copy while one is replaced
        ensure_space(ckpt_dir, 4 * checkpoint_bytes(net) - (sum(f.stat().st_size for f in ckpt_dir.glob("*.ckpt"))),
                     "this run's checkpoints")
        # the run's resolved config + preprocessing: all evaluate/predict need to rebuild the input
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["preprocess"] = spec.to_dict()
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))

    global_step = state.epoch * steps_per_epoch + state.step_in_epoch
    # purge_step: on resume, TensorBoard drops events an interrupted run logged after the checkpoint
    if main:
        writer = SummaryWriter(logdir=str(run_dir), purge_step=global_step or None, flush_secs=10)
        writers.append(writer)
    else:
        writer = NullWriter()
    guard = PreemptionGuard(group)
    log.info("train: %s, task %s (%s), %d train / %d val images, %d steps/epoch, input %dx%d, "
             "loss=%s lr=%g momentum=%g, device %s (%s mode), %d rank(s)", data_dir, task, " / ".join(classes),
             len(train.targets), len(val.targets), steps_per_epoch, spec.image_size,
             spec.image_size, cfg.loss.name, cfg.lr, cfg.momentum, cfg.device_target, cfg.mode, group.size)
    status, train_time, train_images = "ok", 0.0, 0

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        losses: list[float] = []
        if state.step_in_epoch < steps_per_epoch:  # (a job stopped in an epoch's last step has none left)
            batches = make_train_dataset(train, spec, cfg.batch_size, cfg.seed, epoch,
                                         state.step_in_epoch, cfg.data.augment, cfg.data.sampling,
                                         cfg.data.workers, group.rank, group.size)
            losses, global_step = train_epoch(step_fn, net, batches, steps_per_epoch - state.step_in_epoch,
                                              lr, writer, global_step, epoch, cfg.train.log_every, guard)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        train_images += len(losses) * cfg.batch_size
        state.step_in_epoch += len(losses)
        state.epoch_loss_sum += float(np.sum(losses))
        if not all(map(math.isfinite, losses)):
            status = "diverged"
            log.warning("epoch %d: loss is %s, stopping (status: diverged)", epoch, losses[-1])
            break
        if guard.stop_requested():  # time limit or preemption: save where we are, let submitit requeue
            state.loss_scale = current_scale(scaler)
            if main:
                save_ckpt(optimizer, last_ckpt, asdict(state))
            writer.close()
            log.warning("epoch %d step %d: stopping for requeue, state saved to %s", epoch,
                        state.step_in_epoch, last_ckpt)
            guard.hand_over()
        entry = end_epoch(epoch, state, net, loss_fn, val_ds, classes, writer, global_step, lr,
                          epoch_time, best_ckpt if main else None, cfg)
        if cam_set is not None:  # where the model looks, epoch by epoch
            writer.add_figure("val/grad_cam", cam_panel(net, *cam_set), global_step - 1)
        history.append(entry)
        state.loss_scale = current_scale(scaler)
        if main:
            write_text(history_path, "".join(to_json(h) + "\n" for h in history))
            save_ckpt(optimizer, last_ckpt, asdict(state))

    train_wall = time.perf_counter() - start_time
    result = {
        "status": status,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs": cfg.epochs,
        "best_epoch": state.best_epoch or None,
        "best_val": next(({k[4:]: v for k, v in h.items() if k.startswith("val_")}
                          for h in history if h["epoch"] == state.best_epoch), None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "wall_time_s": round(train_wall, 2),
        "train_images_per_s": round(train_images / train_time, 2) if train_time else None,
        "best_checkpoint": str(best_ckpt) if best_ckpt.exists() else None,
        "ranks": group.size,
        "hparams": hparams_of(cfg),
        "provenance": provenance(cfg),
    }
    if not main:  # rank 0 evaluates and writes the result
        guard.release()
        return result
    if status == "ok" and best_ckpt.exists():
        result["eval"] = evaluate_splits(best_ckpt, data_dir, manifest, cfg, guard)
        result["eval_time_s"] = round(time.perf_counter() - start_time - train_wall, 2)
    if status == "ok" and not cfg.train.keep_last:
        last_ckpt.unlink(missing_ok=True)  # optimizer state is only needed to resume
    write_hparams(writer, cfg, result, global_step)
    writer.add_text("provenance", "    " + to_json(result["provenance"], indent=2).replace("\n", "\n    "))
    writer.close()
    write_json(run_dir / "metrics.json", result)
    guard.release()
    log.info("done: status %s, best val AUC %s at epoch %s, %.0f s -> %s", status,
             f"{state.best_auc:.4f}" if state.best_epoch else "n/a", result["best_epoch"],
             result["wall_time_s"], run_dir)
    return result


def mixed_precision(net: nn.Cell, level: str) -> nn.Cell:
    """The network the training step runs: `net` itself for O0, else MindSpore's auto mixed
    precision of it (same Parameter objects, so the optimizer, the checkpoints and the
    evaluation keep using `net`)."""
    if level == "O0":
        return net
    # O1 rewrites the network's source into ./rewritten_network/ and imports it from there
    # (MindSpore's jit reads it again later): keep that out of the user's folder
    here = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="xray-amp-"))
    try:
        return ms.amp.auto_mixed_precision(net, level)
    finally:
        os.chdir(here)


def loss_scaler(level: str) -> Optional[ms.amp.DynamicLossScaler]:
    """Dynamic loss scaling for fp16 training (halved after an overflow, doubled after 1000
    clean steps), None in fp32."""
    if level == "O0":
        return None
    return ms.amp.DynamicLossScaler(scale_value=2.0 ** 16, scale_factor=2, scale_window=1000)


def current_scale(scaler: Optional[ms.amp.DynamicLossScaler]) -> float:
    return float(scaler.scale_value.asnumpy()) if scaler is not None else 0.0


def build_training(cfg: DictConfig, image_size: int, class_counts: list[int], lr: np.ndarray,
                   group: Group = Group()):
    """(net, loss_fn, optimizer, scaler, step): the network and the step the training loop runs,
    from the config (train.amp included); xray.bench and xray.doctor time this same step."""
    net = build_model(cfg.model, image_size, len(class_counts))
    loss_fn = build_loss(cfg.loss, len(class_counts), class_counts)
    optimizer = build_optimizer(net, cfg, lr)
    scaler = loss_scaler(cfg.train.amp)
    step = make_step(cfg, mixed_precision(net, cfg.train.amp), loss_fn, optimizer, scaler, group)
    return net, loss_fn, optimizer, scaler, step


def make_step(cfg: DictConfig, net: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Cell,
              scaler: Optional[ms.amp.DynamicLossScaler] = None, group: Group = Group()):
    """step(x, y, global_step) -> loss: one optimizer step, with the step's dropout masks.
    With a loss scaler (mixed precision), a step whose gradients overflow is skipped and the
    scale lowered.

    Data-parallel: x, y are this rank's part of the global batch; the gradients (and the loss
    returned) are averaged over the ranks, so that a step equals a one-rank step on the global
    batch, and the dropout masks are this rank's rows of the global batch's masks."""
    reduce_grads = grad_reducer(optimizer.parameters, group)
    mean_loss = mean_over_ranks(group)
    if scaler is None:
        def forward(x, y, mask1, mask2):
            return loss_fn(net(x, mask1, mask2), y)

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

        def train_step(x, y, mask1, mask2):
            loss, grads = grad_fn(x, y, mask1, mask2)
            optimizer(reduce_grads(grads))
            return mean_loss(loss)
    else:
        def scaled_forward(x, y, mask1, mask2):
            loss = loss_fn(net(x, mask1, mask2).astype(ms.float32), y)
            return scaler.scale(loss), loss

        grad_fn = ms.value_and_grad(scaled_forward, None, optimizer.parameters, has_aux=True)

        def train_step(x, y, mask1, mask2):
            (_, loss), grads = grad_fn(x, y, mask1, mask2)
            grads = reduce_grads(grads)  # (an overflow on one rank is one on all)
            finite = ms.amp.all_finite(grads)
            if finite:
                optimizer(scaler.unscale(grads))
            scaler.adjust(finite)
            return mean_loss(loss)

    if cfg.mode == "graph":
        train_step = ms.jit(train_step)
    compiled = []

    def step(x, y, global_step: int):
        rows = group.slice(x.shape[0] * group.size)
        masks = [m[rows] for m in dropout_masks(float(cfg.model.dropout), x.shape[0] * group.size,
                                                 cfg.seed, global_step)]
        if compiled or scaler is None:
            return train_step(x, y, *(ms.Tensor(m) for m in masks))
        try:  # the first mixed-precision step tells whether this device runs the level
            loss = train_step(x, y, *(ms.Tensor(m) for m in masks))
        except (RuntimeError, TypeError, ValueError) as e:
            raise XrayError(f"train.amp={cfg.train.amp} does not run on {cfg.device_target} here "
                            f"({str(e).strip().splitlines()[0][:160]}); use train.amp=O0") from None
        compiled.append(True)
        return loss

    return step


def fixed_val_images(records, spec, classes: tuple, count: int):
    """(inputs, captions, classes) of `count` validation images, the first of each class in
    turn, or None."""
    if count <= 0:
        return None
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
    return np.stack([found[i][0] for i in wanted]), [found[i][1] for i in wanted], classes


def end_epoch(epoch: int, state: RunState, net: nn.Cell, loss_fn: nn.Cell, val_ds, classes: tuple,
              writer: SummaryWriter, global_step: int, lr: np.ndarray, epoch_time: float,
              best_ckpt: Optional[Path], cfg: DictConfig) -> dict:
    """Validate, keep best.ckpt, log; advances `state` to the next epoch. Returns the epoch's
    history entry. Events go at the epoch's last step, so that a resume (purge_step = the next
    step) never drops them."""
    train_loss = state.epoch_loss_sum / max(state.step_in_epoch, 1)
    y, p, val_loss = validate(net, loss_fn, val_ds)
    val = log_validation(writer, y, p, classes, val_loss, global_step - 1, epoch)
    writer.add_scalar("train/epoch_loss", train_loss, global_step - 1)
    entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
             **{f"val_{k}": v for k, v in val.items()},
             "lr": float(lr[min(global_step, len(lr)) - 1]), "time_s": round(epoch_time, 2)}
    improved = not math.isnan(val["auc"]) and val["auc"] > state.best_auc
    if improved:
        state.best_auc, state.best_epoch = val["auc"], epoch
        if best_ckpt is not None:  # (None: a rank other than 0, which writes nothing)
            save_ckpt(net, best_ckpt, {"epoch": epoch, "val_auc": state.best_auc})
    rates = (f"sens {val['sensitivity']:.3f}  spec {val['specificity']:.3f}" if len(classes) == 2
             else f"bal_acc {val['balanced_accuracy']:.3f}")
    log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f  acc %.3f  %s  lr %.2e  "
             "%.1f img/s  %.1f s%s", epoch, cfg.epochs, train_loss, val_loss, val["auc"],
             val["accuracy"], rates, entry["lr"], state.step_in_epoch * cfg.batch_size / epoch_time,
             epoch_time, "  *best*" if improved else "")
    state.epoch, state.step_in_epoch, state.epoch_loss_sum = epoch, 0, 0.0
    return entry


def evaluate_splits(checkpoint: Path, data_dir: Path, manifest: dict, cfg: DictConfig,
                    guard: PreemptionGuard) -> dict:
    """Evaluate the val-chosen checkpoint on each of train.eval_splits the data set has
    (eval_<split>.json etc. in the run folder); returns {split: {youden: {..}, at_0.5: {..}}}
    with the point values, or {split: {error: ..}}: the training result stands whatever
    happens here. Nothing here feeds back into training or checkpoint choice. Stops early
    when the job's time is up (the result is written before the scheduler kills it)."""
    from xray.evaluate import ThresholdRule, chosen_thresholds, evaluate, summary

    out: dict = {}
    val_thresholds = None  # chosen on val once, for every split
    splits = sorted(cfg.train.eval_splits or [], key=lambda s: s != "val")
    for split in splits:
        if guard.pending:
            log.warning("eval: time is up, %s not evaluated", split)
            out[split] = {"error": "not evaluated: the job's time limit was near"}
            continue
        if not (manifest["splits"].get(split) or {}).get("file"):
            log.info("eval: %s has no %s split, skipped", data_dir, split)
            continue
        try:
            result = evaluate([checkpoint], split, data_dir, batch_size=cfg.batch_size,
                              bootstrap=cfg.train.eval_bootstrap, workers=cfg.data.workers,
                              val_thresholds=val_thresholds,
                              threshold_rule=ThresholdRule.of(cfg.train))
        except Exception as e:  # noqa: BLE001 - recorded; the trained model is still good
            log.error("eval: %s failed: %s", split, e)
            out[split] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            continue
        if split == "val":  # (a K-class task decides by argmax; a subtype model's read-offs have theirs)
            val_thresholds = chosen_thresholds(result)
        out[split] = summary(result)
    return out


def train_epoch(step_fn, net: nn.Cell, dataset, steps: int, lr: np.ndarray,
                writer: SummaryWriter, global_step: int, epoch: int, log_every: int,
                guard: Optional["PreemptionGuard"] = None) -> tuple[list[float], int]:
    """Up to `steps` steps over the epoch's batches (`step_fn(x, y, global_step)` -> loss);
    stops early at a non-finite loss (returned last) or when the guard has a pending stop
    request."""
    net.set_train(True)
    losses: list[float] = []
    for step, (x, y) in enumerate(dataset.create_tuple_iterator(num_epochs=1)):
        if step >= steps or (guard is not None and guard.stop_requested()):
            break
        loss = float(step_fn(x, y, global_step).asnumpy())
        losses.append(loss)
        if not math.isfinite(loss):
            break
        writer.add_scalar("train/loss", loss, global_step)
        writer.add_scalar("train/lr", float(lr[min(global_step, len(lr) - 1)]), global_step)
        global_step += 1
        if (step + 1) % log_every == 0:
            log.info("epoch %d step %d/%d  loss %.4f", epoch, step + 1, steps, loss)
    return losses, global_step


def log_validation(writer: SummaryWriter, y: np.ndarray, probs: np.ndarray, classes: tuple,
                   val_loss: float, step: int, epoch: int) -> dict:
    """Validation metrics (two classes: at threshold 0.5; more: of the argmax; AUC = macro
    one-vs-rest), written to TensorBoard; returns them."""
    val = task_metrics(y, probs, classes)
    writer.add_scalar("val/loss", val_loss, step)
    for k, v in val.items():
        if k not in ("ppv", "npv") and math.isfinite(v):  # e.g. no AUC on a one-class split
            writer.add_scalar(f"val/{k}", v, step)
    cm = confusion_k(y, probs[:, 1] >= 0.5 if len(classes) == 2 else probs.argmax(axis=1), len(classes))
    writer.add_figure("val/confusion_matrix", confusion_figure(cm, f"val, epoch {epoch}", classes), step)
    if len(classes) == 2:
        writer.add_pr_curve("val/pr_curve", y, probs[:, 1], step)
    else:  # one precision-recall curve per class, one-vs-rest
        for c, name in enumerate(classes):
            writer.add_pr_curve(f"val/pr_curve/{name}", y == c, probs[:, c], step)
    return val


def link_job_logs(run_dir: Path) -> None:
    """Inside a submitit (Slurm) job: slurm.out / slurm.err in the run folder point at the
    job's log files, so every run says where its logs are."""
    if not in_batch_job():
        return
    import submitit

    paths = submitit.JobEnvironment().paths
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("slurm.out", paths.stdout), ("slurm.err", paths.stderr)):
        link = run_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@one_line_errors
def main(cfg: DictConfig) -> Optional[float]:
    faulthandler.enable(all_threads=True)  # a crash inside MindSpore's C++ still says where Python was
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if launched_rank() > 0:  # only rank 0 writes into the run folder (its train.log included)
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(handler)
    else:
        link_job_logs(run_dir)
    result = train(cfg, run_dir)
    best = result["best_val"] or {}
    return best.get("auc")  # for Hydra sweepers that optimize the return value


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.train import main as entrypoint

    entrypoint()
