"""Training augmentation and test-time views, on uint8 HxW images.

Every random draw comes from a numpy Generator the caller seeds per sample (see
xray.data.epoch_plan), so an epoch's augmentation is fixed by (seed, epoch, position): a
different draw every epoch, the same draw in a rerun, and in a resumed run, whatever the number
of pipeline workers. Intensity first, on the stored image (brightness, contrast, gamma, blur,
noise: the shifts a new hospital's X-rays bring), then the run's contrast normalisation, as an
evaluated image gets it, then geometry: a random crop squashed to the model input and rotated, in
one resampling (`warp`; runs trained before it did crop-resize and rotation in turn: `augment`).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import cv2
import numpy as np
from PIL import Image, ImageFilter

# one image per call, in the input pipeline's worker processes: OpenCV's own threads would only
# compete with them (and with training) for the cores
cv2.setNumThreads(1)


def crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: area a fraction in `scale` of the image,
    aspect ratio the image's own times a factor in `ratio` (log-uniform); the whole image if
    no such crop fits in 10 tries. Relative to the image's aspect, so that a wide image is
    squashed to the square input about as much as evaluation squashes it whole."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = w / h * math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    return 0, 0, w, h


def resize_box(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The (left, top, right, bottom) part of the image resized to size x size (Pillow)."""
    return np.asarray(Image.fromarray(image, "L").resize((size, size), Image.Resampling.BILINEAR, box=box))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, same size, black (the X-ray background) where nothing was."""
    return np.asarray(Image.fromarray(image, "L").rotate(degrees, Image.Resampling.BILINEAR))


def center_crop(image: np.ndarray, area: float) -> np.ndarray:
    """The central part holding `area` of the image (same aspect ratio)."""
    h, w = image.shape
    side = math.sqrt(area)
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[y:y + ch, x:x + cw]


def adjust_intensity(image: np.ndarray, rng: np.random.Generator, cfg: Mapping,
                     blur_scale: float = 1.0) -> np.ndarray:
    """Brightness (x * b), contrast (around the mean), gamma (x ** g), Gaussian blur and noise,
    each drawn uniformly up to its config strength; 0 turns one off. The blur radius is in
    pixels of the model input; blur_scale converts it to this image's pixels."""
    brightness, contrast = float(cfg.get("brightness", 0)), float(cfg.get("contrast", 0))
    gamma, blur, noise = float(cfg.get("gamma", 0)), float(cfg.get("blur", 0)), float(cfg.get("noise", 0))
    if not (brightness or contrast or gamma or blur or noise):
        return image
    if blur:
        radius = rng.uniform(0, blur) * blur_scale
        image = np.asarray(Image.fromarray(image, "L").filter(ImageFilter.GaussianBlur(radius)))
    x = image.astype(np.float32) / 255.0
    if brightness:
        x = x * rng.uniform(1 - brightness, 1 + brightness)
    if contrast:
        mean = x.mean()
        x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    if gamma:
        x = np.clip(x, 0, 1) ** math.exp(rng.uniform(-gamma, gamma))
    if noise:
        x = x + rng.normal(0, rng.uniform(0, noise), x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


INTENSITY = ("brightness", "contrast", "gamma", "blur", "noise")


def has_intensity(cfg: Mapping | None) -> bool:
    """Whether an augmentation config changes pixel values (not only geometry)."""
    return cfg is not None and any(float(cfg.get(k, 0)) for k in INTENSITY)


def geometry(h: int, w: int, rng: np.random.Generator, cfg: Mapping) -> tuple[tuple, float]:
    """The random crop box (see crop_box) and rotation in degrees of one training view."""
    box = crop_box(h, w, rng, tuple(cfg["scale"]), tuple(cfg["ratio"]))
    degrees = float(cfg.get("degrees", 0))
    return box, (float(rng.uniform(-degrees, degrees)) if degrees else 0.0)


def intensity_then_standardize(image: np.ndarray, rng: np.random.Generator, cfg: Mapping, size: int,
                               standardize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The pixel-value part of a training view: intensity shifts, then `standardize` (the
    run's contrast normalisation, as evaluation applies it)."""
    image = adjust_intensity(image, rng, cfg, blur_scale=min(image.shape) / size)
    return standardize(image)


def warp(image: np.ndarray, box: tuple[int, int, int, int], degrees: float, size: int) -> np.ndarray:
    """The (left, top, right, bottom) part of the image, squashed to size x size and rotated
    by `degrees` about its centre (counter-clockwise, black where nothing was), in one bilinear
    resampling (OpenCV's affine warp, about 3x faster than the Pillow affine transform it
    replaced; the two differ by half a gray level). A box at least twice the output size along
    an axis is first shrunk by an integer factor along it (box filter), so the warp never aliases
    the way a 1:3 bilinear sampling would, and stays close to evaluation's area resize."""
    left, top, right, bottom = box
    # cut to the box first (corners a rotation uncovers are black, as in evaluation's views);
    # shrink by an integer factor per axis where the box is more than twice the output
    factors = (max(1, (right - left) // size), max(1, (bottom - top) // size))
    if max(factors) > 1:
        cut = np.asarray(Image.fromarray(image, "L").reduce(factors, box=box))
    else:
        cut = np.ascontiguousarray(image[top:bottom, left:right])
    sx, sy = (right - left) / factors[0] / size, (bottom - top) / factors[1] / size
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    half = size / 2
    # output pixel centre (x + 0.5, y + 0.5) -> rotated about the output centre -> the cut's
    # coordinates (x' = ax + by + c); OpenCV indexes pixel centres, hence the half-pixel shifts
    a, b, c = sx * cos, -sx * sin, sx * (half - cos * half + sin * half)
    d, e, f = sy * sin, sy * cos, sy * (half - sin * half - cos * half)
    inverse = np.array([[a, b, (a + b) / 2 + c - 0.5], [d, e, (d + e) / 2 + f - 0.5]])
    # "transparent": a pixel whose source is outside the cut keeps its 0, so the edges of the
    # uncovered corners stay sharp (a constant border would blend them into black)
    out = np.zeros((size, size), np.uint8)
    return cv2.warpAffine(cut, inverse, (size, size), dst=out,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_TRANSPARENT)


def augment(image: np.ndarray, rng: np.random.Generator, cfg: Mapping, size: int,
            standardize: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """One training view of a stored uint8 HxW image as runs with `pipeline: pil` made it:
    intensity shifts, `standardize`, then a random resized crop to size x size (Pillow) and a
    rotation. (`pipeline: mindspore`: xray.data.TrainBatch, same draws, one warp.)"""
    image = intensity_then_standardize(image, rng, cfg, size, standardize)
    box, degrees = geometry(*image.shape, rng, cfg)
    image = resize_box(image, box, size)
    return rotate(image, degrees) if degrees else image


# Test-time augmentation: fixed views within the training augmentation's range, each
# (kept centre area, rotation in degrees); tta=K averages the first K. View 1 is the image.
TTA_VIEWS = ((1.0, 0.0), (0.85, 0.0), (1.0, 5.0), (1.0, -5.0), (0.85, 5.0))


def tta_views(image: np.ndarray, count: int) -> list[np.ndarray]:
    """The first `count` test-time views of a uint8 HxW image."""
    if not 1 <= count <= len(TTA_VIEWS):
        raise ValueError(f"tta={count} must be between 1 and {len(TTA_VIEWS)}")
    views = []
    for area, degrees in TTA_VIEWS[:count]:
        view = center_crop(image, area) if area < 1 else image
        views.append(rotate(view, degrees) if degrees else view)
    return views
