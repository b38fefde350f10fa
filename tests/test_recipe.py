"""The shift-robust recipe's switches: intensity augmentation, contrast normalisation, label
smoothing, balanced sampling (tests/test_data_order.py), test-time augmentation, ensembles."""
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE, TINY, make_cfg, gray_pattern
from xray.augment import TTA_VIEWS, adjust_intensity, augment, crop_box, resize_box, tta_views
from xray.checkpoint import load_trained_model, resolve_checkpoints
from xray.errors import XrayError
from xray.evaluate import evaluate
from xray.losses import SoftmaxCrossEntropy, SoftmaxMSE
from xray.predict import predict_images
from xray.preprocess import Preprocess, clahe, equalize_hist, model_input, standardize

ms.set_device("CPU")
OFF = {"brightness": 0, "contrast": 0, "gamma": 0, "blur": 0, "noise": 0}


def xray_like(h=120, w=150, seed=0):
    """A smooth low-contrast image with detail, like an under-exposed X-ray."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 90 + 30 * np.sin(x / 9.0) * np.cos(y / 13.0) + rng.normal(0, 3, (h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


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


def test_clahe_with_one_tile_and_no_clip_is_global_equalisation():
    """One tile, no clipping: every pixel maps through the image's own cumulative histogram."""
    image = xray_like(seed=1)
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    expected = np.rint(cdf[image] * 255.0 / image.size)
    assert np.abs(clahe(image, tiles=1, clip_limit=0) - expected).max() <= 1


def test_clahe_raises_local_contrast_and_keeps_order():
    image = xray_like(seed=2)
    out = clahe(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.std() > 1.5 * image.std()  # a low-contrast image gets stretched (clip-limited)
    # the corner up to half a tile (120/8/2 rows, 150/8/2 columns) maps through the corner
    # tile's curve alone: monotonic, brighter stays brighter
    tile, mapped = image[:7, :9].ravel(), out[:7, :9].ravel()
    order = np.argsort(tile, kind="stable")
    assert np.all(np.diff(mapped[order].astype(int)) >= 0)


def test_standardize_follows_the_runs_preprocess():
    image = xray_like(seed=3)
    spec = lambda e: Preprocess(short_side=120, image_size=72, mean=0.5, std=0.25, equalize=e)  # noqa: E731
    assert np.array_equal(standardize(image, spec("none")), image)
    assert np.array_equal(standardize(image, spec("hist")), equalize_hist(image))
    assert np.array_equal(standardize(image, spec("clahe")), clahe(image))


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


def test_label_smoothing_matches_its_formula():
    logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = np.eye(2)[labels] * 0.9 + 0.05
    expected = -(target * logp).sum(1).mean()
    got = SoftmaxCrossEntropy(label_smoothing=0.1)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got == pytest.approx(expected, rel=1e-5)
    p = np.exp(logp)
    got_mse = SoftmaxMSE(2, label_smoothing=0.1)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    assert got_mse == pytest.approx(((p - target) ** 2).sum(1).mean(), rel=1e-5)


def test_the_screening_experiment_is_the_recipe_that_met_the_goal():
    """+experiment=screening (issue 7): the subtype recipe of the README's two-seed mean, read as
    pneumonia vs normal at the threshold that keeps val sensitivity >= 0.93, and the defaults'
    threshold rule is that one too."""
    cfg = make_cfg("config", ["+experiment=screening"])
    assert (cfg.task.name, cfg.epochs, cfg.data.image_size) == ("subtype", 32, 96)
    assert (cfg.data.equalize, cfg.data.sampling) == ("none", "balanced")
    assert cfg.data.augment.brightness > 0 and cfg.data.augment.gamma > 0  # intensity augmentation
    assert (cfg.train.threshold_rule, cfg.train.target_sensitivity) == ("sensitivity", 0.93)
    defaults = make_cfg("config"), make_cfg("evaluate")
    assert [(c.get("train", c).threshold_rule, c.get("train", c).target_sensitivity) for c in defaults] == \
        [("sensitivity", 0.93)] * 2


def test_bad_recipe_values_are_config_errors(sample_data, tmp_path):
    from xray.train import train
    for override, message in [("data.equalize=sharpen", "data.equalize=sharpen must be one of none, hist, clahe"),
                              ("data.sampling=stratified", "data.sampling=stratified must be one of shuffle, balanced"),
                              ("loss.label_smoothing=1.5", r"loss.label_smoothing=1.5 must be a number in \[0, 1\)")]:
        cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", override])
        with pytest.raises(XrayError, match=message):
            train(cfg, tmp_path / override.split("=")[0])


@pytest.fixture(scope="module")
def recipe_run(sample_data, tmp_path_factory):
    """Every lever on: intensity augmentation, CLAHE, label smoothing, balanced sampling."""
    from xray.train import train
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    cfg = make_cfg("config", TINY + [f"data.dir={sample_data}", "epochs=1", "data/augment=intensity",
                                     "data.equalize=clahe", "loss.label_smoothing=0.1",
                                     "data.sampling=balanced", "seed=3"])
    result = train(cfg, run_dir)
    assert result["status"] == "ok"
    return run_dir


@pytest.mark.slow
def test_a_recipe_run_records_its_preprocess_and_evaluates_val_and_test(recipe_run):
    import yaml
    config = yaml.safe_load((recipe_run / "config.yaml").read_text())
    assert config["preprocess"]["equalize"] == "clahe"
    assert config["data"]["augment"]["gamma"] == 0.3 and config["data"]["sampling"] == "balanced"
    metrics = json.loads((recipe_run / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"val", "test"}
    assert metrics["hparams"]["equalize"] == "clahe" and metrics["hparams"]["label_smoothing"] == 0.1
    test = json.loads((recipe_run / "eval_test.json").read_text())
    assert metrics["eval"]["test"]["youden"]["auc"] == test["youden"]["auc"]["value"]
    assert test["youden"]["chosen_on"] == "val: sensitivity >= 0.93"  # the defaults' rule


@pytest.mark.slow
def test_predict_reproduces_evaluation_with_clahe_and_tta(recipe_run, trained_run, tmp_path):
    model = load_trained_model(recipe_run / "checkpoints" / "best.ckpt")
    evaluate([model.checkpoint], "test", bootstrap=0, workers=1, tta=3)
    csv = (recipe_run / "predictions_test_tta3.csv").read_text().splitlines()[1:]
    evaluated = {line.split(",")[0]: float(line.split(",")[2]) for line in csv}
    images = sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[:4]
    for r in predict_images([model], images, tta=3):
        assert r["p_pneumonia"] == pytest.approx(evaluated[r["file"].rsplit("/", 1)[1]], abs=1e-5)
    # tta=3 is the mean of the three views' probabilities
    image = np.asarray(Image.open(images[0]).convert("L"))
    views = model_input(image, model.spec, tta=3)
    per_view = [model.probabilities(v[None])[0] for v in views]
    assert model.probabilities(views[None])[0] == pytest.approx(np.mean(per_view), abs=1e-6)


@pytest.mark.slow
def test_an_ensemble_averages_its_members(recipe_run, trained_run, tmp_path):
    a, b = trained_run / "checkpoints" / "best.ckpt", recipe_run / "checkpoints" / "best.ckpt"
    result = evaluate([a, b], "test", bootstrap=0, workers=1, out_dir=tmp_path)
    assert result["checkpoint"] == [str(a), str(b)]
    read = lambda f: {l.split(",")[0]: float(l.split(",")[2]) for l in f.read_text().splitlines()[1:]}  # noqa: E731
    evaluate([a], "test", bootstrap=0, workers=1)
    evaluate([b], "test", bootstrap=0, workers=1)
    pa, pb = read(trained_run / "predictions_test.csv"), read(recipe_run / "predictions_test.csv")
    both = read(tmp_path / "predictions_test.csv")
    assert pa.keys() == both.keys()
    for name, p in both.items():
        assert p == pytest.approx((pa[name] + pb[name]) / 2, abs=2e-6)
    models = [load_trained_model(a), load_trained_model(b)]
    image = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    [r] = predict_images(models, [image])
    assert r["p_pneumonia"] == pytest.approx(both[image.name], abs=1e-5)
    with pytest.raises(XrayError, match="folder of their own"):
        evaluate([a, b], "test", bootstrap=0, workers=1)


def test_resolve_checkpoints(tmp_path):
    assert resolve_checkpoints("a.ckpt") == [tmp_path.__class__("a.ckpt")]
    assert [p.name for p in resolve_checkpoints(["x/a.ckpt", "y/b.ckpt"])] == ["a.ckpt", "b.ckpt"]
    for ckpt in (None, ""):
        with pytest.raises(XrayError, match="ckpt is not set"):
            resolve_checkpoints(ckpt)
    (tmp_path / "members" / "1").mkdir(parents=True)
    (tmp_path / "members" / "1" / "best.ckpt").write_bytes(b"x")
    assert resolve_checkpoints(str(tmp_path), 1) == [tmp_path]  # its best.ckpt
    (tmp_path / "members" / "2").mkdir(parents=True)
    (tmp_path / "members" / "2" / "best.ckpt").write_bytes(b"x")
    assert resolve_checkpoints(str(tmp_path), 2) == [tmp_path / "members" / str(i) / "best.ckpt" for i in (1, 2)]
    with pytest.raises(XrayError, match="holds 2 ranked members, not top_k=3; run .*--top-k 3"):
        resolve_checkpoints(str(tmp_path), 3)
    with pytest.raises(XrayError, match="top_k works with a best folder"):
        resolve_checkpoints(["a.ckpt"], 2)


@pytest.mark.slow
def test_predict_cli_takes_an_ensemble_and_tta(recipe_run, trained_run, tmp_path):
    image = sorted((SAMPLE / "test" / "NORMAL").glob("*.jpeg"))[0]
    ckpts = f"[{trained_run}/checkpoints/best.ckpt,{recipe_run}/checkpoints/best.ckpt]"
    proc = subprocess.run([sys.executable, "-m", "xray.predict", f"ckpt={ckpts}", f"image={image}",
                           "tta=2", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith(str(image))]
    assert len(row) == 1
    models = [load_trained_model(trained_run / "checkpoints" / "best.ckpt"),
              load_trained_model(recipe_run / "checkpoints" / "best.ckpt")]
    [expected] = predict_images(models, [image], tta=2)
    assert float(row[0].split()[2]) == pytest.approx(expected["p_pneumonia"], abs=1e-4)


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
    from xray.augment import rotate, warp
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
