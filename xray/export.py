"""A portable export: a trained checkpoint as ONNX, runnable with onnxruntime and no xray code.

`python -m xray.export ckpt=<run>/checkpoints/best.ckpt [out=model.onnx] [format=onnx|mindir]`

MindSpore 2.10 exports this AlexNet to ONNX but for one op: its ONNX exporter has no
AdaptiveAvgPool2D ("Can not find key AdaptiveAvgPool2D in convert map. Exporting
AdaptiveAvgPool2D operator is not yet supported."). Everything else (Conv2D also with the
LRN's constant band matrix, ReLU, Mul, Add, Exp, Log, MaxPool, Dense, Softmax) converts. At the
fixed input size of a trained model, the adaptive pool is a fixed linear map of the last
feature map, so `OnnxAlexNet` computes it as a MatMul with a constant 0/1 bin matrix divided by
the bin sizes, in float64 when a bin holds more than one value (MindSpore's CPU kernel sums in
double: in float32 it would differ by 1 ulp) -- bit-identical to nn.AdaptiveAvgPool2d. It shares
the trained net's cells, so no parameter is copied or renamed, and xray/model.py is untouched.

The exported graph: input `image` (N x C x S x S float32, the project's normalized model input,
any N), output `probabilities` (N x K softmax, uncalibrated). The file carries what it needs to
be fed in its metadata (onnxruntime: `session.get_modelmeta().custom_metadata_map`): `preprocess`
(the run's preprocess block as JSON), `classes` (JSON list, in the order of the outputs),
`temperature` (when the checkpoint was calibrated: apply it as xray.calibration.scale_probs does,
to p(class 1) of a two-class model, to the log probabilities of a K-class one), `task`, `checkpoint`. docs/export.md shows it used with numpy,
Pillow and onnxruntime only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xray.errors import XrayError, one_line_errors

INPUT, OUTPUT = "image", "probabilities"  # the ONNX graph's input and output names
TOLERANCE = 1e-5  # max |p_onnxruntime - p_mindspore| the export accepts on its check batch
FORMATS = ("onnx", "mindir")


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each of the `out` bins of nn.AdaptiveAvgPool2d over `size` positions
    (start = floor(i * size / out), end = ceil((i + 1) * size / out), overlapping when they
    do not divide)."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_pool_matrix(height: int, width: int, out: tuple[int, int] = (6, 6)) -> tuple[np.ndarray, np.ndarray]:
    """(A, n): A (height*width x oh*ow) with A[h*width + w, i*ow + j] = 1 when (h, w) is in output
    (i, j)'s bin, n (oh*ow) the bins' sizes: x.reshape(-1, height*width) @ A / n is the adaptive
    average pool, flattened in (i, j) order like nn.Flatten after it."""
    oh, ow = out
    a = np.zeros((height, width, oh, ow), np.float64)
    n = np.zeros((oh, ow), np.float64)
    for i, (h0, h1) in enumerate(adaptive_bins(height, oh)):
        for j, (w0, w1) in enumerate(adaptive_bins(width, ow)):
            a[h0:h1, w0:w1, i, j] = 1.0
            n[i, j] = (h1 - h0) * (w1 - w0)
    return a.reshape(height * width, oh * ow), n.reshape(oh * ow)


def _cells():
    """The two Cells, defined on first use (importing this module does not start MindSpore)."""
    import mindspore as ms
    from mindspore import nn, ops

    class FlatAdaptiveAvgPool(nn.Cell):
        """Flatten(AdaptiveAvgPool2d(out)(x)) for a fixed C x H x W input, as MatMul / bin sizes.

        Bit-identical to MindSpore's kernel: where every bin holds one value (the 1x1 map of
        67-98 px inputs, 2x2, 3x3, the 6x6 of 227 px) a float32 product with 0/1 weights is
        exact; otherwise the sums are taken in float64 as MindSpore's CPU kernel does."""

        def __init__(self, channels: int, height: int, width: int, out: tuple[int, int] = (6, 6)) -> None:
            super().__init__()
            a, n = adaptive_pool_matrix(height, width, out)
            self.exact32 = bool(np.all(n == 1))
            dtype = ms.float32 if self.exact32 else ms.float64
            self.bins = ms.Tensor(a, dtype)
            self.sizes = ms.Tensor(n, dtype)
            self.hw, self.flat = height * width, channels * out[0] * out[1]

        def construct(self, x):
            x = ops.reshape(x, (-1, self.hw))
            if self.exact32:
                y = ops.matmul(x, self.bins)
            else:
                y = ops.cast(ops.matmul(ops.cast(x, ms.float64), self.bins) / self.sizes, ms.float32)
            return ops.reshape(y, (-1, self.flat))

    class OnnxAlexNet(nn.Cell):
        """softmax(net(x)) of a trained xray AlexNet at one input size, with its adaptive pool as
        FlatAdaptiveAvgPool. Holds the net's own cells (auto_prefix=False: its parameters keep
        their names, e.g. fc1.weight, in the net, the checkpoint and the ONNX initializers)."""

        def __init__(self, net, image_size: int, channels: int) -> None:
            super().__init__(auto_prefix=False)
            self.features, self.pool = net.features, net.pool
            self.fc1, self.fc2, self.fc3, self.relu = net.fc1, net.fc2, net.fc3, net.relu
            probe = ms.Tensor(np.zeros((1, channels, image_size, image_size), np.float32))
            maps = self.pool(self.features(probe))
            _, c, h, w = maps.shape
            self.avgpool = FlatAdaptiveAvgPool(c, h, w, tuple(net.avgpool(maps).shape[2:]))
            self.softmax = nn.Softmax(axis=1)

        def construct(self, x):
            x = self.relu(self.fc1(self.avgpool(self.pool(self.features(x)))))
            x = self.relu(self.fc2(x))
            return self.softmax(self.fc3(x))

    return FlatAdaptiveAvgPool, OnnxAlexNet


def flat_adaptive_avg_pool(channels: int, height: int, width: int, out: tuple[int, int] = (6, 6)):
    """The exportable stand-in for nn.AdaptiveAvgPool2d(out) + nn.Flatten on C x H x W maps."""
    return _cells()[0](channels, height, width, out)


def exportable(net, image_size: int, channels: int = 1):
    """An export-friendly Cell computing softmax(net(x)) for N x channels x S x S inputs,
    S = image_size, sharing net's parameters (net is not changed). Eval mode."""
    cell = _cells()[1](net, image_size, channels)
    cell.set_train(False)
    return cell


def check_batch(channels: int, image_size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """A fixed normal batch shaped like normalized model inputs: what the export checks on."""
    return np.random.default_rng(seed).standard_normal((n, channels, image_size, image_size)).astype(np.float32)


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise XrayError(f"ONNX export needs the packages onnx and onnxruntime ({e}); "
                        "pip install onnx onnxruntime") from None
    return onnx, onnxruntime


def metadata(model) -> dict:
    """What a user of the ONNX file needs to feed it and read it, as strings."""
    meta = {"preprocess": json.dumps(model.spec.to_dict()), "classes": json.dumps(list(model.classes)),
            "task": model.task, "checkpoint": str(model.checkpoint)}
    if model.temperature:
        meta["temperature"] = repr(float(model.temperature))
    return meta


def export_onnx(checkpoint: Path, path: Path) -> dict:
    """The checkpoint (its run's config.yaml beside it, see load_trained_model) as an ONNX file at
    `path`, checked before it is moved into place: bit-identical in MindSpore to the trained net
    on a check batch, and within TOLERANCE of it in onnxruntime. Returns {path, max_abs_diff}."""
    from xray.checkpoint import load_trained_model

    _require_onnx()
    _check_suffix(Path(path))
    return export_model(load_trained_model(Path(checkpoint)), Path(path))


def _check_suffix(path: Path) -> None:
    if path.suffix != ".onnx":
        raise XrayError(f"out={path} must end in .onnx")


def export_model(model, path: Path) -> dict:
    """export_onnx for a loaded TrainedModel."""
    import mindspore as ms
    from mindspore import ops

    onnx, ort = _require_onnx()
    path = Path(path)
    _check_suffix(path)
    s = model.spec
    cell = exportable(model.net, s.image_size, s.channels)
    x = check_batch(s.channels, s.image_size)
    reference = ops.softmax(model.net(ms.Tensor(x)), axis=1).asnumpy()
    rewritten = cell(ms.Tensor(x)).asnumpy()
    if not np.array_equal(reference, rewritten):  # a bug here, not the user's
        raise RuntimeError("the export-friendly network differs from the trained one "
                           f"(max |diff| {np.abs(reference - rewritten).max():.3g})")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.onnx")
    try:
        try:
            ms.onnx.export(cell, ms.Tensor(x[:1]), file_name=str(partial), input_names=[INPUT],
                           output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except RuntimeError as e:  # e.g. an op the exporter does not know: its first line names it
            first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
            raise XrayError(f"MindSpore {ms.__version__} cannot export {model.checkpoint} to ONNX: {first}") from None
        proto = onnx.load(str(partial))
        for value in proto.graph.output:  # the exporter leaves the output's batch axis fixed at 1
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        for key, value in metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = (f"xray AlexNet ({model.task}: {', '.join(model.classes)}): input {INPUT} "
                            f"N x {s.channels} x {s.image_size} x {s.image_size} float32, normalized as in "
                            f"metadata 'preprocess'; output {OUTPUT} N x {len(model.classes)} softmax")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(partial))
        session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUT: x})[0]
        diff = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
        if not diff <= TOLERANCE:
            raise RuntimeError(f"onnxruntime disagrees with MindSpore on the exported model "
                               f"(max |p diff| {diff:.3g} > {TOLERANCE:g})")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": path, "max_abs_diff": diff}


def parse_args(argv: Sequence[str]) -> dict:
    """key=value arguments (ckpt, out, format), like the Hydra entrypoints take them."""
    args = {"ckpt": None, "out": None, "format": "onnx"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in args:
            raise XrayError(f"unknown argument {arg!r}; usage: python -m xray.export "
                            "ckpt=<run>/checkpoints/best.ckpt [out=<file>] [format=onnx|mindir]")
        args[key] = value
    if not args["ckpt"]:
        raise XrayError("ckpt is not set; e.g. python -m xray.export ckpt=outputs/train/<run>/checkpoints/best.ckpt")
    if args["format"] not in FORMATS:
        raise XrayError(f"format={args['format']} is unknown; use onnx or mindir")
    return args


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ckpt = Path(args["ckpt"])
    if ckpt.is_dir():
        ckpt = ckpt / "best.ckpt"
    if not ckpt.is_file():
        raise XrayError(f"ckpt={ckpt} not found; pass a .ckpt file, e.g. outputs/train/<run>/checkpoints/best.ckpt")
    out = Path(args["out"]) if args["out"] else ckpt.with_suffix(f".{args['format']}")
    from xray.device import setup_device

    setup_device("CPU")
    if args["format"] == "mindir":
        from xray.report import export_mindir

        if out.suffix != ".mindir":
            raise XrayError(f"out={out} must end in .mindir")
        export_mindir(ckpt, out)
        print(out, flush=True)
        return
    result = export_onnx(ckpt, out)
    print(f"{result['path']}  (onnxruntime vs MindSpore: max |p diff| {result['max_abs_diff']:.2g} "
          f"<= {TOLERANCE:g})", flush=True)


if __name__ == "__main__":
    main()
