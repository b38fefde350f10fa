"""What a checkpoint holds, defined once: the training state of last.ckpt (to resume) and the
model of best.ckpt (to evaluate, predict, export), with a format version; and loading a trained
model with everything needed to feed it.

Format 4 (this one): last.ckpt = every network parameter (trainable or not) + the optimizer's
(momenta, step) + the weight average's parameters (`ema.<name>`, with train.ema_decay > 0) +
`RunState` (with the run's wall time so far) + the history + the run's identity (task, classes,
model, input preprocessing) + `format_version`; best.ckpt = the kept network's parameters (the
weight average's, with train.ema_decay > 0) + identity + epoch and val AUC. Format 3 was the same
without the wall time (a run resumed from one counts its time from there), format 2 without a
weight average. Format 1 (before it): last.ckpt held the optimizer's parameters and `RunState` only;
the history lived in history.jsonl, the input pipeline in config.yaml. Format 1 runs still
resume (`read_state` upgrades them) and evaluate."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf

from xray.calibration import load_temperature, scale
from xray.errors import RunRefused, XrayError
from xray.hparams import with_current_model_keys
from xray.files import flatten, fsync_file, replace_durably, to_json, write_json
from xray.labels import CLASSES, task_classes
from xray.registry import create_model
from xray.preprocess import Preprocess


def memory_available() -> Optional[int]:
    """Bytes the kernel can hand out now (MemAvailable: free + reclaimable page cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_checkpoint(path: Path) -> dict:
    """ms.load_checkpoint, judged against the memory that is really available.

    MindSpore 2.10 refuses a checkpoint larger than *free* memory (sysconf SC_AVPHYS_PAGES),
    which leaves out the page cache: on a node that has just written a few checkpoints that is
    a few hundred MB, and a 230 MB AlexNet checkpoint "exceeds current available memory"
    with 20 GB to spare. Ask for MemAvailable instead (MindSpore's own reading where there
    is no /proc/meminfo)."""
    from mindspore.train import serialization
    own = getattr(serialization, "_get_available_memory", None)
    if own is not None and not getattr(own, "reads_mem_available", False):
        def available() -> Optional[int]:
            return memory_available() or own()
        available.reads_mem_available = True
        available.mindspore_own = own
        serialization._get_available_memory = available
    return ms.load_checkpoint(str(path))


FORMAT_VERSION = 4
SPACE_MARGIN = 20_000_000  # bytes kept free beyond a checkpoint (logs, TensorBoard, JSON)


@dataclass
class RunState:
    """The loop's bookkeeping: where the run is and the best epoch so far."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done of the next epoch (a job stopped mid-epoch)
    epoch_loss_sum: float = 0.0  # their summed training loss
    best_auc: float = -1.0  # best val AUC so far, and its epoch (0: none yet)
    best_epoch: int = 0
    loss_scale: float = 0.0  # the dynamic loss scale of train.amp O1-O3 (0: fp32, no scaling)
    wall_time_s: float = 0.0  # the run's wall time until this state, over all its jobs (format 4)


@dataclass
class TrainingState:
    """Exactly what last.ckpt holds, and all a resumed run needs to continue where this one
    stopped: the network (all its parameters), the optimizer, the loss scaler (None in fp32),
    the loop's `RunState`, the history (one entry per finished epoch), the run's identity
    and the weight average (xray.averaging; None unless train.ema_decay > 0)."""

    net: nn.Cell
    optimizer: nn.Cell
    scaler: Optional[object]
    identity: dict
    run: RunState = field(default_factory=RunState)
    history: list = field(default_factory=list)
    average: Optional[object] = None

    def parameters(self) -> dict:
        """name -> Parameter: the network's (non-trainable ones too, e.g. batch-norm
        statistics), the optimizer's (the network's trainable ones, momenta, step) and the
        weight average's."""
        params = {p.name: p for p in self.net.get_parameters()}
        params.update(self.optimizer.parameters_dict())
        if self.average is not None:
            params.update(self.average.parameters())
        return params

    def model(self) -> nn.Cell:
        """The network the run validates and keeps: the weight average, or the trained network."""
        return self.average.network() if self.average is not None else self.net

    def save(self, path: Path) -> None:
        if self.scaler is not None:
            self.run.loss_scale = float(self.scaler.scale_value.asnumpy())
        save_checkpoint(self.parameters(), path, {**asdict(self.run), **self._texts()})

    def _texts(self) -> dict:
        return {"format_version": FORMAT_VERSION, "identity": to_json(self.identity),
                "history": to_json(self.history)}

    def restore(self, saved: "SavedState") -> None:
        """Load a state read by `read_state` into this one (same identity: see `check_identity`)."""
        params = {k: v for k, v in saved.params.items() if k != "learning_rate"}  # (from the config)
        try:
            missing = [name for cell in (self.optimizer, self.net)
                       for name in ms.load_param_into_net(cell, params)[0] if name != "learning_rate"]
            if self.average is not None:
                missing += self.average.restore(params)
        except (RuntimeError, ValueError) as e:  # e.g. a parameter of another shape
            missing = [str(e).splitlines()[0][:160]]
        if missing:
            raise XrayError(f"{saved.path} does not hold this model's state (missing {len(missing)} "
                            f"parameters, e.g. {missing[0]}); rerun with overwrite=true to start over")
        self.run, self.history = saved.run, list(saved.history)
        if self.scaler is not None and self.run.loss_scale > 0:
            self.scaler.scale_value.set_data(ms.Tensor(self.run.loss_scale, ms.float32))


@dataclass
class SavedState:
    """A last.ckpt as read from disk, before it is loaded into a network."""

    path: Path
    format_version: int
    params: dict
    run: RunState
    history: list
    identity: Optional[dict]  # None: format 1, which recorded none


def read_state(path: Path) -> SavedState:
    """Read last.ckpt (format 1 to 4) without a network; a damaged file or one of a newer
    format is one line."""
    try:
        params = read_checkpoint(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise XrayError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]}); "
                        "rerun with overwrite=true to start this run over") from None
    version = int(_scalar(params.pop("format_version", 1)))
    if version > FORMAT_VERSION:
        raise XrayError(f"{path} has checkpoint format {version}, newer than this xray's "
                        f"{FORMAT_VERSION}; update xray, or rerun with overwrite=true to start over")
    run = RunState(**{f.name: type(getattr(RunState, f.name))(_scalar(params.pop(f.name)))
                      for f in fields(RunState) if f.name in params})
    if version == 1:  # the history and the identity lived outside the checkpoint then
        history, identity = legacy_history(path, run.epoch), None
    else:
        history, identity = json.loads(params.pop("history")), json.loads(params.pop("identity"))
    return SavedState(path, version, params, run, history, identity)


def legacy_history(last_ckpt: Path, epochs_done: int) -> list:
    """Format 1: the history of epochs up to the checkpoint's, from the run's history.jsonl."""
    path = last_ckpt.parent.parent / "history.jsonl"
    if not path.exists():
        return []
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [h for h in history if h["epoch"] <= epochs_done]


def check_identity(saved: dict, wanted: dict, where: Path) -> None:
    """A checkpoint continues or serves only the run it was made for: name the first keys that
    differ (task, classes, model, input, the images of its train and val splits) and what to
    do. Keys the checkpoint does not record (added by a later xray) are not compared."""
    if "model" in saved:  # (recorded by an xray of before model.norm / model.init?)
        saved = {**saved, "model": with_current_model_keys(saved["model"])}
    saved, wanted = flatten(saved), flatten(wanted)
    differ = [key for key in wanted if key in saved and saved[key] != wanted[key]]
    if any(key.startswith("data.") for key in differ):
        splits = " and ".join(key[5:] for key in differ if key.startswith("data."))
        raise RunRefused(f"{where} was trained on other images: the {splits} split of this data set "
                         "differs (re-converted with other settings?); use the data set it was trained on "
                         "(data.dir), another run folder, or overwrite=true to start over")
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} there, {wanted[k]!r} asked" for k in differ[:3])
        raise RunRefused(f"{where} was made with other settings ({shown}); use the settings it was "
                         "made with, another run folder, or overwrite=true to start over")


def _scalar(value):
    return value.asnumpy().item() if hasattr(value, "asnumpy") else value


def checkpoint_bytes(params) -> int:
    """The size of a checkpoint of these parameters (a dict of them, or a Cell's)."""
    if isinstance(params, nn.Cell):
        params = params.parameters_dict()
    return sum(p.nbytes for p in params.values())


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """A full disk is one clear line before writing, not a half-written file after."""
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise XrayError(f"{folder} has {free / 1e6:.0f} MB free but {what} needs "
                        f"{(needed + SPACE_MARGIN) / 1e6:.0f} MB; free some space (e.g. the "
                        "checkpoints/last.ckpt of finished runs) and rerun: it resumes from its "
                        "last checkpoint")


def save_checkpoint(params: dict, path: Path, meta: dict) -> None:
    """Save to a temp name, then rename: a crash or a full disk never leaves half a checkpoint,
    nor a temp file, and the previous file stays until the new one is complete."""
    ensure_space(path.parent, checkpoint_bytes(params), path.name)
    tmp = path.with_name(f".{path.stem}.tmp.ckpt")
    try:
        ms.save_checkpoint([{"name": name, "data": p} for name, p in params.items()], str(tmp),
                           append_dict=meta)
        fsync_file(tmp)
        replace_durably(tmp, path)
    except BaseException:
        for leftover in path.parent.glob(f".{path.stem}.tmp.*"):  # MindSpore writes .tmp.tmp first
            leftover.unlink(missing_ok=True)
        raise


def save_model(net: nn.Cell, path: Path, identity: dict, epoch: int, val_auc: float) -> None:
    """best.ckpt: the network's parameters, what it was made for, and when it was best; and
    the same record without the weights in best.json beside it, with the checkpoint's sha256
    (for tools that read runs without MindSpore, and to tell a copied or altered file)."""
    meta = {"format_version": FORMAT_VERSION, "epoch": epoch, "val_auc": val_auc}
    save_checkpoint(net.parameters_dict(), path, {**meta, "identity": to_json(identity)})
    write_json(path.with_suffix(".json"), {"checkpoint": path.name, "sha256": sha256_of(path), **meta,
                                          "identity": identity})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TrainedModel:
    net: nn.Cell
    cfg: DictConfig  # the training run's resolved config
    spec: Preprocess  # how its inputs were made
    run_dir: Path
    checkpoint: Path
    temperature: Optional[float] = None  # from calibration.json beside the checkpoint
    classes: tuple[str, ...] = CLASSES  # the task's classes, in the order of the logits

    @property
    def task(self) -> str:
        return str(OmegaConf.select(self.cfg, "task.name", default="binary"))

    def class_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """NxK softmax for a float32 NxCxSxS batch made by preprocess.model_input; for
        NxVxCxSxS (V test-time views per image) the mean over the views."""
        views = batch.shape[1] if batch.ndim == 5 else 1
        flat = batch.reshape(-1, *batch.shape[-3:])
        logits = self.net(ms.Tensor(np.ascontiguousarray(flat, dtype=np.float32)))
        probs = ops.softmax(logits, axis=1).asnumpy()
        return probs.reshape(-1, views, probs.shape[1]).mean(axis=1)

    def probabilities(self, batch: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """p(class 1) -- p(pneumonia) in the binary task -- of a two-class model, temperature-
        scaled when the checkpoint has been calibrated (unless calibrated=False)."""
        if len(self.classes) != 2:
            raise XrayError(f"{self.checkpoint} tells {len(self.classes)} classes apart; use class_probabilities")
        p = self.class_probabilities(batch)[:, 1]
        return self.calibrate(p) if calibrated else p

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        """Raw probabilities -> this checkpoint's calibrated ones (unchanged if uncalibrated)."""
        return scale(p, self.temperature) if self.temperature else p


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/best.ckpt -> <run>; a checkpoint beside its config.yaml -> its folder."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def load_trained_model(checkpoint: Path) -> TrainedModel:
    """Rebuild the network and load the weights (eval mode). What the model is and how its
    inputs are made come from the checkpoint's own identity (format 2), or from the run's
    config.yaml for checkpoints of format 1, which recorded none."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.ckpt"
    if not checkpoint.is_file():
        raise XrayError(f"ckpt={checkpoint} not found; pass a .ckpt file, e.g. "
                        "outputs/train/<run>/checkpoints/best.ckpt")
    run_dir = run_dir_of(checkpoint)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise XrayError(f"{config} not found; ckpt must sit in a training run folder "
                        "(<run>/checkpoints/*.ckpt) or beside that run's config.yaml")
    cfg = OmegaConf.load(config)
    try:
        params = read_checkpoint(checkpoint)
    except (RuntimeError, ValueError) as e:
        raise XrayError(f"ckpt={checkpoint} is not a readable MindSpore checkpoint ({e})") from None
    identity = model_identity(params, cfg)
    spec = Preprocess(**identity["preprocess"])
    classes = tuple(identity["classes"])
    net = create_model(OmegaConf.create(identity["model"]), spec.image_size, len(classes))
    missing, _ = ms.load_param_into_net(net, legacy_names(params))
    if missing:
        raise XrayError(f"ckpt={checkpoint} does not match the model it records "
                        f"(missing {len(missing)} parameters, e.g. {missing[0]})")
    net.set_train(False)
    return TrainedModel(net, cfg, spec, run_dir, checkpoint, load_temperature(run_dir, checkpoint), classes)


def model_identity(params: dict, cfg: DictConfig) -> dict:
    """The identity a checkpoint records (format 2; taken out of `params`), else the one its
    run's config.yaml implies (format 1)."""
    params.pop("format_version", None)
    for key in ("history", "epoch", "val_auc", *(f.name for f in fields(RunState))):
        params.pop(key, None)
    if "identity" in params:
        return json.loads(params.pop("identity"))
    task = str(OmegaConf.select(cfg, "task.name", default="binary"))
    return {"task": task, "classes": list(task_classes(task)),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "preprocess": OmegaConf.to_container(cfg.preprocess, resolve=True)}


def legacy_names(params: dict) -> dict:
    """Checkpoints written before dropout masks became inputs name the dense layers
    classifier.<i> (i = 0, 3, 6 with dropout, 0, 2, 4 without): map them to fc1, fc2, fc3."""
    indices = sorted({int(k.split(".")[1]) for k in params if k.startswith("classifier.")})
    names = {f"classifier.{i}.": f"fc{n}." for n, i in enumerate(indices, start=1)}
    out = {}
    for key, value in params.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        out[names[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def resolve_checkpoints(ckpt, top_k: Optional[int] = None) -> list[Path]:
    """The checkpoints a `ckpt=` (and `top_k=`) option names: a file, a list of files (an
    ensemble), or a best folder (outputs/best/<sweep>: its best.ckpt, or with top_k its
    members/1..top_k written by `xray.report --top-k`)."""
    if ckpt is None or (isinstance(ckpt, str) and not ckpt.strip()):
        raise XrayError("ckpt is not set; e.g. ckpt=outputs/train/<run>/checkpoints/best.ckpt, "
                        "ckpt=[a.ckpt,b.ckpt] or ckpt=outputs/best/<sweep> top_k=3")
    if not isinstance(ckpt, str):  # a list from the command line: ckpt=[a,b]
        if top_k:
            raise XrayError("top_k works with a best folder (ckpt=outputs/best/<sweep>), not a list")
        return [Path(str(c)) for c in ckpt]
    path = Path(ckpt)
    if not top_k or int(top_k) == 1:  # a best folder's top 1 is its best.ckpt
        return [path]
    if int(top_k) < 1:
        raise XrayError(f"top_k={top_k} must be >= 1")
    members = path / "members"
    if not path.is_dir():
        raise XrayError(f"top_k needs a best folder (outputs/best/<sweep>), but ckpt={ckpt} is not a folder")
    found = [members / str(i) for i in range(1, int(top_k) + 1) if (members / str(i) / "best.ckpt").is_file()]
    if len(found) < int(top_k):
        raise XrayError(f"{path} holds {len(found)} ranked members, not top_k={top_k}; run "
                        f"`python -m xray.report <sweep> --top-k {top_k}` first")
    return [m / "best.ckpt" for m in found]
