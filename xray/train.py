"""Train AlexNet on a converted data set; logs to TensorBoard, checkpoints best/last.

    python -m xray.train lr=0.01 momentum=0.9 loss=softmax_ce [data=sample] [epochs=..]
    python -m xray.train -m lr=1e-3,1e-2 loss=mse,softmax_ce momentum=0.9,0.99

Everything lands in the Hydra run dir (xray.run_folder): config.yaml, history.jsonl,
metrics.json, checkpoints/{last,best}.ckpt (xray.checkpoint) and the TensorBoard event file.
Read `fit` top to bottom: it is the whole training.
"""
from __future__ import annotations

import faulthandler
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import mindspore as ms
import numpy as np
from hydra.core.hydra_config import HydraConfig
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf

from xray import CONF_DIR
from xray.averaging import WeightAverage
from xray.callbacks import GradCamImages, PreemptionGuard, RunWriter, TensorBoard
from xray.checkpoint import SavedState, TrainingState, check_identity, checkpoint_bytes, ensure_space, read_state
from xray.checks import TRAIN, check
from xray.data import (check_task, images_digest, make_eval_dataset, make_train_dataset, preprocess_spec,
                       read_manifest, split_file, split_images, task_records)
from xray.device import setup_device
from xray.distributed import (Group, average_batch_statistics, barrier, check_batch_split, die_on_sigterm,
                              init_group, join_slurm_job, launched_rank, leave_together, local_device,
                              release_group, timed_out_ranks)
from xray.errors import RunRefused, XrayError, one_line_errors
from xray.evaluate import evaluate_splits
from xray.hparams import hparams_of
from xray.metrics import task_metrics
from xray.provenance import provenance
from xray.registry import create_model, create_schedule
from xray.run_folder import RunFolder
from xray.run_lock import FolderLock
from xray.step import build_training, release_compiled

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train per `cfg`, writing everything into `run_dir`; returns the metrics.json content.

    A run folder whose training already ended is left as it is (its result is returned;
    overwrite=true starts it over); one that another job is training is refused. A run that
    raises leaves metrics.json and HParams saying `failed`, then re-raises."""
    run = RunFolder(Path(run_dir))
    started = time.time()  # (a group's failure record of this job is newer)
    lock = FolderLock(run.path, "training")  # one writer per run folder, for the whole job
    try:
        lock.acquire()
        refuse_other_settings(cfg, run)
    except XrayError:
        lock.release()
        run.restore_hydra_record()  # Hydra rewrote .hydra/ for this refused start
        raise
    with lock:
        finished = run.finished_result()
        if finished is not None and not cfg.get("overwrite"):
            run.restore_hydra_record()
            log.info("%s already finished (status %s); not training it again (overwrite=true starts "
                     "it over)", run.path, finished["status"])
            return finished
        if launched_rank() == 0:
            run.keep_hydra_record()
            run.link_job_logs()  # (only a start that trains: a refused or no-op one keeps the run's links)
            run.remove_temp_files()  # a writer killed mid-write (we hold the lock: nobody else writes)
        opened: list[TensorBoard] = []  # the run's event file, once fit has opened it
        # a Slurm job of several tasks: one rank each (task 0 also starts the scheduler)
        scheduler = join_slurm_job(run.path / "scheduler.log")
        group = Group(rank=launched_rank())  # (until it has joined the others)
        try:
            check(cfg, TRAIN)
            check_ranks(cfg)
            setup_device(cfg.device_target, cfg.mode, local_device())
            group = init_group()
            if group.size > 1:
                die_on_sigterm(lambda: run.record_failure(cfg, ended_by_sigterm(run), rank=group.rank, since=started))
            if cfg.get("overwrite") and group.is_main:
                run.start_over()
            barrier(group)
            result = fit(cfg, run, group, opened)
            leave_together(group)
            release_group(group)
            return result
        except Exception as e:
            if (group.is_main or group.size > 1) and not isinstance(e, RunRefused):  # (a refusal wrote nothing)
                try:
                    if group.is_main and not opened:
                        opened.append(TensorBoard(run.path, purge_step=0))
                except OSError:  # e.g. the full disk that made it fail
                    pass
                run.record_failure(cfg, e, opened[0].writer if opened else None,
                                   rank=group.rank if group.size > 1 else None, since=started)
            raise
        finally:
            for tensorboard in opened:
                tensorboard.close()
            release_compiled()  # (else each training in this process keeps its network)
            # the scheduler (task 0's child) ends by itself once every rank has finalized, which is
            # at their exit; after a failure the group is broken and it would wait in vain
            if scheduler is not None and sys.exc_info()[0] is not None:
                scheduler.kill()


def ended_by_sigterm(run: RunFolder) -> str:
    """Why a rank got SIGTERM: MindSpore ends the survivors of a group that lost a rank."""
    dead = timed_out_ranks(run.path / "scheduler.log")
    return ("ended by SIGTERM: its data-parallel group lost a rank (" + (dead[-1] if dead else
            "see scheduler.log and each rank's log") + ") or the job was cancelled")


def refuse_other_settings(cfg: DictConfig, run: RunFolder) -> None:
    """A run folder continues (or returns) only the training it holds: other settings for a
    finished or an interrupted run are refused, naming the keys, before anything is written."""
    if cfg.get("overwrite"):
        return
    changed = run.changed_settings(cfg)
    if changed:
        state = "finished" if run.finished_result() else "was begun"
        raise RunRefused(f"{run.path} {state} with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); rerun with its settings, start it over "
                         "with overwrite=true, or use another run folder (hydra.run.dir=...)")


def fit(cfg: DictConfig, run: RunFolder, group: Group, opened: list) -> dict:
    """The training loop. With several ranks, every rank runs all of it on its part of each
    batch, and only rank 0 writes (checkpoints, TensorBoard, history, metrics, evaluation)."""
    start_time = time.perf_counter()
    ms.set_seed(cfg.seed)  # weight init; data order, augmentation and dropout come from (seed, step)
    saved = read_state(run.last_ckpt) if cfg.train.resume and run.last_ckpt.exists() else None
    data = load_data(cfg, run, saved)
    lr = create_schedule(float(cfg.lr), cfg.optim, cfg.epochs, data.steps_per_epoch)
    net, loss_fn, optimizer, scaler, step_fn = build_training(cfg, cfg.data.image_size, data.train_counts, lr, group)
    average = (WeightAverage(net, create_model(cfg.model, cfg.data.image_size, len(data.classes)), cfg.train.ema_decay,
                             cfg.train.ema_every)
               if cfg.train.get("ema_decay") else None)  # (made after net: the same seed gives the same net)
    state = TrainingState(net, optimizer, scaler, data.identity, average=average)
    if saved is not None:
        state.restore(saved)
        log.info("resume: %s after epoch %d step %d (best val AUC %.4f at epoch %d)", run.last_ckpt,
                 state.run.epoch, state.run.step_in_epoch, state.run.best_auc, state.run.best_epoch)
    elif cfg.train.resume:
        log.info("resume: no %s yet, starting from scratch", run.last_ckpt)
    if group.is_main:
        prepare_folder(run, cfg, state, data)
    earlier = state.run.wall_time_s  # the jobs before this one, until the state it resumes from

    def save_state() -> None:  # last.ckpt carries the run's wall time so far
        state.run.wall_time_s = earlier + time.perf_counter() - start_time
        writer.state(state)

    global_step = state.run.epoch * data.steps_per_epoch + state.run.step_in_epoch
    # purge_step: on resume, TensorBoard drops events an interrupted run logged after the checkpoint
    tensorboard = TensorBoard(run.path, purge_step=global_step, enabled=group.is_main)
    opened.append(tensorboard)
    cams = GradCamImages(data.val, data.spec, data.classes, cfg.train.cam_images if group.is_main else 0)
    guard = PreemptionGuard(group)
    writer = RunWriter(run, enabled=group.is_main)
    describe(cfg, data, group)
    status, train_time, train_images = "ok", 0.0, 0

    for epoch in range(state.run.epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        steps = data.steps_per_epoch - state.run.step_in_epoch
        batches = make_train_dataset(data.train, data.spec, cfg.batch_size, cfg.seed, epoch,
                                     state.run.step_in_epoch, cfg.data.augment, cfg.data.sampling,
                                     cfg.data.workers, group.rank, group.size) if steps > 0 else []
        net.set_train(True)
        loss = 0.0
        try:
            for x, y in iterate(batches, steps):
                if guard.stop_requested():
                    break
                loss = float(step_fn(x, y, global_step).asnumpy())
                if average is not None:
                    average.update(global_step)
                state.run.step_in_epoch += 1
                state.run.epoch_loss_sum += loss
                train_images += cfg.batch_size
                if not math.isfinite(loss):
                    break
                tensorboard.step(global_step, loss, float(lr[min(global_step, len(lr) - 1)]))
                global_step += 1
                if state.run.step_in_epoch % cfg.train.log_every == 0:
                    log.info("epoch %d step %d/%d  loss %.4f", epoch, state.run.step_in_epoch, data.steps_per_epoch, loss)
        except RuntimeError:
            # a data worker that dies anyway after the time-limit signal (forked workers ignore it:
            # PreemptionGuard) must not fail the run: stop for requeue after the last whole step
            # (one rank: a group must stop together)
            if not (guard.time_is_up() and group.size == 1):
                raise
            log.warning("epoch %d: the data pipeline was interrupted by the time-limit signal", epoch)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        if not math.isfinite(loss):
            status = "diverged"
            log.warning("epoch %d: loss is %s, stopping (status: diverged)", epoch, loss)
            break
        if guard.stop_requested():  # time limit or preemption: save where we are, let submitit requeue
            save_state()
            tensorboard.close()
            log.warning("epoch %d step %d: stopping for requeue, state saved to %s", epoch,
                        state.run.step_in_epoch, run.last_ckpt)
            guard.hand_over()
        average_batch_statistics(net, group)  # (model.norm=batch on several ranks)
        model = state.model()  # what is validated and kept: the network, or its weight average
        if model is not net:  # (the average's own ema.* statistics stay each rank's: rank 0's are saved)
            average_batch_statistics(model, group)
        state.history.append(end_epoch(epoch, state, model, loss_fn, data, tensorboard, writer, global_step, lr,
                                       epoch_time, cfg))
        cams.epoch(model, tensorboard, global_step - 1)
        save_state()

    return finish(cfg, run, group, state, data, tensorboard, guard, status, global_step,
                  earlier, time.perf_counter() - start_time, train_time, train_images)


def iterate(batches, steps: int):
    """At most `steps` batches of an epoch's dataset."""
    if not batches:
        return
    for step, batch in enumerate(batches.create_tuple_iterator(num_epochs=1)):
        if step >= steps:
            return
        yield batch


@dataclass
class TrainingData:
    """The run's data: its splits as records, how an image becomes an input, what it is for."""

    dir: Path
    manifest: dict
    train: object
    val: object
    val_batches: object
    spec: object
    classes: tuple
    train_counts: list
    steps_per_epoch: int
    identity: dict
    train_images: list  # "<label>/<file name>" of the train split: evaluate refuses splits that share any


def load_data(cfg: DictConfig, run: RunFolder, saved: Optional[SavedState]) -> TrainingData:
    """Read the data set; a resumed run keeps the input pipeline it began with and refuses
    settings that contradict its checkpoint."""
    data_dir = Path(cfg.data.dir)
    manifest = read_manifest(data_dir)
    spec = preprocess_spec(manifest, cfg.data.image_size, cfg.model.in_channels, cfg.data.equalize,
                           pipeline=resumed_pipeline(saved, run) if saved else "mindspore")
    task, classes = check_task(manifest, cfg.task.name, data_dir)
    # (reading the records also checks the files: a damaged one is one line now, not later)
    train = task_records(split_file(data_dir, manifest, "train"), task)
    val = task_records(split_file(data_dir, manifest, "val"), task)
    train_images = split_images(data_dir, manifest, "train")
    identity = {"task": task, "classes": list(classes), "model": OmegaConf.to_container(cfg.model, resolve=True),
                "preprocess": spec.to_dict(),
                "data": {"train": images_digest(train_images),
                         "val": images_digest(split_images(data_dir, manifest, "val"))}}
    if saved is not None and saved.identity is not None:
        check_identity(saved.identity, identity, saved.path)
    steps_per_epoch = len(train.targets) // cfg.batch_size
    if steps_per_epoch == 0:
        raise XrayError(f"batch_size={cfg.batch_size} is larger than the train split "
                        f"({len(train.targets)} images); lower batch_size")
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(cfg.train.max_steps_per_epoch))
    return TrainingData(data_dir, manifest, train, val,
                        make_eval_dataset(val, spec, cfg.batch_size, workers=cfg.data.workers), spec, classes,
                        np.bincount(train.targets, minlength=len(classes)).tolist(), steps_per_epoch, identity,
                        train_images)


def resumed_pipeline(saved: SavedState, run: RunFolder) -> str:
    """The input pipeline of the run being resumed: its checkpoint's (format 2); runs of format
    1 recorded it in config.yaml, and those from before data format 2 recorded none (Pillow's)."""
    if saved.identity is not None:
        return saved.identity["preprocess"]["pipeline"]
    if run.config.is_file():
        return str(OmegaConf.select(OmegaConf.load(run.config), "preprocess.pipeline", default="pil"))
    return "pil"


def prepare_folder(run: RunFolder, cfg: DictConfig, state: TrainingState, data: TrainingData) -> None:
    """Room for the checkpoints before the first step, and the run's config beside them."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    # best.ckpt (weights) + last.ckpt (the whole state: weights and momenta) + a temp copy of the
    # larger while it is replaced
    existing = sum(f.stat().st_size for f in run.checkpoints.glob("*.ckpt"))
    needed = checkpoint_bytes(state.net) + 2 * checkpoint_bytes(state.parameters())
    ensure_space(run.checkpoints, needed - existing, "this run's checkpoints")
    run.write_config(cfg, data.spec.to_dict())
    run.write_train_images(data.train_images)


def describe(cfg: DictConfig, data: TrainingData, group: Group) -> None:
    log.info("train: %s, task %s (%s), %d train / %d val images, %d steps/epoch, input %dx%d, "
             "loss=%s lr=%g momentum=%g, device %s (%s mode), %d rank(s)", data.dir, data.identity["task"],
             " / ".join(data.classes), len(data.train.targets), len(data.val.targets), data.steps_per_epoch,
             data.spec.image_size, data.spec.image_size, cfg.loss.name, cfg.lr, cfg.momentum,
             cfg.device_target, cfg.mode, group.size)


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


def end_epoch(epoch: int, state: TrainingState, model: nn.Cell, loss_fn: nn.Cell, data: TrainingData,
              tensorboard: TensorBoard, writer: RunWriter, global_step: int, lr: np.ndarray, epoch_time: float,
              cfg: DictConfig) -> dict:
    """Validate `model`, keep it as best.ckpt (by val AUC), log; advances the state to the next
    epoch. Returns the epoch's history entry."""
    run = state.run
    train_loss = run.epoch_loss_sum / max(run.step_in_epoch, 1)
    y, p, val_loss = validate(model, loss_fn, data.val_batches)
    val = task_metrics(y, p, data.classes)
    tensorboard.epoch(global_step - 1, epoch, train_loss, val_loss, val, y, p, data.classes)
    entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
             **{f"val_{k}": v for k, v in val.items()},
             "lr": float(lr[min(global_step, len(lr)) - 1]), "time_s": round(epoch_time, 2)}
    improved = not math.isnan(val["auc"]) and val["auc"] > run.best_auc
    if improved:
        run.best_auc, run.best_epoch = val["auc"], epoch
        writer.best(model, state, epoch)
    rates = (f"sens {val['sensitivity']:.3f}  spec {val['specificity']:.3f}" if len(data.classes) == 2
             else f"bal_acc {val['balanced_accuracy']:.3f}")
    log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f  acc %.3f  %s  lr %.2e  "
             "%.1f img/s  %.1f s%s", epoch, cfg.epochs, train_loss, val_loss, val["auc"],
             val["accuracy"], rates, entry["lr"], run.step_in_epoch * cfg.batch_size / epoch_time,
             epoch_time, "  *best*" if improved else "")
    run.epoch, run.step_in_epoch, run.epoch_loss_sum = epoch, 0, 0.0
    return entry


def finish(cfg: DictConfig, run: RunFolder, group: Group, state: TrainingState, data: TrainingData,
           tensorboard: TensorBoard, guard: PreemptionGuard, status: str, global_step: int,
           earlier_jobs: float, this_job: float, train_time: float, train_images: int) -> dict:
    """The run's result: rank 0 evaluates best.ckpt on the eval splits and writes metrics.json.
    wall_time_s is the run's, over all its jobs (a resumed run's earlier jobs until the state it
    resumed from: work lost after a job's last save is not counted); wall_time_this_job_s this
    job's alone."""
    history = state.history
    result = {
        "status": status,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "epochs": cfg.epochs,
        "best_epoch": state.run.best_epoch or None,
        "best_val": next(({k[4:]: v for k, v in h.items() if k.startswith("val_")}
                          for h in history if h["epoch"] == state.run.best_epoch), None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "wall_time_s": round(earlier_jobs + this_job, 2),
        "wall_time_this_job_s": round(this_job, 2),
        "train_images_per_s": round(train_images / train_time, 2) if train_time else None,
        "best_checkpoint": str(run.best_ckpt) if run.best_ckpt.exists() else None,
        "ranks": group.size,
        "hparams": hparams_of(cfg),
        "provenance": provenance(cfg),
    }
    if not group.is_main:  # rank 0 evaluates and writes the result
        guard.release()
        return result
    if status == "ok" and run.best_ckpt.exists():
        eval_start = time.perf_counter()
        result["eval"] = evaluate_splits(run.best_ckpt, data.dir, data.manifest, cfg, guard.time_is_up)
        result["eval_time_s"] = round(time.perf_counter() - eval_start, 2)
    if status == "ok" and not cfg.train.keep_last:
        run.last_ckpt.unlink(missing_ok=True)  # optimizer state is only needed to resume
    tensorboard.result(cfg, result, global_step)
    tensorboard.close()
    run.write_result(result)
    guard.release()
    log.info("done: status %s, best val AUC %s at epoch %s, %.0f s -> %s", status,
             f"{state.run.best_auc:.4f}" if state.run.best_epoch else "n/a", result["best_epoch"],
             result["wall_time_s"], run.path)
    return result


def check_ranks(cfg: DictConfig) -> None:
    """batch_size is the global batch: it must split evenly over the ranks (known from the
    cluster variables before joining it, so that a mistake fails at once on every rank)."""
    ranks = int(os.environ.get("MS_WORKER_NUM", "1")) if os.environ.get("MS_ROLE") == "MS_WORKER" else 1
    check_batch_split(cfg.batch_size, ranks)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@one_line_errors
def main(cfg: DictConfig) -> Optional[float]:
    faulthandler.enable(all_threads=True)  # a crash inside MindSpore's C++ still says where Python was
    run = RunFolder(Path(HydraConfig.get().runtime.output_dir))
    if launched_rank() > 0:  # only rank 0 writes into the run folder (its train.log included)
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(handler)
    result = train(cfg, run.path)
    return (result["best_val"] or {}).get("auc")  # for Hydra sweepers that optimize the return value


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.train import main as entrypoint

    entrypoint()
