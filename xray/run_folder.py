"""A training run's folder and its lifecycle: where each file lives, whether the training ended,
starting it over, and the record of a failure. The rules live here only."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from xray.calibration import FILE as CALIBRATION
from xray.errors import in_batch_job
from xray.files import flatten, to_json, write_json, write_text
from xray.hparams import hparams_of, with_current_model_keys, write_hparams
from xray.provenance import provenance

log = logging.getLogger(__name__)

ENDED = ("ok", "diverged")  # statuses of a training that ran to its end
# keys that may differ between the run and a rerun of it: where things are and how they are
# run, not what is trained (issue 26: any other difference is refused)
OPERATIONAL = ("data.dir", "data.root", "data.workers", "train.resume", "train.log_every", "train.eval_splits",
               "train.eval_bootstrap", "train.cam_images", "train.keep_last", "train.threshold_rule",
               "train.target_sensitivity", "train.bacterial_vs_viral_rule", "overwrite", "sweep_name", "caveats", "device_target", "mode", "cluster",
               "preprocess", "hydra")
HYDRA_RECORD = ".hydra.accepted"  # the .hydra/ of the run's last accepted start
# what evaluating a run writes beside its result (a stale calibration.json would give a new
# model the old temperature)
EVALUATION_FILES = ("eval_*.json", "predictions_*.csv", "roc_*.png", "confusion_*.png",
                    "reliability_*.png", "cam_errors_*.png", CALIBRATION)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:  # the training state, to resume
        return self.checkpoints / "last.ckpt"

    @property
    def best_ckpt(self) -> Path:  # the val-chosen model
        return self.checkpoints / "best.ckpt"

    @property
    def history(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def train_images(self) -> Path:  # the images the model learnt from, one "<label>/<file name>" a line
        return self.path / "train_images.txt"

    def read_train_images(self) -> Optional[set]:
        """The run's train images (None: a run from before they were recorded)."""
        return set(self.train_images.read_text().splitlines()) if self.train_images.is_file() else None

    def finished_result(self) -> Optional[dict]:
        """metrics.json of a run whose training ended (ok or diverged), else None."""
        result = self._read_result()
        return result if result.get("status") in ENDED else None

    def start_over(self) -> None:
        """overwrite=true: remove what an earlier attempt wrote and what evaluating it wrote
        (not .hydra/ or the logs)."""
        paths = [self.checkpoints, *self.path.glob("events.out.tfevents.*"), self.metrics, self.history,
                 self.config, self.train_images, *(p for pattern in EVALUATION_FILES for p in self.path.glob(pattern))]
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def remove_temp_files(self) -> None:
        """Temp files of a writer that was killed mid-write (e.g. SIGKILL while last.ckpt was
        being replaced); call only while holding the folder's lock."""
        for folder in (self.path, self.checkpoints):
            for leftover in folder.glob(".*.tmp*"):
                if leftover.is_file() and not leftover.name.startswith(".xray.lock"):
                    log.warning("removing %s, left by a writer that was killed", leftover)
                    leftover.unlink(missing_ok=True)

    def changed_settings(self, cfg: DictConfig) -> list[str]:
        """The keys that define the model and its data whose requested value differs from the
        run's config.yaml, as "key: recorded -> requested" (keys one side lacks, e.g. added
        by a later xray, are not compared)."""
        if not self.config.is_file():
            return []
        recorded = OmegaConf.to_container(OmegaConf.load(self.config), resolve=False)
        if isinstance(recorded.get("model"), dict):  # (written by an xray of before model.norm?)
            recorded["model"] = with_current_model_keys(recorded["model"])
        recorded = flatten(recorded)
        requested = flatten(OmegaConf.to_container(cfg, resolve=True))
        return [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in requested.items()
                if key in recorded and recorded[key] != value and not _operational(key)]

    def keep_hydra_record(self) -> None:
        """Copy the .hydra/ Hydra wrote for this (accepted) start, so that a refused rerun,
        which Hydra lets rewrite .hydra/ before xray sees it, can be undone."""
        hydra = self.path / ".hydra"
        if hydra.is_dir():
            shutil.rmtree(self.path / HYDRA_RECORD, ignore_errors=True)
            shutil.copytree(hydra, self.path / HYDRA_RECORD)

    def restore_hydra_record(self) -> None:
        """A refused rerun leaves .hydra/ as the run's last accepted start wrote it."""
        kept = self.path / HYDRA_RECORD
        if kept.is_dir():
            for file in kept.iterdir():
                shutil.copy2(file, self.path / ".hydra" / file.name)

    def write_config(self, cfg: DictConfig, preprocess: dict) -> None:
        """The run's resolved config + its input preprocessing, for people and older tools
        (evaluate and resume read the checkpoint's own record)."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["preprocess"] = preprocess
        write_text(self.config, OmegaConf.to_yaml(resolved))

    def write_train_images(self, images: list) -> None:
        write_text(self.train_images, "".join(f"{name}\n" for name in images))

    def write_history(self, history: list) -> None:
        """history.jsonl: the checkpoint's history, one line per epoch, for people and plots."""
        write_text(self.history, "".join(to_json(h) + "\n" for h in history))

    def write_result(self, result: dict) -> None:
        write_json(self.metrics, result)

    def record_failure(self, cfg: DictConfig, error, writer=None, rank: Optional[int] = None,
                       since: Optional[float] = None) -> dict:
        """metrics.json (and HParams, given the run's TensorBoard writer) say `failed` with the
        error, where the disk still lets them. In a data-parallel group any rank records
        (`rank`), and the first failure of this job (recorded after `since`) stays the error:
        a peer's later SIGTERM is added under `ranks` instead of replacing it."""
        message = (error if isinstance(error, str) else f"{type(error).__name__}: {error}").splitlines()[0]
        result = {"status": "failed", "error": message, "epochs": cfg.get("epochs"),
                  "hparams": hparams_of(cfg), "provenance": provenance(cfg), "time": time.time()}
        if rank is not None:
            result["error"] = f"rank {rank}: {message}"
            result["ranks"] = {str(rank): message}
            earlier = self._read_result()
            if earlier.get("status") == "failed" and earlier.get("time", 0) >= (since or 0):
                result = {**earlier, "ranks": {**earlier.get("ranks", {}), str(rank): message}}
        try:
            if writer is not None:
                write_hparams(writer, cfg, result, 0)
            self.write_result(result)
        except OSError as e:  # e.g. the full disk that made it fail
            log.error("could not record the failure in %s: %s", self.path, e)
        return result

    def _read_result(self) -> dict:
        try:
            return json.loads(self.metrics.read_text())
        except (OSError, ValueError):
            return {}

    def link_job_logs(self) -> None:
        """Inside a submitit (Slurm) job: slurm.out / slurm.err point at the job's log files,
        so every run says where its logs are."""
        if not in_batch_job():
            return
        import submitit

        paths = submitit.JobEnvironment().paths
        self.path.mkdir(parents=True, exist_ok=True)
        for name, target in (("slurm.out", paths.stdout), ("slurm.err", paths.stderr)):
            link = self.path / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)


def _operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL)

