"""ONNX export (xray/export.py, docs/export.md): what blocks MindSpore's exporter, that the
export-friendly network is the trained one bit for bit, onnxruntime vs MindSpore parity on the
real sample X-rays preprocessed by the project, and the docs' snippet run as written.

Most tests need no training: a run folder is made the way training leaves one (config.yaml with
its preprocess block, checkpoints/best.ckpt, calibration.json) around an AlexNet with fixed
random He-normal weights, large enough that its probabilities spread over the images."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops
from omegaconf import OmegaConf

import xray
from helpers import REPO, make_cfg
from xray.checkpoint import load_trained_model
from xray.labels import task_classes
from xray.model import AlexNet
from xray.registry import create_model
from xray.preprocess import Preprocess, preprocess_file

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
export = pytest.importorskip("xray.export")

ms.set_device("CPU")

TOLERANCE = 1e-5  # max |p_onnxruntime - p_mindspore| (and snippet vs xray.predict) asserted
DOCS = REPO / "docs" / "export.md"
IMAGES = sorted(xray.SAMPLE_DIR.glob("*/*/*.jpeg"))  # the 60 shipped X-rays
SNIPPET_IMPORTS = {"json", "sys", "numpy", "onnxruntime", "PIL"}

# Two fake runs that differ in everything the export depends on: a 72 px binary model as the old
# defaults made it, with LRN and CLAHE, calibrated (1x1 last map: the pool replicates); and a 3-class model
# with batch norm, 3 channels, histogram equalisation, at 180 px (a 4x4 last map: overlapping bins,
# the float64 path of the rewritten pool).
RUNS = {
    "binary72": dict(task="binary", image_size=72, short_side=128, equalize="clahe", channels=1,
                     norm="lrn", temperature=1.7),
    "subtype180": dict(task="subtype", image_size=180, short_side=256, equalize="hist", channels=3,
                       norm="batch", temperature=0.8),
}


def he_normal(net: nn.Cell, seed: int) -> None:
    """Fixed random weights with He scaling (and biases and batch-norm statistics that matter):
    logits of order 1-10."""
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        shape = p.shape
        if p.name.endswith("weight"):
            data = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif p.name.endswith(("moving_variance", "gamma")):
            data = rng.uniform(0.5, 2.0, shape)
        else:
            data = rng.normal(0, 0.1, shape)
        p.set_data(ms.Tensor(data.astype(np.float32)))


def make_run(folder: Path, task: str, image_size: int, short_side: int, equalize: str, channels: int,
             norm: str, temperature=None, seed: int = 0) -> Path:
    """A run folder as xray.train leaves it; returns its checkpoints/best.ckpt."""
    cfg = make_cfg("config", ["data=sample", f"task={task}", f"data.image_size={image_size}",
                              f"data.short_side={short_side}", f"data.equalize={equalize}",
                              f"model.in_channels={channels}", f"model.norm={norm}"])
    spec = Preprocess(short_side, image_size, mean=0.4821, std=0.2317, channels=channels,
                      equalize=equalize, pipeline="mindspore")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["preprocess"] = spec.to_dict()
    (folder / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(resolved), folder / "config.yaml")
    net = create_model(cfg.model, image_size, len(task_classes(task)))
    he_normal(net, seed)
    net.set_train(False)  # centre the logits on the sample: probabilities spread around 1/K
    logits = net(ms.Tensor(batch_of_spec(spec, IMAGES[::6]))).asnumpy()
    net.fc3.bias.set_data(ms.Tensor((net.fc3.bias.asnumpy() - logits.mean(axis=0)).astype(np.float32)))
    ckpt = folder / "checkpoints" / "best.ckpt"
    ms.save_checkpoint(net, str(ckpt))
    if temperature:
        (folder / "calibration.json").write_text(json.dumps({"temperature": temperature, "checkpoint": str(ckpt)}))
    return ckpt


@pytest.fixture(scope="module", params=list(RUNS))
def exported(request, tmp_path_factory):
    """(the loaded model, the ONNX file, export_onnx's result) of each fake run."""
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    ckpt = make_run(folder / "run", **RUNS[request.param])
    result = export.export_onnx(ckpt, folder / "model.onnx")
    return load_trained_model(ckpt), result["path"], result


def batch_of_spec(spec: Preprocess, paths) -> np.ndarray:
    """The model inputs of the image files, made by the project's own preprocessing."""
    return np.stack([preprocess_file(p, spec) for p in paths])


def batch_of(model, paths) -> np.ndarray:
    return batch_of_spec(model.spec, paths)


def onnx_probabilities(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([export.OUTPUT], {export.INPUT: batch})[0]


def snippet() -> str:
    """The python blocks of the docs' section "Using it without this project", in order."""
    section = DOCS.read_text().split("## Using it without this project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "expected the helpers block and the main block"
    return "\n\n".join(blocks)


# --- what blocks the plain export, and the rewrite -------------------------------------------

def test_adaptive_avg_pool_is_what_blocks_the_plain_export(tmp_path):
    """If a MindSpore upgrade exports AdaptiveAvgPool2D itself, this fails: the rewrite may go."""
    net = AlexNet(2, 1, norm="none")
    net.set_train(False)
    with pytest.raises(RuntimeError, match="AdaptiveAvgPool2D in convert map"):
        ms.onnx.export(net, ms.Tensor(np.zeros((1, 1, 72, 72), np.float32)), file_name=str(tmp_path / "plain"))


@pytest.mark.unit
@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 7), (6, 6), (9, 9), (13, 13), (12, 5)])
def test_rewritten_pool_is_bit_identical(height, width):
    x = ms.Tensor((np.random.default_rng(height * 31 + width).standard_normal((3, 16, height, width)) * 3)
                  .astype(np.float32))
    expected = nn.Flatten()(nn.AdaptiveAvgPool2d((6, 6))(x)).asnumpy()
    got = export.flat_adaptive_avg_pool(16, height, width)(x).asnumpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)


@pytest.mark.parametrize("size,norm", [(72, "lrn"), (72, "none"), (72, "batch"), (180, "lrn")])
def test_exportable_net_is_the_trained_net(size, norm):
    """Same probabilities bit for bit, same Parameter objects, names untouched."""
    net = AlexNet(3, 1, norm=norm)
    he_normal(net, seed=size)
    net.set_train(False)
    names = [p.name for p in net.get_parameters()]
    cell = export.exportable(net, size, 1)
    assert [p.name for p in net.get_parameters()] == names  # not prefixed by the wrapper
    assert {id(p) for p in cell.get_parameters()} == {id(p) for p in net.get_parameters()}
    assert sorted(p.name for p in cell.get_parameters()) == sorted(names)
    x = ms.Tensor(export.check_batch(1, size, n=3, seed=1))
    assert np.array_equal(cell(x).asnumpy(), ops.softmax(net(x), axis=1).asnumpy())


@pytest.fixture(scope="module")
def unexported(tmp_path_factory) -> Path:
    """A checkpoint of the 180 px run (a 4x4 last map), not exported."""
    return make_run(tmp_path_factory.mktemp("unexported") / "run", **RUNS["subtype180"])


def test_a_wrong_rewrite_is_refused(unexported, monkeypatch, tmp_path):
    """Break the pool (output bins in (j, i) order: a transpose) -> no file is written."""
    def transposed(height, width, out=(6, 6)):
        a, n = RIGHT(height, width, out)
        return a.reshape(-1, 6, 6).transpose(0, 2, 1).reshape(a.shape), n.reshape(6, 6).T.reshape(-1)

    RIGHT = export.adaptive_pool_matrix
    monkeypatch.setattr(export, "adaptive_pool_matrix", transposed)
    with pytest.raises(RuntimeError, match="differs from the trained one"):
        export.export_onnx(unexported, tmp_path / "model.onnx")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*"))


def test_an_op_the_exporter_lacks_is_one_line(unexported, monkeypatch, tmp_path, capsys):
    """Without the rewrite (softmax(net(x)) as it is): the CLI names the op in one line."""
    class Plain(nn.Cell):
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x):
            return ops.softmax(self.net(x), axis=1)

    monkeypatch.setattr(export, "exportable", lambda net, size, channels: Plain(net))
    with pytest.raises(SystemExit) as e:
        export.main([f"ckpt={unexported}", f"out={tmp_path / 'model.onnx'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and not list(tmp_path.glob("*"))
    assert "cannot export" in err and "AdaptiveAvgPool2D" in err, err


# --- parity: onnxruntime vs MindSpore on the sample X-rays -------------------------------------

def test_onnx_matches_mindspore_on_sample_images(exported):
    model, path, result = exported
    batch = batch_of(model, IMAGES)
    expected = model.class_probabilities(batch)
    got = onnx_probabilities(path, batch)  # all 60 in one batch: the batch axis is dynamic
    diff = float(np.abs(got - expected).max())
    print(f"{path.parent.name}: max |p_onnx - p_mindspore| = {diff:.2e} over {len(IMAGES)} images "
          f"(export check {result['max_abs_diff']:.2e}); p ranges {expected.min(0)} - {expected.max(0)}")
    assert got.shape == expected.shape == (len(IMAGES), len(model.classes))
    assert diff <= TOLERANCE
    assert np.ptp(expected, axis=0).min() > 0.2  # the probabilities vary: the comparison has teeth
    one = onnx_probabilities(path, batch[:1])
    assert np.abs(one - expected[:1]).max() <= TOLERANCE


def test_onnx_file_says_how_to_feed_it(exported):
    model, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    s = model.spec
    assert (inp.name, out.name) == (export.INPUT, export.OUTPUT)
    assert inp.shape[1:] == [s.channels, s.image_size, s.image_size] and isinstance(inp.shape[0], str)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["preprocess"]) == s.to_dict()
    assert tuple(json.loads(meta["classes"])) == model.classes
    assert ("temperature" in meta) == (model.temperature is not None)
    if model.temperature:
        assert float(meta["temperature"]) == model.temperature
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert {"fc1.weight", "fc3.bias", "features.0.weight"} <= names  # the checkpoint's names


# --- the docs' snippet, as written ------------------------------------------------------------

def run_snippet(tmp_path: Path, onnx_file: Path, images) -> dict[str, np.ndarray]:
    code = snippet()
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == SNIPPET_IMPORTS, imported  # numpy, Pillow, onnxruntime: no xray
    script = tmp_path / "use_onnx.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, "-I", str(script), str(onnx_file), *map(str, images)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = {}
    for line in done.stdout.splitlines():
        path, *probs = line.split(" ")
        out[path] = np.array([float(p.split("=")[1]) for p in probs])
    return out


def compare_with_predict(model, snippet_out: dict) -> float:
    from xray.predict import predict_images

    rows = predict_images([model], IMAGES)  # two classes: p of class 1 only (calibrated); K: all
    columns = [f"p_{c.lower()}" for c in model.classes]
    assert len(snippet_out) == len(rows) and all(r["label"] != "error" for r in rows)
    return max(abs(snippet_out[r["file"]][columns.index(k)] - r[k]) for r in rows for k in r if k in columns)


def test_docs_snippet_runs_as_written(exported, tmp_path):
    model, path, _ = exported
    diff = compare_with_predict(model, run_snippet(tmp_path, path, IMAGES))
    print(f"{path.parent.name}: max |p_snippet - p_xray.predict| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.unit
def test_snippet_preprocessing_is_the_projects_bit_for_bit():
    """model_input of the docs against xray.preprocess on the sample images, for every
    equalisation, 1 and 3 channels, several size pairs (area resize by 4/3, 1.78, 2.67, 1.13, 1)."""
    scope: dict = {}
    exec(snippet().split("session = ort.InferenceSession")[0], scope)  # imports + helpers only
    for short_side, size, equalize, channels in [(128, 72, "clahe", 1), (128, 96, "none", 1), (256, 96, "clahe", 1),
                                                 (256, 227, "hist", 3), (200, 200, "none", 1)]:
        spec = Preprocess(short_side, size, mean=0.4821, std=0.2317, channels=channels, equalize=equalize,
                          pipeline="mindspore")
        for path in IMAGES[::3]:
            got = scope["model_input"](str(path), spec.to_dict())
            expected = preprocess_file(path, spec)
            assert got.shape == (1, *expected.shape) and got.dtype == expected.dtype == np.float32
            assert np.array_equal(got[0], expected), (path.name, spec)


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("argv,message", [
    (["ckpt=nowhere/best.ckpt"], "not found"),
    ([], "ckpt is not set"),
    (["ckpt=a.ckpt", "format=tflite"], "format=tflite is unknown"),
    (["checkpoint=a.ckpt"], "unknown argument"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.unit
def test_cli_refuses_a_wrong_suffix(tmp_path, capsys):
    (tmp_path / "best.ckpt").write_bytes(b"not read")
    with pytest.raises(SystemExit):
        export.main([f"ckpt={tmp_path / 'best.ckpt'}", f"out={tmp_path / 'model.bin'}"])
    assert "must end in .onnx" in capsys.readouterr().err


# --- a really trained model ----------------------------------------------------------------------

@pytest.mark.slow
def test_trained_run_exports_with_parity(trained_run, tmp_path, capsys):
    """The conftest's 2-epoch run on the sample, through the command line."""
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    export.main([f"ckpt={ckpt}", f"out={tmp_path / 'best.onnx'}"])
    assert "best.onnx" in capsys.readouterr().out
    model = load_trained_model(ckpt)
    batch = batch_of(model, IMAGES)
    diff = float(np.abs(onnx_probabilities(tmp_path / "best.onnx", batch) - model.class_probabilities(batch)).max())
    snippet_diff = compare_with_predict(model, run_snippet(tmp_path, tmp_path / "best.onnx", IMAGES))
    print(f"trained run: max |p_onnx - p_mindspore| = {diff:.2e}, snippet vs predict {snippet_diff:.2e}")
    assert diff <= TOLERANCE and snippet_diff <= TOLERANCE
