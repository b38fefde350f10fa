"""The one preprocessing path, shared by convert, train, evaluate and predict.

An image goes through three steps:
1. `load_image`: any file Pillow reads -> upright 8-bit grayscale, shorter side = short_side.
   Convert stores this array (an uncompressed 8-bit BMP) in MindRecord; predict applies it to a raw file.
2. `standardize`: the run's optional contrast normalisation (`equalize`: none, hist, clahe),
   before any augmentation, so that intensity augmentation is not undone by it.
3. `to_tensor`: that array (possibly augmented during training) -> the model input, a
   normalized float32 CHW tensor: resize to the square input, normalize, HWC -> CHW, done by
   MindSpore's C++ vision ops (`tensor_ops`; `pipeline: mindspore`). The dataset pipelines run
   those ops; predict runs the very same ops eagerly on one image. Runs trained before them
   record no `pipeline` and keep the Pillow path they were trained with (`pipeline: pil`).
`model_input` = steps 2 + 3: evaluate's pipeline and predict call the same function.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

MIN_IMAGE_SIZE = 67  # AlexNet's three 3/2 max-pools need at least a 1x1 map at the end
MAX_PIXELS = 64_000_000  # decoded pixels an input may have (8000 x 8000); chest X-rays are < 10 M


@dataclass(frozen=True)
class Preprocess:
    """Everything that defines the model input; saved with every training run."""

    short_side: int  # shorter side of the stored image (set at conversion)
    image_size: int  # square model input
    mean: float  # train-split pixel mean, pixels in [0, 1]
    std: float  # train-split pixel std
    channels: int = 1  # 1 = grayscale; 3 = grayscale repeated (for RGB-shaped models)
    equalize: str = "none"  # none | hist (global histogram equalisation) | clahe (local)
    pipeline: str = "pil"  # mindspore (C++ vision ops, every run since format 2) | pil (older runs)

    def to_dict(self) -> dict:
        return asdict(self)


EQUALIZE = ("none", "hist", "clahe")
PIPELINES = ("mindspore", "pil")
FORMAT = 2  # of converted data sets: 2 = uncompressed BMP + height/width + stored CLAHE (1 = PNG)
STORED_EQUALIZE = ("clahe",)  # equalisations convert stores next to the image, as image_<name>


def _to_grayscale(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit 'L' (16-bit is scaled, not clipped)."""
    if im.mode == "L":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (e.g. PNG): full range 0..65535 -> 0..255
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # flatten transparency onto black, the background of an X-ray
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")  # CMYK, YCbCr, P, 1, ...
    return im.convert("L")


def load_image(source: Union[str, Path, bytes], short_side: int,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (path or bytes) into an upright uint8 HxW array whose shorter
    side is `short_side`. Raises OSError/ValueError for anything that is not a valid image,
    and ValueError for one that would decode to more than max_pixels pixels (a
    decompression bomb: a small file that fills the memory), before decoding it."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a skip with a reason
        return _load(fp, short_side, max_pixels)


def _load(fp, short_side: int, max_pixels: int) -> np.ndarray:
    with Image.open(fp) as im:
        if im.format == "JPEG":
            # decode at a reduced scale (1/2, 1/4, 1/8) that is still >= short_side
            im.draft("L", (short_side, short_side))
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} = {w * h / 1e6:.0f} Mpixels is over the limit of "
                             f"{max_pixels / 1e6:.0f} Mpixels (max_pixels; a decompression bomb?)")
        im.load()  # raises on truncated / corrupt data
        im = ImageOps.exif_transpose(im)
        im = _to_grayscale(im)
        w, h = im.size
        scale = short_side / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


def encode_stored(image: np.ndarray) -> bytes:
    """A uint8 HxW array as MindRecord stores it: an uncompressed 8-bit BMP (lossless, nothing
    to decompress: numpy reads it as a view, MindSpore's C++ Decode reads it as an image)."""
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="BMP")
    return buf.getvalue()


def stored_image(data: Union[bytes, np.ndarray], height: int, width: int) -> np.ndarray:
    """MindRecord image bytes (encode_stored) -> uint8 HxW array, without a decoder: the
    pixels start at the offset in bytes 10-13, rows bottom-up, each padded to 4 bytes."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    height, width = int(height), int(width)
    stride = (width + 3) // 4 * 4
    rows = np.frombuffer(raw, np.uint8, count=stride * height, offset=int.from_bytes(raw[10:14], "little"))
    return np.ascontiguousarray(rows.reshape(height, stride)[::-1, :width])


def decode_ops() -> list:
    """MindSpore's C++ ops from stored bytes to the uint8 HxW image (== stored_image)."""
    import mindspore.dataset.vision as vision

    return [vision.Decode(), vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY)]


def tensor_ops(spec: Preprocess) -> list:
    """MindSpore's C++ ops from a uint8 HxW image to the model input (normalized float32
    CxSxS, the gray channel repeated C = spec.channels times): squash to the square input
    (keeps the whole chest in view rather than cropping its sides) with area interpolation (no
    aliasing when it shrinks), HWC -> CHW float, normalize. The eval pipeline maps them after
    decode_ops; `to_tensor` runs them eagerly."""
    import mindspore.dataset.vision as vision

    ops = [vision.Resize((spec.image_size, spec.image_size), vision.Inter.AREA)]
    if spec.channels == 3:
        ops.append(vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB))
    # ToTensor: HxW(xC) uint8 -> CxHxW float32 / 255 (a plain HxW gets its channel axis)
    return ops + [vision.ToTensor(),
                  vision.Normalize([spec.mean] * spec.channels, [spec.std] * spec.channels, is_hwc=False)]


@lru_cache(maxsize=16)
def _eager_tensor_ops(spec: Preprocess):
    import mindspore.dataset.transforms as transforms

    return transforms.Compose(tensor_ops(spec))


def to_tensor(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 HxW -> normalized float32 CxSxS, S = spec.image_size."""
    image = np.asarray(image)
    if spec.pipeline == "mindspore":
        return _eager_tensor_ops(spec)(np.ascontiguousarray(image))
    if image.shape != (spec.image_size, spec.image_size):
        # squash to a square: keeps the whole chest in view rather than cropping its sides
        resized = Image.fromarray(image, "L").resize(
            (spec.image_size, spec.image_size), Image.Resampling.BILINEAR
        )
        image = np.asarray(resized)
    x = (image.astype(np.float32) / 255.0 - spec.mean) / spec.std
    return np.repeat(x[None], spec.channels, axis=0).astype(np.float32)




def equalize_hist(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 image (Pillow's ImageOps.equalize)."""
    return np.asarray(ImageOps.equalize(Image.fromarray(image, "L")))


def clahe(image: np.ndarray, tiles: int = 8, clip_limit: float = 2.0) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 HxW image.

    One equalisation curve per tile of a tiles x tiles grid, each histogram clipped at
    clip_limit x its mean bin count (the excess spread evenly over all bins), then every pixel
    mapped through the curves of its four nearest tile centres, bilinearly weighted (as in
    OpenCV's and scikit-image's CLAHE)."""
    h, w = image.shape
    ty, tx = min(tiles, h), min(tiles, w)
    rows = np.minimum(np.arange(h) * ty // h, ty - 1)  # tile row/column of every pixel
    cols = np.minimum(np.arange(w) * tx // w, tx - 1)
    tile_of = rows[:, None] * tx + cols[None, :]
    hist = np.bincount((tile_of * 256 + image).ravel(), minlength=ty * tx * 256)
    hist = hist.reshape(ty * tx, 256).astype(np.float64)
    if clip_limit > 0:
        limit = np.maximum(clip_limit * hist.sum(axis=1, keepdims=True) / 256, 1.0)
        excess = np.maximum(hist - limit, 0).sum(axis=1, keepdims=True)
        hist = np.minimum(hist, limit) + excess / 256
    cdf = np.cumsum(hist, axis=1)
    lut = (cdf / cdf[:, -1:] * 255.0).reshape(ty, tx, 256)

    def neighbours(n_pixels: int, n_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # tile centres at (k + 0.5) * size; pixels outside the outer centres clamp to them
        pos = (np.arange(n_pixels) + 0.5) * n_tiles / n_pixels - 0.5
        lo = np.clip(np.floor(pos), 0, n_tiles - 1).astype(np.int64)
        hi = np.minimum(lo + 1, n_tiles - 1)
        weight = np.clip(pos - lo, 0.0, 1.0)
        return lo, hi, weight

    y0, y1, wy = neighbours(h, ty)
    x0, x1, wx = neighbours(w, tx)
    v = image.astype(np.int64)
    top = lut[y0[:, None], x0[None, :], v] * (1 - wx) + lut[y0[:, None], x1[None, :], v] * wx
    bottom = lut[y1[:, None], x0[None, :], v] * (1 - wx) + lut[y1[:, None], x1[None, :], v] * wx
    out = top * (1 - wy[:, None]) + bottom * wy[:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def standardize(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    """The run's contrast normalisation of a stored uint8 HxW image."""
    return standardize_by_name(image, spec.equalize)


def standardize_by_name(image: np.ndarray, equalize: str) -> np.ndarray:
    if equalize == "hist":
        return equalize_hist(image)
    if equalize == "clahe":
        return clahe(image)
    return image


def model_input(image: np.ndarray, spec: Preprocess, tta: int = 1) -> np.ndarray:
    """A stored (or freshly loaded) image -> the model input (CxSxS) as evaluation and predict
    see it; with tta > 1 its first `tta` test-time views (VxCxSxS), standardized first as in
    training."""
    return standardized_input(standardize(image, spec), spec, tta)


def standardized_input(image: np.ndarray, spec: Preprocess, tta: int = 1) -> np.ndarray:
    """`model_input` of an image that is already standardized (e.g. the stored CLAHE)."""
    from xray.augment import tta_views

    if tta <= 1:
        return to_tensor(image, spec)
    return np.stack([to_tensor(view, spec) for view in tta_views(image, tta)])


def preprocess_file(path: Union[str, Path], spec: Preprocess, tta: int = 1) -> np.ndarray:
    """A raw image file -> model input, exactly as evaluation sees it."""
    return model_input(load_image(path, spec.short_side), spec, tta)
