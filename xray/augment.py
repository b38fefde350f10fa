"""Training augmentation and test-time views, on uint8 HxW images.

Every random draw comes from a numpy Generator the caller seeds per sample (see
xray.data.epoch_plan), so an epoch's augmentation is fixed by (seed, epoch, position): a
different draw every epoch, the same draw in a rerun, and in a resumed run, whatever the number
of pipeline workers. Intensity first, on the stored image (brightness, contrast, gamma, blur,
noise: the shifts a new hospital's X-rays bring), then the run's contrast normalisation, as an
evaluated image gets it, then geometry (random resized crop to the model input, rotation).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter


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


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """A random crop (see crop_box) resized to size x size."""
    box = crop_box(*image.shape, rng, scale, ratio)
    crop = Image.fromarray(image, "L").resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(crop)


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


def augment(image: np.ndarray, rng: np.random.Generator, cfg: Mapping, size: int,
            standardize: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """One training view of a stored uint8 HxW image: intensity shifts, then `standardize`
    (the run's contrast normalisation, as evaluation applies it), then a random resized crop
    to size x size and a rotation."""
    image = adjust_intensity(image, rng, cfg, blur_scale=min(image.shape) / size)
    image = standardize(image)
    image = random_resized_crop(image, rng, size, tuple(cfg["scale"]), tuple(cfg["ratio"]))
    degrees = float(cfg.get("degrees", 0))
    if degrees:
        image = rotate(image, rng.uniform(-degrees, degrees))
    return image


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
