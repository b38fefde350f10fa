"""The whole chain on Slurm, submitted at once and returning at once:

    python -m jobs.pipeline data.root=/data/chest_xray [+sweep=loss_lr_momentum] [lr=1e-3,1e-2 ...]

0. `xray.doctor` on the GPU partition: can a node there train with the device and mixed
   precision the members will use? (its report: <pipeline dir>/doctor.json);
1. convert on the CPU partition (a data.dir that already holds data.root converted with the same
   settings is kept; one that holds anything else is refused before anything is submitted,
   unless overwrite=true);
2. the training sweep (every other argument, Hydra multirun syntax, as for `xray.train -m`) as
   one job array on the GPU partition, starting only after the doctor and the conversion
   succeeded (afterok; otherwise Slurm cancels everything that waits);
3. after the whole array has ended (afterany: failed members do not block it), a GPU job that
   ranks the sweep, copies the best member to outputs/best/<sweep name>/ and evaluates it on
   the test split.

Job ids go to <pipeline dir>/jobs.json; `python -m jobs.status <pipeline dir>` shows progress.
Cluster settings (partitions, account, time limits, setup lines) come from conf/cluster/.
"""
from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import submitit
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from xray import CONF_DIR, folder_name
from xray.convert import convert, holds_conversion, settings
from xray.errors import XrayError, one_line_errors
from xray.files import write_json


def compose_train(overrides: list[str]) -> DictConfig:
    """The training config for one set of overrides, with Hydra's own node (for job names)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every member's overrides, as `xray.train -m` would run them: command-line sweeps
    combined with the sweeper params of a `+sweep=<name>` file (the command line wins)."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose_train(fixed)
    given = {o.key_or_group for o in parsed}
    from_file = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items() if k not in given]
    return BasicSweeper.split_arguments(parser.parse_overrides(overrides + from_file), None)[0]


class TrainMember(submitit.helpers.Checkpointable):
    """One sweep member as a Slurm array task. On the time-limit / preemption signal the
    training loop saves last.ckpt, then submitit requeues this same call, which resumes."""

    def __call__(self, overrides: list[str], run_dir: str) -> dict:
        from xray.distributed import launched_rank
        from xray.train import train

        cfg = compose_train(overrides)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        run = Path(run_dir)
        if launched_rank() == 0:  # a data-parallel member runs one task per rank; rank 0 writes
            (run / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(task, run / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
        return train(task, run)


def evaluate_best(sweep_dir: str, split: str, best_root: str) -> dict:
    """Rank the sweep, export its best member, evaluate that on `split`."""
    from xray.evaluate import evaluate
    from xray.report import report

    members = report(Path(sweep_dir), Path(best_root))
    winner = next((m for m in members if m.status == "ok"), None)
    if winner is None:
        raise XrayError(f"no member of {sweep_dir} finished; see jobs.status for their logs")
    return evaluate([Path(best_root) / winner.sweep_name], split)


def check_node(overrides: list[str], report_path: str) -> dict:
    """The doctor on a node of the GPU partition, for the device and mixed-precision level
    the members will use (their config, composed here, inside the job)."""
    from xray.checks import TRAIN, check
    from xray.device import DEVICES
    from xray.doctor import describe, doctor, require

    cfg = compose_train(overrides)
    check(cfg, TRAIN)  # (device_target among them)
    device, amp = DEVICES[str(cfg.device_target).lower()], str(cfg.train.amp)
    report = doctor((device,), amp)
    print(describe(report), flush=True)
    try:
        require(report, device)
    except XrayError as e:
        report["verdict"] = str(e)
        raise
    finally:
        write_json(Path(report_path), report)
    return report


def executor(folder: Path, cfg: DictConfig, partition: str, cpus: int, gpus: int = 0,
             after: Optional[str] = None, name: str = "xray", nodes: int = 1,
             tasks_per_node: int = 1) -> submitit.AutoExecutor:
    """A Slurm executor from conf/cluster; `after` is an sbatch --dependency; several tasks
    are the ranks of a data-parallel training (cpus: per task)."""
    folder.mkdir(parents=True, exist_ok=True)  # the log folder exists before sbatch runs
    c = cfg.cluster
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), slurm_max_num_timeout=c.max_requeues)
    extra: dict[str, Any] = dict(OmegaConf.to_container(c.additional_parameters))
    for key in ("account", "qos", "constraint"):
        if c[key]:
            extra[key] = c[key]
    if after:
        extra["dependency"] = after
        extra["kill-on-invalid-dep"] = "yes"  # a failed conversion cancels what waits on it
    setup = [c.setup] if c.setup else []
    if gpus:  # -> device_target and train.amp, unless overridden (as the slurm_gpu profile)
        setup += ["export XRAY_DEVICE_TARGET=GPU", "export XRAY_AMP=O2"]
    ex.update_parameters(
        name=name, slurm_partition=partition, cpus_per_task=cpus, mem_gb=c.mem_gb,
        timeout_min=c.timeout_min, slurm_array_parallelism=c.array_parallelism,
        slurm_setup=setup, slurm_additional_parameters=extra, nodes=nodes,
        tasks_per_node=tasks_per_node, **({"gpus_per_node": gpus} if gpus else {}))
    return ex


def submit_pipeline(overrides: list[str], out_dir: Path, split: str = "test",
                    best_root: Path = Path("outputs/best")) -> dict:
    """Submit convert -> sweep array -> evaluate; returns (and writes) the job ids."""
    members = expand_sweep(overrides)
    first = compose_train(members[0])
    if first.data.root is None:
        raise XrayError("data.root is not set; e.g. python -m jobs.pipeline data.root=/data/chest_xray")
    out_dir = Path(out_dir).resolve()
    sweep_dir = out_dir / "sweep"
    logs = out_dir / "slurm"
    c = first.cluster
    d = first.data
    reconvert = bool(first.get("overwrite"))
    wanted = settings(d.root, d.short_side, d.val_source, d.val_fraction, d.stratify, d.seed)
    if holds_conversion(d.dir, wanted) is False and not reconvert:  # before anything is submitted
        raise XrayError(f"data.dir={d.dir} already holds something else than {d.root} converted with "
                        "these settings (another source, split or data format); pass another data.dir, "
                        "or overwrite=true to convert it again (members start over too)")

    doctor_job = executor(logs, first, c.gpu_partition, c.cpus_per_gpu_job, c.gpus_per_node,
                          name="doctor").submit(check_node, members[0], str(out_dir / "doctor.json"))
    convert_job = executor(logs, first, c.cpu_partition, c.cpus_per_cpu_job, name="convert").submit(
        _convert, d.root, d.dir, d.short_side, d.val_source, d.val_fraction, d.seed, d.stratify,
        d.max_pixels, reconvert)
    names = [f"{i}_{folder_name(compose_train(m).hydra.job.override_dirname)}" for i, m in enumerate(members)]
    train_ex = executor(logs, first, c.gpu_partition, c.cpus_per_gpu_job, c.gpus_per_node,
                        after=f"afterok:{convert_job.job_id}:{doctor_job.job_id}", name="train",
                        nodes=c.nodes, tasks_per_node=c.gpus_per_node)  # one task per rank
    train_jobs = train_ex.map_array(TrainMember(), members, [str(sweep_dir / n) for n in names])
    array_id = train_jobs[0].job_id.split("_")[0]
    eval_job = executor(logs, first, c.gpu_partition, c.cpus_per_gpu_job, c.gpus_per_node,
                        after=f"afterany:{array_id},afterok:{doctor_job.job_id}", name="evaluate").submit(
        evaluate_best, str(sweep_dir), split, str(Path(best_root).resolve()))
    record = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "overrides": overrides,
        "data_dir": str(Path(d.dir).resolve()),
        "sweep_dir": str(sweep_dir),
        "best_dir": str(Path(best_root).resolve() / str(first.sweep_name)),
        "logs": str(logs),
        "jobs": {
            "doctor": doctor_job.job_id,
            "convert": convert_job.job_id,
            "train": array_id,
            "evaluate": eval_job.job_id,
        },
        "members": {n: j.job_id for n, j in zip(names, train_jobs)},
    }
    write_json(out_dir / "jobs.json", record)
    return record


def _convert(root: str, out_dir: str, short_side: int, val_source: str, val_fraction: float,
             seed: int, stratify: str, max_pixels: int, reconvert: bool = False) -> dict:
    """The conversion job: a data.dir that already holds this very conversion is kept (the same
    settings give the same images and split), anything else there only with `reconvert`."""
    import logging

    from xray.data import read_manifest  # (imports MindSpore: only in the job)

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if not reconvert and holds_conversion(out_dir, settings(root, short_side, val_source, val_fraction,
                                                            stratify, seed)):
        logging.getLogger("jobs.pipeline").info("%s already holds %s converted with these settings; kept "
                                                "(overwrite=true converts it again)", out_dir, root)
        return read_manifest(Path(out_dir))
    return convert(Path(root), Path(out_dir), short_side, val_source, val_fraction, seed,
                   workers=len(os.sched_getaffinity(0)), overwrite=reconvert, max_pixels=max_pixels,
                   stratify=stratify)


@one_line_errors
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="training overrides, Hydra multirun syntax")
    parser.add_argument("--out", type=Path, default=None,
                        help="pipeline folder (default outputs/pipeline/<time>)")
    parser.add_argument("--split", default="test", help="split the best model is evaluated on")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs/pipeline") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    record = submit_pipeline(args.overrides, out, args.split)
    print(f"submitted to Slurm (returns now; follow with: python -m jobs.status {out}):")
    for step, job_id in record["jobs"].items():
        print(f"  {step:<9} {job_id}")
    print(f"  {len(record['members'])} sweep members -> {record['sweep_dir']}")
    print(f"job ids: {Path(out) / 'jobs.json'}")


if __name__ == "__main__":
    main()
