"""Where the time goes: ratios measured in one run on one machine (a benchmark, not a test).

    python -m xray.bench                                  # sizes 96 and 227, batch 32, the sample
    python -m xray.bench data.dir=outputs/data/kermany steps=50 sizes=[96,227,128]
    python -m xray.bench steps=5 warmup=1 fullres=null torch=false out=bench.json
    python -m xray.bench sizes=[227] kernels=true fullres=null   # + the step by oneDNN kernel

Measures, in images/s, each after untimed warm-up (the first step compiles the graph):
1. conversion of the full-size originals in `fullres` exactly as xray.convert does it per image
   (draft-mode decode, grayscale, resize to data.short_side, its CLAHE), vs a naive full decode
   (Pillow open + load at full size, nothing else); one process, files already in the page cache;
2. the input pipeline alone: the real training dataset (make_train_dataset, with
   data.augment and data.workers) iterated, at each size; then the same with the Pillow ops
   that runs trained before data format 2 keep (`pipeline: pil`), on the same records; then
   evaluation's pipeline (MindSpore's C++ ops only); `pipeline_steps` batches each;
3. the bare train step: the real step (make_step, build_optimizer, the loss) on random tensors;
4. end to end: the pipeline feeding the step, as xray.train's loop does;
5. with amp_levels (e.g. [O2]), the bare step again at each of those train.amp levels, as a ratio
   to the step at train.amp (fp16 on a CPU has no fast kernels: this says how much slower);
6. the same AlexNet (and LRN, dropout, loss, momentum + weight decay, batch) in PyTorch with as
   many threads as MindSpore uses, when torch is installed (`pip install -e '.[bench]'`); always
   fp32, so compare it with train.amp=O0 (the default);
7. with kernels=true, where each framework's step spends its time: the same step again in a child
   process with oneDNN's verbose log on (ONEDNN_VERBOSE=1), its time split by oneDNN kernel and
   pass (convolution forward / backward data / backward weights, pooling, matmul, reorders), each
   with the implementation oneDNN picked, and the rest (kernels that are not oneDNN's, the
   framework's own work).

Prints a table (img/s, ratio vs the bare step) and the JSON, which is also written to `out`
(default: bench.json in the run folder). Ratios are the point: absolute numbers depend on the
machine and its load (recorded with them). data.dir=null converts the shipped sample into a
temp folder; a train split smaller than warmup + steps batches is repeated in a temp copy, so
that each measurement streams its batches from one epoch, as training on a real set does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate

from xray import CONF_DIR, SAMPLE_DIR
from xray.checks import AMP_LEVELS, TRAIN, check
from xray.errors import XrayError, one_line_errors
from xray.files import to_json, write_json
from xray.hparams import model_keys
from xray.preprocess import MAX_PIXELS, MIN_IMAGE_SIZE
from xray.progress import Progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
TORCH_MISSING = "torch is not installed (pip install -e '.[bench]')"

# The bench config: the training config (data, model, loss, optim, batch_size, seed, ... with
# all their overrides) plus these keys. Kept here, not in conf/, so that it cannot drift from
# the code that reads it.
BENCH_CONFIG = {
    "defaults": ["config", "_self_"],
    "sizes": [96, 227],     # model input sizes to measure (px, >= 67)
    "steps": 20,            # timed steps / batches per measurement
    "warmup": 3,            # untimed ones before them (>= 1: the first step compiles the graph)
    "pipeline_steps": 100,  # timed batches of the input pipeline alone (fast: more, for a steady number)
    "fullres": "../shared/data/chest_xray_fullres",  # full-size originals (*.jpeg/.jpg/.png,
                            # any depth) for the conversion measurement; null skips it
    "fullres_images": None,  # use only the first N of them (null = all)
    "fullres_repeats": 2,   # passes over them per method (alternating, so load drifts hit both)
    "torch": True,          # compare with the same AlexNet in PyTorch when torch is installed
    "kernels": False,       # also: each framework's step in a child process with oneDNN's verbose
                            # log, its time split by oneDNN kernel (which implementation ran)
    "amp_levels": [],       # also: the bare step at these other train.amp levels (e.g. [O2]), each
                            # as a ratio to the step at train.amp, in the same run
    "out": None,            # JSON result; null = bench.json in the run folder
    "data": {"dir": None},  # a converted data set; null = the shipped sample, converted to a temp folder
    "hydra": {"run": {"dir": "outputs/bench/${now:%Y-%m-%d_%H-%M-%S}"},
              "sweep": {"dir": "outputs/multirun/bench_${now:%Y-%m-%d_%H-%M-%S}",
                        "subdir": "${hydra.job.num}"}},
}
ConfigStore.instance().store(name="bench", node=BENCH_CONFIG)


def rate(images: int, seconds: float) -> float:
    return images / max(seconds, 1e-9)


# -- 1. conversion vs a naive full decode ---------------------------------------------------

def fullres_files(folder: Path, limit: Optional[int] = None) -> list[Path]:
    """The image files under `folder` (any depth), sorted; the first `limit` of them."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise XrayError(f"fullres={folder} holds no .jpeg/.jpg/.png files; point it at a folder of "
                        "full-size originals (e.g. ../shared/data/chest_xray_fullres) or set fullres=null")
    return files[:limit] if limit else files


def naive_decode(path: Path) -> tuple[int, int]:
    """What a loader without xray.convert does: decode the whole image at full size."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size


def convert_one(path: Path, short_side: int) -> int:
    """Exactly xray.convert's per-image work (its pool workers' function): decode in draft
    mode, upright grayscale, resize to short_side, its stored CLAHE, pixel statistics."""
    from xray.convert import MAX_ASPECT_RATIO, _decode

    _, columns, error, _ = _decode((0, str(path), short_side, MAX_PIXELS, MAX_ASPECT_RATIO))
    if columns is None:
        raise XrayError(f"{path}: {error}; the conversion benchmark needs readable images")
    return len(columns["image"])


def bench_conversion(files: list[Path], short_side: int, repeats: int = 2) -> dict:
    """img/s of xray.convert's per-image work vs a naive full decode, one process each; passes
    alternate between the two so that a change in the machine's load hits both alike."""
    for path in files:  # page cache: measure decoding, not the disk
        path.read_bytes()
    pixels = sum(w * h for w, h in map(naive_decode, files))  # (also an untimed warm-up)
    times = {"naive": 0.0, "convert": 0.0}
    for r in range(repeats):
        for name, fn in (("naive", naive_decode), ("convert", lambda p: convert_one(p, short_side))):
            start = time.perf_counter()
            for path in files:
                fn(path)
            times[name] += time.perf_counter() - start
        log.info("  conversion: pass %d/%d done", r + 1, repeats)
    n = len(files) * repeats
    convert_rate, naive_rate = rate(n, times["convert"]), rate(n, times["naive"])
    return {"images": len(files), "repeats": repeats, "mean_megapixels": pixels / len(files) / 1e6,
            "short_side": short_side, "convert_img_s": convert_rate,
            "naive_decode_img_s": naive_rate, "convert_vs_naive_decode": convert_rate / naive_rate}


# -- 2.-4. MindSpore: pipeline, bare step, end to end ----------------------------------------

def enough_data(data_dir: Path, images: int, tmp: Path, task: str = "binary") -> tuple[Path, int]:
    """(data set, repeats): `data_dir` when its train split holds `images` of the task's
    images, else a copy in `tmp` whose train.mindrecord holds its records `repeats` times. A
    small set then streams as many batches as a measurement needs from one epoch, without
    the pipeline restarts that training on a real set rarely has (a sampler cannot repeat
    them: MindDataset refuses more indices than records)."""
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileWriter

    from xray.convert import SCHEMA
    from xray.data import read_manifest, split_file, task_records

    manifest = read_manifest(data_dir)
    path = split_file(data_dir, manifest, "train")
    repeats = max(1, math.ceil(images / len(task_records(path, task).indices)))
    if repeats == 1:
        return Path(data_dir), 1
    rows = list(ds.MindDataset(str(path), columns_list=list(SCHEMA), shuffle=False)
                .create_dict_iterator(num_epochs=1, output_numpy=True))
    out = tmp / "repeated"
    out.mkdir(parents=True)
    log.info("bench: %s has %d train images, %d needed: repeating them %d times in %s",
             data_dir, len(rows), images, repeats, out)
    as_python = {"string": str, "int32": int, "bytes": lambda v: v.tobytes()}
    rows = [{k: as_python[SCHEMA[k]["type"]](v) for k, v in r.items()} for r in rows]
    writer = FileWriter(str(out / "train.mindrecord"), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "chest_xray")
    for _ in range(repeats):
        writer.write_raw_data(rows)
    writer.commit()
    train = manifest["splits"]["train"]
    manifest["splits"] = {"train": {**train, "file": "train.mindrecord",
                                    "images": train["images"] * repeats}}
    write_json(out / "manifest.json", manifest)
    return out, repeats


def train_batches(cfg: DictConfig, records, spec, epoch: int):
    """The real training dataset of `epoch`, with the run's augmentation and workers."""
    from xray.data import make_train_dataset

    data = make_train_dataset(records, spec, cfg.batch_size, cfg.seed, epoch, 0, cfg.data.augment,
                              cfg.data.sampling, cfg.data.workers)
    return data.create_tuple_iterator(num_epochs=1)  # Tensors, as xray.train's loop gets them


def timed(items, cfg: DictConfig, what: str, body: Callable[[int, object], None],
          steps: Optional[int] = None) -> float:
    """body(i, item) for the first warmup + steps (default cfg.steps) items; img/s of the last
    `steps` of them, fetching included (warmup >= 1)."""
    steps = steps or cfg.steps
    total, progress = cfg.warmup + steps, None
    for i, item in enumerate(items):
        if progress is not None:
            progress.update(i - cfg.warmup)
        body(i, item)
        if i + 1 == cfg.warmup:  # the clock starts here
            progress = Progress(f"  {what}", steps, every_s=10.0, per_item=cfg.batch_size, unit="img")
        elif i + 1 == total:
            return rate(steps * cfg.batch_size, time.perf_counter() - progress.start)
    raise XrayError(f"{what}: the data gave fewer than warmup + steps = {total} batches")


def bench_pipeline(cfg: DictConfig, records, spec, size: int) -> float:
    """img/s of the input pipeline alone (the real training dataset, augmented)."""
    batches = train_batches(cfg, records, spec, epoch=1)
    return timed(batches, cfg, f"{size} px {spec.pipeline} pipeline", lambda i, batch: None,
                 steps=cfg.pipeline_steps)


def bench_eval_pipeline(cfg: DictConfig, records, spec, size: int) -> float:
    """img/s of evaluation's input pipeline alone (MindSpore's C++ ops from the stored bytes)."""
    from xray.data import make_eval_dataset

    batches = make_eval_dataset(records, spec, cfg.batch_size, cfg.data.workers).create_tuple_iterator(num_epochs=1)
    return timed(batches, cfg, f"{size} px eval pipeline", lambda i, batch: None, steps=cfg.pipeline_steps)


def build_step(cfg: DictConfig, size: int, num_classes: int):
    """(net, step_fn): xray.train's train step for input `size` (train.amp included)."""
    from xray.registry import create_schedule
    from xray.step import build_training

    total = 3 * (cfg.warmup + cfg.steps)  # bare + end to end (+ margin): one lr per step
    net, _, _, _, step = build_training(cfg, size, [1] * num_classes,
                                        create_schedule(float(cfg.lr), cfg.optim, 1, total))
    net.set_train(True)
    return net, step


def bench_step(cfg: DictConfig, step_fn, size: int, num_classes: int) -> float:
    """img/s of the bare train step on random inputs; loss read back every step, as
    xray.train does (global steps 0 .. warmup + steps - 1)."""
    return timed(range(cfg.warmup + cfg.steps), cfg, f"{size} px bare step",
                 bare_step_body(cfg, step_fn, size, num_classes))


def bare_step_body(cfg: DictConfig, step_fn, size: int, num_classes: int) -> Callable[[int, object], None]:
    """body(i, _): global step i of `step_fn` on a fixed random batch, its loss read back."""
    import mindspore as ms

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((cfg.batch_size, cfg.model.in_channels, size, size), np.float32))
    y = ms.Tensor(rng.integers(0, num_classes, cfg.batch_size).astype(np.int32))

    def body(i: int, _) -> None:
        loss = float(step_fn(x, y, i).asnumpy())
        if not math.isfinite(loss):
            raise XrayError(f"the bare step's loss is {loss} at step {i}; lower lr")

    return body


def bench_end_to_end(cfg: DictConfig, records, spec, step_fn, size: int) -> float:
    """img/s of the pipeline feeding the step (xray.train.train_epoch's loop, without logging);
    global steps go on from the bare step's."""
    first = cfg.warmup + cfg.steps
    batches = train_batches(cfg, records, spec, epoch=2)
    return timed(batches, cfg, f"{size} px end to end",
                 lambda i, batch: float(step_fn(*batch, first + i).asnumpy()))


def mindspore_threads() -> Optional[int]:
    """The CPU kernels' thread count MindSpore runs with (its runtime_num_threads)."""
    import mindspore as ms

    try:
        return int(ms.get_context("runtime_num_threads"))
    except (ValueError, TypeError, RuntimeError):
        return None


# -- 5. the same AlexNet in PyTorch ------------------------------------------------------------

def import_torch():
    """(torch, None), or (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, TORCH_MISSING
    return torch, None


def torch_alexnet(torch, num_classes: int, in_channels: int, norm: str, dropout: float):
    """xray.model.AlexNet in PyTorch: the same layers and sizes, normalisation and dropout."""
    tnn = torch.nn

    def block(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, lrn: bool = False) -> list:
        layers = [tnn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=norm != "batch")]
        layers += [tnn.BatchNorm2d(out_ch)] if norm == "batch" else []
        layers.append(tnn.ReLU())
        # torch's LRN divides alpha by the window size; xray's uses alpha as the paper does
        return layers + ([tnn.LocalResponseNorm(5, alpha=1e-4 * 5, beta=0.75, k=2.0)] if lrn and norm == "lrn" else [])

    pool = lambda: tnn.MaxPool2d(3, 2)  # noqa: E731
    return tnn.Sequential(
        *block(in_channels, 96, 11, stride=4, lrn=True), pool(),
        *block(96, 256, 5, padding=2, lrn=True), pool(),
        *block(256, 384, 3, padding=1),
        *block(384, 384, 3, padding=1),
        *block(384, 256, 3, padding=1), pool(),
        tnn.AdaptiveAvgPool2d((6, 6)), tnn.Flatten(),
        tnn.Linear(256 * 6 * 6, 4096), tnn.ReLU(), tnn.Dropout(dropout),
        tnn.Linear(4096, 4096), tnn.ReLU(), tnn.Dropout(dropout),
        tnn.Linear(4096, num_classes),
    )


def bench_torch(torch, cfg: DictConfig, size: int, num_classes: int, threads: Optional[int]) -> float:
    """img/s of the PyTorch train step (forward, loss, backward, SGD momentum with weight
    decay on weights only), loss read back every step; `threads` intra-op threads."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return timed(range(cfg.warmup + cfg.steps), cfg, f"{size} px PyTorch step",
                     torch_step_body(torch, cfg, size, num_classes))
    finally:
        torch.set_num_threads(previous)


def torch_step_body(torch, cfg: DictConfig, size: int, num_classes: int) -> Callable[[int, object], None]:
    """body(i, _): one PyTorch train step of the same AlexNet on a fixed random batch."""
    torch.manual_seed(cfg.seed)
    net = torch_alexnet(torch, num_classes, cfg.model.in_channels, model_keys(cfg)["norm"],
                        float(cfg.model.dropout))
    net.train()
    params = list(net.named_parameters())
    weights = [p for n, p in params if n.endswith("weight")]
    others = [p for n, p in params if not n.endswith("weight")]
    optimizer = torch.optim.SGD(
        [{"params": weights, "weight_decay": float(cfg.optim.weight_decay)},
         {"params": others, "weight_decay": 0.0}],
        lr=float(cfg.lr), momentum=float(cfg.momentum), nesterov=bool(cfg.optim.nesterov))
    if cfg.loss.name == "mse":  # xray.losses.SoftmaxMSE
        def loss_fn(logits, y):
            target = torch.nn.functional.one_hot(y, num_classes).float()
            return ((torch.softmax(logits, 1) - target) ** 2).sum(1).mean()
    else:
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.label_smoothing))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, cfg.model.in_channels, size, size, generator=gen)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=gen)

    def body(i: int, _) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        float(loss.item())

    return body


# -- 6. where a step's time goes: oneDNN's own times per kernel --------------------------------

def onednn_kernel_times(stdout: str, steps_run: int, steps_timed: int) -> dict:
    """Milliseconds per step by oneDNN primitive, from the ONEDNN_VERBOSE=1 output of a process
    that ran `steps_run` identical steps: {"<primitive> <pass> [<implementation>]": ms}, summed
    over the last `steps_timed` steps (oneDNN prints one 'exec' line per primitive run, its time
    in ms last). Also "lines_per_step", and "uneven": lines that did not divide evenly."""
    execs = []
    for line in stdout.splitlines():
        fields = line.strip().split(",")
        if fields[0] != "onednn_verbose" or "exec" not in fields[1:5]:
            continue
        at = fields.index("exec")  # v3: onednn_verbose,v1,primitive,exec,cpu,<kind>,<impl>,<pass>,...
        try:
            ms_taken = float(fields[-1])
        except ValueError:
            continue
        kind, impl, prop = fields[at + 2], fields[at + 3], fields[at + 4]
        what = kind if prop in ("undef", "") else f"{kind} {prop}"
        execs.append((f"{what} [{impl}]", ms_taken))
    per_step, uneven = divmod(len(execs), steps_run)
    times: dict = {}
    for what, ms_taken in execs[len(execs) - per_step * steps_timed:]:
        times[what] = times.get(what, 0.0) + ms_taken / steps_timed
    return {"ms": dict(sorted(times.items(), key=lambda kv: -kv[1])), "lines_per_step": per_step,
            "uneven": uneven}


def kernel_breakdown(cfg: DictConfig, framework: str, size: int, num_classes: int,
                     threads: Optional[int], tmp: Path) -> dict:
    """One framework's train step at `size` in a child process with oneDNN's verbose log on:
    {"step_ms": wall ms per step, "onednn": onednn_kernel_times(...), "outside_onednn_ms":
    the rest (kernels that are not oneDNN's, the framework's own work)}. The log costs a
    little time per kernel, so step_ms is a bit above the bench's step."""
    config = tmp / f"kernels_{framework}_{size}.yaml"
    out = tmp / f"kernels_{framework}_{size}.json"
    config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    code = "import sys; from xray.bench import kernel_child; kernel_child(*sys.argv[1:])"
    child = subprocess.run(
        [sys.executable, "-c", code, str(config), framework, str(size), str(num_classes),
         str(threads or 0), str(out)],
        env={**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise XrayError(f"the {framework} kernel breakdown at {size} px failed: {last}")
    step_ms = json.loads(out.read_text())["step_ms"]
    kernels = onednn_kernel_times(child.stdout, cfg.warmup + cfg.steps, cfg.steps)
    onednn_ms = sum(kernels["ms"].values())
    return {"step_ms": step_ms, "onednn": kernels, "onednn_ms": onednn_ms,
            "outside_onednn_ms": step_ms - onednn_ms}


def kernel_child(config: str, framework: str, size: str, num_classes: str, threads: str, out: str) -> None:
    """The child of kernel_breakdown: warmup + steps train steps of one framework; writes the
    wall ms per timed step to `out` (stdout is left to oneDNN's log)."""
    cfg = OmegaConf.load(config)
    size, num_classes, threads = int(size), int(num_classes), int(threads)
    if framework == "mindspore":
        import mindspore as ms

        from xray.device import setup_device

        setup_device(cfg.device_target, cfg.mode)
        ms.set_seed(cfg.seed)
        _, step_fn = build_step(cfg, size, num_classes)
        body = bare_step_body(cfg, step_fn, size, num_classes)
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        body = torch_step_body(torch, cfg, size, num_classes)
    img_s = timed(range(cfg.warmup + cfg.steps), cfg, f"{size} px {framework} step (oneDNN log on)", body)
    write_json(Path(out), {"step_ms": cfg.batch_size * 1000 / img_s})


# -- the run ---------------------------------------------------------------------------------

def check_bench(cfg: DictConfig) -> None:
    """Bad values are one line, before any work starts."""
    check(cfg, TRAIN)
    sizes = list(cfg.sizes) if OmegaConf.is_list(cfg.sizes) else None
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= MIN_IMAGE_SIZE
                            for s in sizes):
        raise XrayError(f"sizes={cfg.sizes} must be a list of integers >= {MIN_IMAGE_SIZE}, "
                        "e.g. sizes=[96,227]")
    for key, low in (("steps", 1), ("warmup", 1), ("pipeline_steps", 1), ("fullres_repeats", 1),
                     ("fullres_images", 1)):
        value = cfg.get(key)
        if value is None and key == "fullres_images":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise XrayError(f"{key}={value} must be an integer >= {low}")
    for key in ("torch", "kernels"):
        if not isinstance(cfg[key], bool):
            raise XrayError(f"{key}={cfg[key]} must be true or false")
    levels = list(cfg.amp_levels) if OmegaConf.is_list(cfg.amp_levels) else None
    if levels is None or not all(level in AMP_LEVELS for level in levels):
        raise XrayError(f"amp_levels={cfg.amp_levels} must be a list of train.amp levels "
                        f"({', '.join(AMP_LEVELS)}), e.g. amp_levels=[O2]")
    if cfg.fullres is not None and not Path(cfg.fullres).is_dir():
        raise XrayError(f"fullres={cfg.fullres} is not a folder (run from the checkout, point it at "
                        "a folder of full-size originals, or set fullres=null to skip conversion)")


def bench(cfg: DictConfig, work_dir: Optional[Path] = None) -> dict:
    """Every measurement of the module docstring per `cfg`; returns the result (JSON-able).
    data.dir=null converts the shipped sample into a temp folder under `work_dir`."""
    check_bench(cfg)
    with tempfile.TemporaryDirectory(prefix="xray-bench-", dir=work_dir) as tmp:
        data_dir = Path(cfg.data.dir) if cfg.data.dir is not None else sample_data(cfg, Path(tmp))
        return measure_all(cfg, data_dir, Path(tmp))


def sample_data(cfg: DictConfig, tmp: Path) -> Path:
    from xray.convert import convert

    log.info("bench: data.dir=null, converting the shipped sample (short side %d) to %s",
             cfg.data.short_side, tmp)
    out = tmp / "sample"
    convert(SAMPLE_DIR, out, short_side=cfg.data.short_side, val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed, workers=1)
    return out


def measure_all(cfg: DictConfig, data_dir: Path, tmp: Path) -> dict:
    """Every measurement on the converted data set in `data_dir`; temp files go to `tmp`."""
    import mindspore as ms

    from xray.data import check_task, preprocess_spec, read_manifest, split_file, task_records
    from xray.device import setup_device

    start = time.perf_counter()
    load_before = os.getloadavg()
    setup_device(cfg.device_target, cfg.mode)
    ms.set_seed(cfg.seed)
    threads = mindspore_threads()
    torch, torch_reason = import_torch() if cfg.torch else (None, "torch=false")
    result: dict = {
        "settings": {"sizes": list(cfg.sizes), "batch_size": cfg.batch_size, "steps": cfg.steps,
                     "warmup": cfg.warmup, "workers": cfg.data.workers,
                     "data_dir": str(cfg.data.dir) if cfg.data.dir is not None else "the shipped sample",
                     "augment": OmegaConf.to_container(cfg.data.augment), **model_keys(cfg),
                     "dropout": cfg.model.dropout, "in_channels": cfg.model.in_channels,
                     "loss": cfg.loss.name, "task": cfg.task.name, "device_target": cfg.device_target,
                     "mode": cfg.mode, "amp": cfg.train.get("amp", "O0")},
        "torch": ({"available": True, "version": torch.__version__, "threads": threads}
                  if torch is not None else {"available": False, "reason": torch_reason}),
    }

    if cfg.fullres is None:
        result["conversion"] = {"skipped": "fullres=null"}
    else:
        files = fullres_files(Path(cfg.fullres), cfg.fullres_images)
        log.info("bench: conversion vs naive full decode, %d files from %s, %d passes each",
                 len(files), cfg.fullres, cfg.fullres_repeats)
        result["conversion"] = {"folder": str(cfg.fullres),
                                **bench_conversion(files, cfg.data.short_side, cfg.fullres_repeats)}
        log.info("  conversion %.1f img/s, naive full decode %.1f img/s",
                 result["conversion"]["convert_img_s"], result["conversion"]["naive_decode_img_s"])

    task, classes = check_task(read_manifest(data_dir), cfg.task.name, data_dir)
    batches = cfg.warmup + max(cfg.steps, cfg.pipeline_steps)
    train_dir, repeats = enough_data(data_dir, batches * cfg.batch_size, tmp, task)
    manifest = read_manifest(train_dir)
    records = task_records(split_file(train_dir, manifest, "train"), task)
    result["settings"]["train_repeats"] = repeats
    result["sizes"] = {}
    for size in cfg.sizes:
        spec = preprocess_spec(manifest, size, cfg.model.in_channels, cfg.data.equalize)
        log.info("bench: %d px, batch %d: bare step (compiling first)", size, cfg.batch_size)
        _, step_fn = build_step(cfg, size, len(classes))
        step = bench_step(cfg, step_fn, size, len(classes))
        log.info("  bare step %.1f img/s", step)
        amp_steps = {}
        for level in cfg.amp_levels:
            log.info("  bare step at train.amp=%s (compiling first)", level)
            at_level = OmegaConf.merge(cfg, {"train": {"amp": level}})
            amp_steps[level] = bench_step(at_level, build_step(at_level, size, len(classes))[1],
                                          size, len(classes))
            log.info("  bare step at train.amp=%s %.1f img/s (%.2f x)", level, amp_steps[level],
                     amp_steps[level] / step)
        log.info("  input pipeline alone")
        pipeline = bench_pipeline(cfg, records, spec, size)
        log.info("  pipeline %.1f img/s; the Pillow pipeline of runs before data format 2", pipeline)
        pil_pipeline = bench_pipeline(cfg, records, dataclasses.replace(spec, pipeline="pil"), size)
        log.info("  Pillow pipeline %.1f img/s; evaluation's pipeline", pil_pipeline)
        eval_pipeline = bench_eval_pipeline(cfg, records, spec, size)
        log.info("  evaluation's pipeline %.1f img/s; end to end", eval_pipeline)
        end_to_end = bench_end_to_end(cfg, records, spec, step_fn, size)
        log.info("  end to end %.1f img/s", end_to_end)
        row = {"pipeline_img_s": pipeline, "step_img_s": step, "end_to_end_img_s": end_to_end,
               "pipeline_vs_step": pipeline / step, "end_to_end_vs_step": end_to_end / step,
               "pil_pipeline_img_s": pil_pipeline, "pipeline_vs_pil": pipeline / pil_pipeline,
               "eval_pipeline_img_s": eval_pipeline, "eval_pipeline_vs_step": eval_pipeline / step,
               "torch_step_img_s": None, "mindspore_vs_torch": None,
               "amp_step_img_s": amp_steps,
               "amp_vs_step": {level: img_s / step for level, img_s in amp_steps.items()}}
        if torch is not None:
            log.info("  PyTorch step (%s threads)", threads or "default")
            row["torch_step_img_s"] = bench_torch(torch, cfg, size, len(classes), threads)
            row["mindspore_vs_torch"] = step / row["torch_step_img_s"]
            log.info("  PyTorch step %.1f img/s", row["torch_step_img_s"])
        if cfg.kernels:
            log.info("  the step by oneDNN kernel (child processes with ONEDNN_VERBOSE=1)")
            row["kernels"] = {"mindspore": kernel_breakdown(cfg, "mindspore", size, len(classes), threads, tmp)}
            if torch is not None:
                row["kernels"]["torch"] = kernel_breakdown(cfg, "torch", size, len(classes), threads, tmp)
        result["sizes"][str(size)] = row

    result["machine"] = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                         "mindspore_threads": threads, "processor": platform.processor() or None,
                         "loadavg_start": list(load_before), "loadavg_end": list(os.getloadavg()),
                         "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    return result


def table(result: dict) -> str:
    """The result as a readable table: img/s and the ratio each row is about."""
    rows = [("what", "px", "img/s", "ratio")]
    conv = result["conversion"]
    if "skipped" in conv:
        rows.append(("conversion vs naive full decode", "-", "skipped", conv["skipped"]))
    else:
        rows.append((f"conversion (decode+resize {conv['short_side']}+CLAHE)", "full",
                     f"{conv['convert_img_s']:.1f}", f"{conv['convert_vs_naive_decode']:.2f} x naive decode"))
        rows.append((f"naive full decode ({conv['mean_megapixels']:.1f} Mpx)", "full",
                     f"{conv['naive_decode_img_s']:.1f}", "1.00"))
    amp = result.get("settings", {}).get("amp", "O0")  # a result without settings: fp32
    for size, r in result["sizes"].items():
        rows.append((f"bare train step (MindSpore, amp {amp})", size, f"{r['step_img_s']:.1f}", "1.00"))
        for level, img_s in r.get("amp_step_img_s", {}).items():
            rows.append((f"bare train step at train.amp={level}", size, f"{img_s:.1f}",
                         f"{r['amp_vs_step'][level]:.2f} x bare step"))
        rows.append(("input pipeline alone (training, augmented)", size, f"{r['pipeline_img_s']:.1f}",
                     f"{r['pipeline_vs_step']:.2f} x bare step"))
        rows.append(("input pipeline, the Pillow ops of older runs", size, f"{r['pil_pipeline_img_s']:.1f}",
                     f"now / Pillow {r['pipeline_vs_pil']:.2f}"))
        rows.append(("input pipeline, evaluation's (MindSpore C++ ops only)", size,
                     f"{r['eval_pipeline_img_s']:.1f}", f"{r['eval_pipeline_vs_step']:.2f} x bare step"))
        rows.append(("end to end (pipeline -> step)", size, f"{r['end_to_end_img_s']:.1f}",
                     f"{r['end_to_end_vs_step']:.2f} x bare step"))
        if r["torch_step_img_s"] is not None:
            rows.append(("PyTorch train step, same AlexNet", size, f"{r['torch_step_img_s']:.1f}",
                         f"MindSpore/PyTorch {r['mindspore_vs_torch']:.2f}"))
        else:
            rows.append(("PyTorch train step", size, "-", result["torch"]["reason"]))
    text = text_table(rows, ("left", "right", "right", "left"))
    for size, r in result["sizes"].items():
        if "kernels" in r:
            text += f"\n\n{kernel_table(r['kernels'], size)}"
    return text


def text_table(rows: list[tuple], align: tuple[str, ...]) -> str:
    """Rows of formatted cells (the first is the header) as aligned text columns."""
    # disable_numparse: the cells are formatted already; tabulate would turn "1.00" into "1"
    return tabulate(rows[1:], headers=rows[0], colalign=align, disable_numparse=True)


def kernel_table(kernels: dict, size: str) -> str:
    """ms per step by oneDNN primitive and pass, each framework's implementation named."""
    names = [name for name in ("mindspore", "torch") if name in kernels]
    by_what: dict = {}
    for name in names:
        for key, ms_taken in kernels[name]["onednn"]["ms"].items():
            what, impl = key.rsplit(" [", 1)
            cell = by_what.setdefault(what, {}).setdefault(name, [0.0, []])
            cell[0] += ms_taken
            cell[1].append(impl.rstrip("]"))
    header = ["oneDNN kernel, ms per step", "px"]
    for name in names:
        header += [f"{'MindSpore' if name == 'mindspore' else 'PyTorch'} ms", "implementation"]
    rows = [tuple(header)]
    order = sorted(by_what, key=lambda w: -max(c[0] for c in by_what[w].values()))
    for what in order:
        row = [what, size]
        for name in names:
            ms_taken, impls = by_what[what].get(name, [0.0, ["-"]])
            row += [f"{ms_taken:.1f}", "/".join(sorted(set(impls)))]
        rows.append(tuple(row))
    totals = (("all oneDNN kernels", "onednn_ms"),
              ("outside oneDNN (other kernels, the framework)", "outside_onednn_ms"),
              ("whole step (with the log on)", "step_ms"))
    for label, key in totals:
        row = [label, size]
        for name in names:
            row += [f"{kernels[name][key]:.1f}", ""]
        rows.append(tuple(row))
    return text_table(rows, ("left", "right") + ("right", "left") * len(names))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = bench(cfg, run_dir)
    out = Path(cfg.out) if cfg.out is not None else run_dir / "bench.json"
    write_json(out, result)
    print(table(result), flush=True)
    print(to_json(result, indent=2), flush=True)
    log.info("bench: done in %.0f s -> %s", result["wall_time_s"], out)


if __name__ == "__main__":
    # call the module imported under its real name: MindSpore's jit can read the source of
    # what it compiles
    from xray.bench import main as entrypoint

    entrypoint()
