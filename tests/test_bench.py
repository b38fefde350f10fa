"""xray.bench: every measurement is there and its ratios add up, in one run; PyTorch's absence is
reported, not a crash; the clock skips warm-up; the table keeps the numbers as formatted. Never
asserts on speed: the numbers depend on the machine and its load."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import make_cfg
from xray.bench import (TORCH_MISSING, bench, bench_torch, check_bench, enough_data, kernel_table,
                        onednn_kernel_times, table, timed, torch_alexnet)
from xray.data import read_manifest, split_file, task_records
from xray.errors import XrayError

# tiny: one 72 px size, batches of 8, one warm-up step and two timed ones, one pipeline worker
TINY = ["sizes=[72]", "batch_size=8", "steps=2", "warmup=1", "pipeline_steps=2", "data.workers=1",
        "fullres_repeats=1"]
ROW_KEYS = ("pipeline_img_s", "step_img_s", "end_to_end_img_s", "pipeline_vs_step", "end_to_end_vs_step",
            "pil_pipeline_img_s", "pipeline_vs_pil", "eval_pipeline_img_s", "eval_pipeline_vs_step")


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture
def fullres(tmp_path):
    """Two full-size grayscale JPEGs (the shared originals need not be on every machine)."""
    folder = tmp_path / "fullres" / "train" / "NORMAL"
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:1200, 0:1500]
    for i in range(2):
        pixels = ((x // 7 + y // 5 + i * 40) % 256).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"IM-000{i}-0001.jpeg", quality=90)
    return tmp_path / "fullres"


def test_bench_measures_everything_and_reports_missing_torch(sample_data, fullres, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    # just more batches than the sample's train split holds: it is streamed twice over
    train_images = read_manifest(sample_data)["splits"]["train"]["images"]
    steps = train_images // 8
    cfg = make_cfg("bench", TINY + [f"steps={steps}", f"pipeline_steps={steps}", f"data.dir={sample_data}",
                                    f"fullres={fullres}", "amp_levels=[O2]"])
    result = bench(cfg, tmp_path)
    assert result["settings"]["train_repeats"] == 2

    conv = result["conversion"]
    assert conv["images"] == 2 and conv["mean_megapixels"] == pytest.approx(1.8)  # 1500 x 1200
    assert positive(conv["naive_decode_img_s"])
    assert conv["convert_vs_naive_decode"] == pytest.approx(conv["convert_img_s"] / conv["naive_decode_img_s"])
    assert list(result["sizes"]) == ["72"]
    row = result["sizes"]["72"]
    for key in ROW_KEYS:
        assert positive(row[key]), (key, row)
    assert row["pipeline_vs_step"] == pytest.approx(row["pipeline_img_s"] / row["step_img_s"])
    assert row["end_to_end_vs_step"] == pytest.approx(row["end_to_end_img_s"] / row["step_img_s"])
    assert row["pipeline_vs_pil"] == pytest.approx(row["pipeline_img_s"] / row["pil_pipeline_img_s"])
    assert row["eval_pipeline_vs_step"] == pytest.approx(row["eval_pipeline_img_s"] / row["step_img_s"])
    # the step at another mixed-precision level, as a ratio to the step at train.amp (O0)
    assert list(row["amp_step_img_s"]) == ["O2"] and positive(row["amp_step_img_s"]["O2"])
    assert row["amp_vs_step"]["O2"] == pytest.approx(row["amp_step_img_s"]["O2"] / row["step_img_s"])
    # no torch: said so, not a crash, and no made-up numbers
    assert result["torch"] == {"available": False, "reason": TORCH_MISSING}
    assert row["torch_step_img_s"] is None and row["mindspore_vs_torch"] is None
    assert result["machine"]["usable_cpus"] >= 1
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN or inf anywhere

    text = table(result)
    for what in ("conversion", "naive full decode", "bare train step (MindSpore, amp O0)",
                 "bare train step at train.amp=O2", "input pipeline alone",
                 "Pillow ops of older runs", "evaluation's (MindSpore C++ ops only)", "end to end",
                 TORCH_MISSING):
        assert what in text, text


@pytest.mark.unit
def test_the_clock_starts_after_warm_up(monkeypatch):
    """img/s counts the timed steps only: the warm-up's (compiling) steps are left out."""
    import time

    from omegaconf import OmegaConf

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    cfg = OmegaConf.create({"warmup": 2, "steps": 4, "batch_size": 8})

    def body(i, item):
        now[0] += 100.0 if i < cfg.warmup else 0.5

    assert timed(range(10), cfg, "step", body) == pytest.approx(8 / 0.5)
    with pytest.raises(XrayError, match=r"step: the data gave fewer than warmup \+ steps = 6 batches"):
        timed(range(5), cfg, "step", body)


@pytest.mark.unit
def test_the_table_keeps_the_numbers_as_formatted_and_right_aligned():
    row = {"step_img_s": 100.0, "pipeline_img_s": 300.0, "pipeline_vs_step": 3.0, "pil_pipeline_img_s": 150.0,
           "pipeline_vs_pil": 2.0, "eval_pipeline_img_s": 900.0, "eval_pipeline_vs_step": 9.0,
           "end_to_end_img_s": 95.0, "end_to_end_vs_step": 0.95, "torch_step_img_s": 50.0,
           "mindspore_vs_torch": 2.0}
    conversion = {"short_side": 256, "convert_img_s": 40.0, "convert_vs_naive_decode": 2.5,
                  "mean_megapixels": 1.8, "naive_decode_img_s": 16.0}
    lines = table({"conversion": conversion, "sizes": {"96": row, "227": row}}).splitlines()
    assert lines[0].split() == ["what", "px", "img/s", "ratio"]
    bare = [line for line in lines if line.startswith("bare train step")]
    assert [line.split()[-3:] for line in bare] == [["96", "100.0", "1.00"], ["227", "100.0", "1.00"]]
    end = lines[0].index("img/s") + len("img/s")  # right-aligned: every img/s ends under the header's end
    assert all(line[:end].endswith(".0") for line in lines[2:]), lines


def test_a_small_train_split_is_repeated(sample_data, tmp_path):
    """MindDataset takes no more indices than records: a small set is repeated in a copy."""
    from xray.bench import train_batches
    from xray.data import preprocess_spec

    same, repeats = enough_data(sample_data, 10, tmp_path)
    assert (same, repeats) == (sample_data, 1)
    records = task_records(split_file(sample_data, read_manifest(sample_data), "train"))
    n = len(records.indices)
    copy, repeats = enough_data(sample_data, 2 * n + 1, tmp_path)
    assert repeats == 3 and copy != sample_data
    manifest = read_manifest(copy)
    big = task_records(split_file(copy, manifest, "train"))
    assert len(big.indices) == manifest["splits"]["train"]["images"] == 3 * n
    assert np.array_equal(big.targets, np.tile(records.targets, 3))
    cfg = make_cfg("bench", TINY + ["batch_size=4"])
    spec = preprocess_spec(manifest, 72, 1)
    assert sum(1 for _ in train_batches(cfg, big, spec, epoch=1)) == 3 * n // 4


def test_torch_alexnet_is_the_same_network():
    """The PyTorch comparison trains xray.model.AlexNet's layers: same parameter shapes."""
    torch = pytest.importorskip("torch")
    from xray.model import AlexNet

    for norm in ("lrn", "batch", "none"):
        ms_shapes = [tuple(p.shape) for p in AlexNet(2, 1, norm).trainable_params()]
        torch_net = torch_alexnet(torch, 2, 1, norm, 0.5)
        assert [tuple(p.shape) for p in torch_net.parameters()] == ms_shapes
        assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in torch_net) == (2 if norm == "lrn" else 0)
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in torch_net) == (5 if norm == "batch" else 0)
    assert torch_net(torch.zeros(2, 1, 72, 72)).shape == (2, 2)


def test_torch_step_runs():
    torch = pytest.importorskip("torch")
    cfg = make_cfg("bench", TINY)
    threads = torch.get_num_threads()
    assert positive(bench_torch(torch, cfg, 72, 2, threads=1))
    assert torch.get_num_threads() == threads  # restored


@pytest.mark.parametrize("override, message", [
    ("sizes=[50]", "sizes=[50] must be a list of integers >= 67"),
    ("sizes=[]", "must be a list of integers"),
    ("steps=0", "steps=0 must be an integer >= 1"),
    ("warmup=0", "warmup=0 must be an integer >= 1"),
    ("pipeline_steps=0", "pipeline_steps=0 must be an integer >= 1"),
    ("fullres=/nonexistent", "fullres=/nonexistent is not a folder"),
    ("torch=maybe", "torch=maybe must be true or false"),
    ("kernels=1", "kernels=1 must be true or false"),
    ("amp_levels=[O5]", "amp_levels=['O5'] must be a list of train.amp levels"),
    ("amp_levels=O2", "amp_levels=O2 must be a list of train.amp levels"),
    ("lr=-1", "lr=-1 must be a number > 0"),
])
def test_bad_values_are_one_line(override, message):
    with pytest.raises(XrayError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_bench(make_cfg("bench", [override]))


# oneDNN's verbose log, as MindSpore 2.10 and PyTorch print it (shortened): one exec line per
# kernel run, its time in ms last; creation and info lines are not runs
VERBOSE_STEP = """onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,x64:gemm:jit,forward_training,src:f32,,alg,mb8,0.5
onednn_verbose,v1,primitive,exec,cpu,convolution,x64:gemm:jit,forward_training,src:f32::blocked:abcd::f0,,alg:convolution_direct,mb8_ic1oc96,{conv}
onednn_verbose,v1,primitive,exec,cpu,pooling,simple_nchw:any,forward_training,src:f32,,alg:pooling_max,mb8ic96,0.25
onednn_verbose,v1,primitive,exec,cpu,matmul,gemm:jit:f32,undef,src:f32::blocked:ab::f0,,,8x9216:9216x4096,2.5
onednn_verbose,v1,primitive,exec,cpu,convolution,x64:gemm:jit,backward_data,src:f32,,alg:convolution_direct,mb8,1.0
some line of the framework's own
onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:abcd:f0 dst_f32::blocked:Acdb8a:f0,,,96x1x11x11,0.5
"""


def test_the_onednn_log_is_summed_per_kernel_over_the_timed_steps():
    """Three steps, the first (warm-up) slow: only the last two count, per step; kinds, passes and
    implementations stay apart; creation lines and other output are not runs."""
    log = "onednn_verbose,info,oneDNN v3.1\n" + VERBOSE_STEP.format(conv=100.0) + \
        VERBOSE_STEP.format(conv=3.0) + VERBOSE_STEP.format(conv=5.0)
    times = onednn_kernel_times(log, steps_run=3, steps_timed=2)
    assert times["lines_per_step"] == 5 and times["uneven"] == 0
    assert times["ms"] == {
        "convolution forward_training [x64:gemm:jit]": pytest.approx(4.0),
        "matmul [gemm:jit:f32]": pytest.approx(2.5),
        "convolution backward_data [x64:gemm:jit]": pytest.approx(1.0),
        "reorder [jit:uni]": pytest.approx(0.5),
        "pooling forward_training [simple_nchw:any]": pytest.approx(0.25),
    }
    assert list(times["ms"])[0].startswith("convolution forward_training")  # largest first
    # a log that does not split into equal steps says so
    assert onednn_kernel_times(log + VERBOSE_STEP.splitlines()[2], 3, 2)["uneven"] == 1


def test_bench_splits_each_step_by_onednn_kernel(sample_data, tmp_path):
    """kernels=true: MindSpore's real step (and PyTorch's, when installed) in a child process with
    oneDNN's log on; the convolutions are there, and the parts add up to the step."""
    cfg = make_cfg("bench", TINY + [f"data.dir={sample_data}", "fullres=null", "kernels=true"])
    result = bench(cfg, tmp_path)
    kernels = result["sizes"]["72"]["kernels"]
    try:
        import torch  # noqa: F401
        assert set(kernels) == {"mindspore", "torch"}
    except ImportError:
        assert set(kernels) == {"mindspore"}
    for name, k in kernels.items():
        assert k["onednn"]["uneven"] == 0, name
        convs = [w for w in k["onednn"]["ms"] if w.startswith("convolution ")]
        assert {w.split(" [")[0] for w in convs} >= {
            "convolution forward_training", "convolution backward_data", "convolution backward_weights"}, (name, k)
        assert positive(k["step_ms"]) and positive(k["onednn_ms"])
        assert k["onednn_ms"] == pytest.approx(sum(k["onednn"]["ms"].values()))
        assert k["onednn_ms"] + k["outside_onednn_ms"] == pytest.approx(k["step_ms"])
    text = table(result)
    assert "convolution forward_training" in text and "whole step" in text, text
    assert kernel_table(kernels, "72") in text
