"""xray.augment: the intensity levers, the crop box, the one-resampling warp of a training view,
the order intensity -> standardisation -> crop, and the test-time-augmentation views."""
import numpy as np
import pytest
from PIL import Image

from helpers import gray_pattern, xray_like
from xray.augment import TTA_VIEWS, adjust_intensity, augment, crop_box, resize_box, rotate, tta_views, warp
from xray.preprocess import Preprocess, equalize_hist, model_input

pytestmark = pytest.mark.unit

OFF = {"brightness": 0, "contrast": 0, "gamma": 0, "blur": 0, "noise": 0}


@pytest.mark.parametrize("lever", ["brightness", "contrast", "gamma", "blur", "noise"])
def test_each_intensity_lever_changes_pixels_and_zero_turns_it_off(lever):
    image = xray_like()
    assert np.array_equal(adjust_intensity(image, np.random.default_rng(0), OFF), image)
    strength = {"brightness": 0.3, "contrast": 0.3, "gamma": 0.3, "blur": 2.0, "noise": 0.05}[lever]
    out = adjust_intensity(image, np.random.default_rng(0), {**OFF, lever: strength})
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(out.astype(int) - image).mean() > 0.5
    if lever == "blur":
        assert np.abs(np.diff(out.astype(float), axis=1)).mean() < np.abs(np.diff(image.astype(float), axis=1)).mean()
    if lever == "contrast":  # around the mean: the mean stays about the same
        assert abs(out.mean() - image.mean()) < 1.5


def test_augment_is_a_function_of_its_seed():
    cfg = {"scale": [0.75, 1.0], "ratio": [0.8, 1.25], "degrees": 7, **OFF, "gamma": 0.3, "noise": 0.02}
    image = xray_like()
    a = augment(image, np.random.default_rng(5), cfg, 64)
    b = augment(image, np.random.default_rng(5), cfg, 64)
    c = augment(image, np.random.default_rng(6), cfg, 64)
    assert a.shape == (64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("h, w", [(100, 100), (256, 400)])
def test_crop_box_keeps_area_and_relative_aspect_in_range(h, w):
    areas, aspects = [], []
    for seed in range(200):
        left, top, right, bottom = crop_box(h, w, np.random.default_rng(seed), (0.5, 0.9), (0.8, 1.25))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        areas.append((right - left) * (bottom - top) / (h * w))
        aspects.append((right - left) / (bottom - top) / (w / h))  # relative to the image's own
    assert 0.47 < min(areas) and max(areas) < 0.93 and np.std(areas) > 0.05
    assert 0.76 < min(aspects) and max(aspects) < 1.31 and np.std(aspects) > 0.05
    image = gray_pattern(h, w)
    out = resize_box(image, crop_box(h, w, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0)), 50)
    whole = np.asarray(Image.fromarray(image).resize((50, 50), Image.Resampling.BILINEAR))
    assert np.array_equal(out, whole)  # area 1, the image's own aspect: the whole image


def test_tta_views_and_their_tensor_stack():
    image = gray_pattern(80, 100)
    views = tta_views(image, len(TTA_VIEWS))
    assert np.array_equal(views[0], image) and len(views) == len(TTA_VIEWS)
    assert views[1].shape == (round(80 * 0.85 ** 0.5), round(100 * 0.85 ** 0.5))
    assert not np.array_equal(views[2], image) and views[2].shape == image.shape
    spec = Preprocess(short_side=80, image_size=72, mean=0.5, std=0.25)
    stack = model_input(image, spec, tta=3)
    assert stack.shape == (3, 1, 72, 72) and np.array_equal(stack[0], model_input(image, spec))
    with pytest.raises(ValueError, match="tta=9"):
        tta_views(image, 9)


def test_augment_shifts_intensity_then_standardizes_then_crops():
    """Evaluation normalises the stored image; training must normalise the shifted stored
    image the same way (not a crop, not after the shift's effect would be kept)."""
    image = xray_like(120, 150)
    seen = []

    def spy(x):
        seen.append(x.copy())
        return equalize_hist(x)

    cfg = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "degrees": 0, **OFF, "gamma": 0.5}
    out = augment(image, np.random.default_rng(1), cfg, 64, standardize=spy)
    assert seen[0].shape == image.shape and not np.array_equal(seen[0], image)  # shifted, full size
    expected = np.asarray(Image.fromarray(equalize_hist(seen[0])).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("size, box, degrees", [(227, (10, 5, 280, 240), 5.0), (227, (0, 0, 310, 256), -6.0),
                                                (96, (20, 10, 300, 250), 4.0), (64, (0, 0, 310, 256), 0.0),
                                                (67, (10, 20, 110, 120), 10.0), (96, (0, 0, 310, 256), 7.0)])
def test_warp_is_one_crop_resize_rotation(size, box, degrees):
    """The single resampling of a training view = crop, resize and rotation done in turn
    (within a gray level on a smooth image; 20-45 when it turns the wrong way), shrinking by 4x
    included, with the same black corners where the rotation uncovers nothing (also for an
    inner crop, whose surroundings must not leak in)."""
    y, x = np.mgrid[0:256, 0:310]
    image = (127 + 60 * np.sin(x / 17.0) + 60 * np.cos(y / 23.0)).astype(np.uint8)
    image[100:140, 50:60] = 255  # a mark that shows a rotation the wrong way round
    steps = resize_box(image, box, size)
    steps = rotate(steps, degrees) if degrees else steps
    warped = warp(image, box, degrees, size)
    # the edge of an uncovered corner may fall one pixel either way: compare the image itself
    both = (warped > 0) & (steps > 0)
    assert np.abs(warped.astype(float) - steps)[both].mean() < 1.0
    assert abs(int((warped == 0).sum()) - int((steps == 0).sum())) <= 0.1 * max(1, (steps == 0).sum())
