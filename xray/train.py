"""Train AlexNet on a converted data set; logs to TensorBoard, checkpoints best/last.

    python -m xray.train lr=0.01 momentum=0.9 loss=softmax_ce [data=sample] [epochs=..]
    python -m xray.train -m lr=1e-3,1e-2 loss=mse,softmax_ce momentum=0.9,0.99

Everything lands in the Hydra run dir: config.yaml, history.jsonl, metrics.json,
checkpoints/{last,best}.ckpt and the TensorBoard event file.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import hydra
import mindspore as ms
import numpy as np
from hydra.core.hydra_config import HydraConfig
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary

from xray import CONF_DIR
from xray.data import (make_eval_dataset, make_train_dataset, preprocess_spec, read_labels,
                       read_manifest, split_file)
from xray.device import setup_device
from xray.errors import XrayError, in_batch_job, one_line_errors
from xray.files import write_json, write_text
from xray.labels import CLASSES, POSITIVE
from xray.losses import build_loss
from xray.metrics import binary_metrics, confusion
from xray.model import build_model, dropout_masks
from xray.plots import confusion_figure

log = logging.getLogger(__name__)

INTENSITY = ("brightness", "contrast", "gamma", "blur", "noise")  # data.augment strengths

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


def predict_split(net: nn.Cell, loss_fn: nn.Cell, dataset) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, p(pneumonia), mean loss) over a whole eval dataset."""
    net.set_train(False)
    labels, probs, loss_sum = [], [], 0.0
    for x, y in dataset.create_tuple_iterator(num_epochs=1):  # net(x): no dropout masks
        logits = net(x)
        loss_sum += float(loss_fn(logits, y).asnumpy()) * len(y)
        probs.append(ops.softmax(logits, axis=1)[:, POSITIVE].asnumpy())
        labels.append(y.asnumpy())
    y, p = np.concatenate(labels), np.concatenate(probs)
    return y, p, loss_sum / max(len(y), 1)


def hparams_of(cfg: DictConfig) -> dict:
    """The run's hyper-parameters for TensorBoard's HParams dashboard (same keys every run)."""
    return {
        "lr": float(cfg.lr), "momentum": float(cfg.momentum), "loss": str(cfg.loss.name),
        "class_weighted": bool(cfg.loss.class_weighted),
        "label_smoothing": float(cfg.loss.label_smoothing), "sampling": str(cfg.data.sampling),
        "batch_size": int(cfg.batch_size),
        "epochs": int(cfg.epochs), "seed": int(cfg.seed), "schedule": str(cfg.optim.schedule),
        "warmup_epochs": int(cfg.optim.warmup_epochs),
        "weight_decay": float(cfg.optim.weight_decay), "image_size": int(cfg.data.image_size),
        "lrn": bool(cfg.model.lrn), "dropout": float(cfg.model.dropout),
        "augment": bool(cfg.data.augment.enabled),
        **{f"augment_{k}": float(cfg.data.augment[k]) if cfg.data.augment.enabled else 0.0
           for k in INTENSITY},
        "equalize": str(cfg.data.equalize), "data": str(cfg.data.name),
    }


def write_hparams(writer: SummaryWriter, cfg: DictConfig, result: dict, step: int) -> None:
    """HParams into the run's own event file (tensorboardX's add_hparams would make a
    time-stamped sub-run)."""
    best = result.get("best_val") or {}
    metrics = {
        "hparam/best_val_auc": best.get("auc", float("nan")),
        "hparam/best_val_accuracy": best.get("accuracy", float("nan")),
        "hparam/final_train_loss": result.get("final_train_loss") or float("nan"),
        "hparam/diverged": float(result["status"] == "diverged"),
        # the val-chosen checkpoint on the test split, at the val-chosen threshold
        **{f"hparam/test_{k}": ((result.get("eval") or {}).get("test") or {}).get("youden", {}).get(k, float("nan"))
           for k in ("auc", "accuracy", "sensitivity", "specificity")},
    }
    exp, ssi, sei = hparams_summary({**hparams_of(cfg), "status": result["status"]}, metrics)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)


class PreemptionGuard:
    """Under submitit, SIGUSR2 means "time limit near, or preempted". Remember it so that the
    training loop can save last.ckpt at the next step boundary, then hand over to submitit's
    own handler, which requeues the job and exits. Outside submitit it does nothing."""

    def __init__(self) -> None:
        self.pending: Optional[tuple] = None
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

    def hand_over(self) -> None:
        signal.signal(signal.SIGUSR2, self.previous)
        self.previous(*self.pending)  # requeues and raises SystemExit


def save_ckpt(obj: nn.Cell, path: Path, meta: dict) -> None:
    """save_checkpoint to a temp name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.stem}.tmp.ckpt")
    ms.save_checkpoint(obj, str(tmp), append_dict=meta)
    tmp.replace(path)


def load_resume_state(path: Path, optimizer: nn.Cell) -> dict:
    """Load weights + optimizer state from last.ckpt; returns its bookkeeping values."""
    params = ms.load_checkpoint(str(path))
    keys = ("epoch", "best_auc", "best_epoch", "step_in_epoch", "epoch_loss_sum")
    meta = {k: float(params.pop(k).asnumpy()) if k in params else 0.0 for k in keys}
    params.pop("learning_rate", None)  # the schedule comes from the config, not the file
    ms.load_param_into_net(optimizer, params, strict_load=True)
    return meta


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train per `cfg`, writing everything into `run_dir`; returns the metrics.json content.
    A run that raises still leaves metrics.json and HParams saying `failed`, then re-raises."""
    run_dir = Path(run_dir)
    try:
        return _train(cfg, run_dir)
    except Exception as e:
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0],
                  "epochs": cfg.epochs, "hparams": hparams_of(cfg)}
        with SummaryWriter(logdir=str(run_dir)) as writer:
            write_hparams(writer, cfg, result, 0)
        write_json(run_dir / "metrics.json", result)
        raise


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    start_time = time.perf_counter()
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    setup_device(cfg.device_target, cfg.mode)
    ms.set_seed(cfg.seed)  # weight init; data order, augmentation and dropout come from (seed, step)

    data_dir = Path(cfg.data.dir)
    manifest = read_manifest(data_dir)
    spec = preprocess_spec(manifest, cfg.data.image_size, cfg.model.in_channels, cfg.data.equalize)
    train_counts = [manifest["splits"]["train"]["classes"][c] for c in CLASSES]
    train_file = split_file(data_dir, manifest, "train")
    train_labels = read_labels(train_file)
    val_ds = make_eval_dataset(split_file(data_dir, manifest, "val"), spec, cfg.batch_size,
                               workers=cfg.data.workers)
    steps_per_epoch = len(train_labels) // cfg.batch_size
    if steps_per_epoch == 0:
        raise XrayError(f"batch_size={cfg.batch_size} is larger than the train split "
                        f"({len(train_labels)} images); lower batch_size")
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(cfg.train.max_steps_per_epoch))

    def epoch_data(epoch: int, start_batch: int):
        return make_train_dataset(train_file, spec, cfg.batch_size, train_labels, cfg.seed, epoch,
                                  start_batch, cfg.data.augment, cfg.data.sampling, cfg.data.workers)

    # the run's resolved config + preprocessing: all evaluate/predict need to rebuild the input
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["preprocess"] = spec.to_dict()
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))

    net = build_model(cfg.model, cfg.data.image_size)
    loss_fn = build_loss(cfg.loss, cfg.model.num_classes, train_counts)
    lr = lr_schedule(float(cfg.lr), cfg.optim, cfg.epochs, steps_per_epoch)
    optimizer = build_optimizer(net, cfg, lr)

    def forward(x, y, mask1, mask2):
        return loss_fn(net(x, mask1, mask2), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    def train_step(x, y, mask1, mask2):
        loss, grads = grad_fn(x, y, mask1, mask2)
        optimizer(grads)
        return loss

    if cfg.mode == "graph":
        train_step = ms.jit(train_step)

    def step_fn(x, y, global_step: int):
        masks = dropout_masks(float(cfg.model.dropout), x.shape[0], cfg.seed, global_step)
        return train_step(x, y, *(ms.Tensor(m) for m in masks))

    # first_epoch = epochs completed; step_in_epoch > 0 when a job was stopped mid-epoch
    first_epoch, best_auc, best_epoch, step_in_epoch, carried_loss = 0, -1.0, -1, 0, 0.0
    last_ckpt, best_ckpt = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    history_path = run_dir / "history.jsonl"
    history = []
    if cfg.train.resume and last_ckpt.exists():
        meta = load_resume_state(last_ckpt, optimizer)
        first_epoch, best_auc, best_epoch = int(meta["epoch"]), meta["best_auc"], int(meta["best_epoch"])
        step_in_epoch, carried_loss = int(meta["step_in_epoch"]), meta["epoch_loss_sum"]
        if history_path.exists():
            history = [json.loads(line) for line in history_path.read_text().splitlines()]
            history = [h for h in history if h["epoch"] <= first_epoch]
        log.info("resume: %s after epoch %d step %d (best val AUC %.4f at epoch %d)",
                 last_ckpt, first_epoch, step_in_epoch, best_auc, best_epoch)
    elif cfg.train.resume:
        log.info("resume: no %s yet, starting from scratch", last_ckpt)
    global_step = first_epoch * steps_per_epoch + step_in_epoch
    guard = PreemptionGuard()
    # purge_step: on resume, TensorBoard drops events an interrupted run logged after the checkpoint
    writer = SummaryWriter(logdir=str(run_dir), purge_step=global_step or None,
                           flush_secs=10)

    log.info("train: %s, %d train / %d val images, %d steps/epoch, input %dx%d, loss=%s lr=%g "
             "momentum=%g, device %s (%s mode)", data_dir, len(train_labels),
             manifest["splits"]["val"]["images"], steps_per_epoch, spec.image_size,
             spec.image_size, cfg.loss.name, cfg.lr, cfg.momentum, cfg.device_target, cfg.mode)
    status, train_time, train_images = "ok", 0.0, 0

    for epoch in range(first_epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        done_before, step_in_epoch = step_in_epoch, 0
        losses, global_step = train_epoch(step_fn, net, epoch_data(epoch, done_before),
                                          steps_per_epoch - done_before, lr, writer, global_step,
                                          epoch, cfg.train.log_every, guard)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        train_images += len(losses) * cfg.batch_size
        if not all(map(math.isfinite, losses)):
            status = "diverged"
            log.warning("epoch %d: loss is %s, stopping (status: diverged)", epoch, losses[-1])
            break
        if guard.pending:  # time limit or preemption: save where we are, let submitit requeue
            done = done_before + len(losses)
            save_ckpt(optimizer, last_ckpt, {
                "epoch": epoch - 1, "step_in_epoch": done, "best_auc": best_auc,
                "best_epoch": best_epoch, "epoch_loss_sum": carried_loss + float(np.sum(losses))})
            writer.close()
            log.warning("epoch %d step %d: stopping for requeue, state saved to %s", epoch, done, last_ckpt)
            guard.hand_over()
        epoch_loss = (carried_loss + float(np.sum(losses))) / (done_before + len(losses))
        carried_loss = 0.0

        # epoch-level events at the epoch's last step, so that a resume (purge_step =
        # the next step) never drops them
        y, p, val_loss = predict_split(net, loss_fn, val_ds)
        val = log_validation(writer, y, p, val_loss, global_step - 1, epoch)
        entry = {"epoch": epoch, "train_loss": epoch_loss, "val_loss": val_loss,
                 **{f"val_{k}": v for k, v in val.items()},
                 "lr": float(lr[min(global_step, len(lr)) - 1]), "time_s": round(epoch_time, 2)}
        history.append(entry)
        write_text(history_path, "".join(json.dumps(h) + "\n" for h in history))
        writer.add_scalar("train/epoch_loss", entry["train_loss"], global_step - 1)

        improved = not math.isnan(val["auc"]) and val["auc"] > best_auc
        if improved:
            best_auc, best_epoch = val["auc"], epoch
            save_ckpt(net, best_ckpt, {"epoch": epoch, "val_auc": best_auc})
        save_ckpt(optimizer, last_ckpt, {"epoch": epoch, "best_auc": best_auc,
                                         "best_epoch": best_epoch})
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f  acc %.3f  "
                 "sens %.3f  spec %.3f  lr %.2e  %.1f img/s  %.1f s%s", epoch, cfg.epochs,
                 entry["train_loss"], val_loss, val["auc"], val["accuracy"],
                 val["sensitivity"], val["specificity"], entry["lr"],
                 len(losses) * cfg.batch_size / epoch_time, epoch_time,
                 "  *best*" if improved else "")

    best_val = next(({k[4:]: v for k, v in h.items() if k.startswith("val_")}
                     for h in history if h["epoch"] == best_epoch), None)
    train_wall = time.perf_counter() - start_time
    evaluated = {}
    if status == "ok" and best_ckpt.exists():
        evaluated = evaluate_splits(best_ckpt, data_dir, manifest, cfg)
    result = {
        "status": status,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch if best_epoch > 0 else None,
        "best_val": best_val,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "wall_time_s": round(train_wall, 2),
        "eval": evaluated,
        "eval_time_s": round(time.perf_counter() - start_time - train_wall, 2),
        "train_images_per_s": round(train_images / train_time, 2) if train_time else None,
        "best_checkpoint": str(best_ckpt) if best_ckpt.exists() else None,
        "hparams": hparams_of(cfg),
    }
    write_hparams(writer, cfg, result, global_step)
    writer.close()
    write_json(run_dir / "metrics.json", result)
    guard.release()
    log.info("done: status %s, best val AUC %s at epoch %s, %.0f s -> %s", status,
             f"{best_auc:.4f}" if best_epoch > 0 else "n/a", result["best_epoch"],
             result["wall_time_s"], run_dir)
    return result


def evaluate_splits(checkpoint: Path, data_dir: Path, manifest: dict, cfg: DictConfig) -> dict:
    """Evaluate the val-chosen checkpoint on each of train.eval_splits the data set has
    (eval_<split>.json etc. in the run folder); returns {split: {youden: {..}, at_0.5: {..}}}
    with the point values. Nothing here feeds back into training or checkpoint choice."""
    from xray.evaluate import evaluate, summary

    out = {}
    for split in cfg.train.eval_splits or []:
        if not (manifest["splits"].get(split) or {}).get("file"):
            log.info("eval: %s has no %s split, skipped", data_dir, split)
            continue
        out[split] = summary(evaluate([checkpoint], split, data_dir, batch_size=cfg.batch_size,
                                      bootstrap=cfg.train.eval_bootstrap, workers=cfg.data.workers))
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
        if step >= steps or (guard is not None and guard.pending):
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


def log_validation(writer: SummaryWriter, y: np.ndarray, p: np.ndarray, val_loss: float,
                   step: int, epoch: int) -> dict:
    """Validation metrics at threshold 0.5, written to TensorBoard; returns them."""
    val = binary_metrics(y, p, 0.5)
    writer.add_scalar("val/loss", val_loss, step)
    for k in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"):
        writer.add_scalar(f"val/{k}", val[k], step)
    writer.add_figure("val/confusion_matrix",
                      confusion_figure(confusion(y, p, 0.5), f"val, epoch {epoch}"), step)
    writer.add_pr_curve("val/pr_curve", y, p, step)
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
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    link_job_logs(run_dir)
    result = train(cfg, run_dir)
    best = result["best_val"] or {}
    return best.get("auc")  # for Hydra sweepers that optimize the return value


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.train import main as entrypoint

    entrypoint()
