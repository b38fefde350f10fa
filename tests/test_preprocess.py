"""xray.preprocess: one preprocessing function (evaluation's pipeline and predict on the raw
JPEG give identical tensors; runs from before MindSpore's C++ ops keep Pillow's), CLAHE and
histogram equalisation, and decoding that refuses a decompression bomb."""
import numpy as np
import pytest
from PIL import Image

from helpers import SAMPLE, TINY, TINY_OLD_DEFAULT, bomb_png, make_cfg, xray_like
from xray.checkpoint import load_trained_model
from xray.data import make_eval_dataset, preprocess_spec, read_manifest, split_file, task_records
from xray.preprocess import (Preprocess, clahe, equalize_hist, load_image, preprocess_file, standardize,
                             to_tensor)


@pytest.mark.parametrize("channels, equalize, tta, pipeline", [
    (1, "none", 1, "mindspore"), (3, "none", 1, "mindspore"), (1, "clahe", 1, "mindspore"),
    (1, "hist", 3, "mindspore"), (1, "clahe", 1, "pil"), (3, "hist", 1, "pil")])
def test_eval_pipeline_equals_predict_on_raw_jpeg(sample_data, channels, equalize, tta, pipeline):
    """The C++ ops in the pipeline and run eagerly by predict give the same tensors; so does
    the Pillow path that runs trained before them keep."""
    manifest = read_manifest(sample_data)
    spec = preprocess_spec(manifest, image_size=96, channels=channels, equalize=equalize, pipeline=pipeline)
    dataset = make_eval_dataset(task_records(split_file(sample_data, manifest, "test")), spec, batch_size=4,
                                workers=2, with_names=True, tta=tta)
    seen = 0
    shape = (channels, 96, 96) if tta == 1 else (tta, channels, 96, 96)
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        for image, label, name in zip(batch["image"], batch["label"], batch["file_name"]):
            cls = "PNEUMONIA" if label == 1 else "NORMAL"
            raw = SAMPLE / "test" / cls / str(name)
            direct = preprocess_file(raw, spec, tta)
            assert image.dtype == np.float32 and image.shape == shape
            assert np.array_equal(image, direct), name
            seen += 1
    assert seen == manifest["splits"]["test"]["images"] == 20


@pytest.mark.unit
def test_to_tensor_normalizes_with_the_given_statistics():
    spec = Preprocess(short_side=128, image_size=70, mean=0.5, std=0.25)
    x = to_tensor(np.full((128, 150), 255, np.uint8), spec)
    assert x.shape == (1, 70, 70) and np.allclose(x, 2.0)


@pytest.mark.unit
def test_clahe_with_one_tile_and_no_clip_is_global_equalisation():
    """One tile, no clipping: every pixel maps through the image's own cumulative histogram."""
    image = xray_like(seed=1)
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    expected = np.rint(cdf[image] * 255.0 / image.size)
    assert np.abs(clahe(image, tiles=1, clip_limit=0) - expected).max() <= 1



@pytest.mark.unit
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



@pytest.mark.unit
def test_standardize_follows_the_runs_preprocess():
    image = xray_like(seed=3)
    spec = lambda e: Preprocess(short_side=120, image_size=72, mean=0.5, std=0.25, equalize=e)  # noqa: E731
    assert np.array_equal(standardize(image, spec("none")), image)
    assert np.array_equal(standardize(image, spec("hist")), equalize_hist(image))
    assert np.array_equal(standardize(image, spec("clahe")), clahe(image))


@pytest.mark.unit
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000  # 169 Mpixels decoded
    with pytest.raises(Exception, match="exceeds limit|over the limit"):
        load_image(bomb, 128)
    small = tmp_path / "small.png"
    Image.new("L", (3000, 2000)).save(small)
    with pytest.raises(ValueError, match=r"3000x2000 = 6 Mpixels is over the limit of 5 Mpixels"):
        load_image(small, 128, max_pixels=5_000_000)
    assert load_image(small, 128).shape == (128, 192)


def test_a_run_trained_before_the_cpp_ops_keeps_its_pillow_preprocessing(trained_run, tmp_path):
    """A run whose config.yaml records no `pipeline` (its checkpoints, of format 1, record no
    identity) loads as `pil` and predicts with Pillow."""
    from omegaconf import OmegaConf

    from old_runs import save_format1
    from xray.checkpoint import read_checkpoint
    config = OmegaConf.load(trained_run / "config.yaml")
    assert config.preprocess.pipeline == "mindspore"
    del config.preprocess["pipeline"]
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    OmegaConf.save(config, old / "config.yaml")
    save_format1(read_checkpoint(trained_run / "checkpoints" / "best.ckpt"), old / "checkpoints" / "best.ckpt")
    model = load_trained_model(old / "checkpoints" / "best.ckpt")
    assert model.spec.pipeline == "pil"
    image = next(SAMPLE.glob("test/NORMAL/*.jpeg"))
    new = preprocess_file(image, load_trained_model(trained_run / "checkpoints" / "best.ckpt").spec)
    assert not np.array_equal(preprocess_file(image, model.spec), new)  # Pillow's resize, not area
    assert np.abs(preprocess_file(image, model.spec) - new).mean() < 0.1  # ... of the same image


def test_resuming_a_run_from_before_the_cpp_ops_keeps_its_pillow_pipeline(trained_run, tmp_path):
    """An interrupted run begun with Pillow preprocessing (a format-1 checkpoint, its config.yaml
    records no `pipeline`) finishes with Pillow preprocessing; a new run gets MindSpore's."""
    from omegaconf import OmegaConf

    from old_runs import old_run
    from xray.checkpoint import read_state
    from xray.train import train
    old = old_run("binary", tmp_path / "old_run", trained_run / "checkpoints")
    (old / "metrics.json").unlink()  # interrupted after epoch 2 of 3: last.ckpt, no result
    config = OmegaConf.load(old / "config.yaml")
    del config.preprocess["pipeline"]
    config.epochs = 3
    OmegaConf.save(config, old / "config.yaml")
    data_dir = OmegaConf.load(trained_run / "config.yaml").data.dir
    result = train(make_cfg("config", TINY_OLD_DEFAULT + [f"data.dir={data_dir}", "epochs=3", "train.eval_splits=[]",
                                                          "train.cam_images=0", "train.keep_last=true"]), old)
    assert result["status"] == "ok" and result["epochs_completed"] == 3
    assert OmegaConf.load(old / "config.yaml").preprocess.pipeline == "pil"
    assert read_state(old / "checkpoints" / "last.ckpt").identity["preprocess"]["pipeline"] == "pil"
    assert OmegaConf.load(trained_run / "config.yaml").preprocess.pipeline == "mindspore"