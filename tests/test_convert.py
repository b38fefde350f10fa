"""Conversion: odd-but-valid images are converted right, bad files skipped and listed (or fatal
with strict), bad roots fail at once with one line, output appears atomically, one conversion
at a time per data.dir; the split of the training images into train and val (by patient,
stratified, seeded; the official val/ folder pooled or kept)."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mindspore.dataset as ds
import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE, copy_sample, gray_pattern
from xray.convert import Item, assign_splits, convert, split_by_patient
from xray.errors import XrayError
from xray.preprocess import clahe, load_image, stored_image

SHORT = 32


# -- load_image on odd but valid inputs --------------------------------------------------

def test_grayscale_jpeg_is_resized_to_short_side(image_file):
    path = image_file("a.jpeg", Image.fromarray(gray_pattern(40, 60)), quality=95)
    out = load_image(path, SHORT)
    assert out.dtype == np.uint8 and out.shape == (32, 48)


def test_exif_rotated_jpeg_is_made_upright(image_file):
    # stored 60 wide x 40 high, EXIF orientation 6 = display rotated 90 deg clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = image_file("rot.jpeg", Image.fromarray(gray_pattern(40, 60)), exif=exif, quality=95)
    out = load_image(path, SHORT)
    assert out.shape == (48, 32)  # upright: taller than wide
    upright = np.asarray(Image.fromarray(gray_pattern(40, 60)).transpose(Image.Transpose.ROTATE_270)
                         .resize((32, 48), Image.Resampling.LANCZOS), dtype=np.float64)
    assert np.abs(out - upright).mean() < 8  # same picture, not its mirror or another rotation


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "CMYK", "P", "LA", "1"])
def test_color_and_palette_modes_become_8bit_gray(image_file, mode):
    gray = np.full((40, 60), 120, np.uint8)
    gray[:, 30:] = 200
    im = Image.fromarray(gray).convert(mode)
    suffix = ".jpeg" if mode in ("RGB", "CMYK") else ".png"
    path = image_file(f"img{suffix}", im)
    out = load_image(path, 40)
    assert out.dtype == np.uint8 and out.shape == (40, 60)
    if mode != "1":  # 1-bit dithers
        assert abs(float(out[:, :25].mean()) - 120) < 12
        assert abs(float(out[:, 35:].mean()) - 200) < 12


def test_16bit_png_is_scaled_not_clipped(image_file):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (40, 1))
    path = image_file("deep.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, 40)
    assert out.min() <= 2 and out.max() >= 250
    assert 100 < out.mean() < 155  # a ramp, not a white sheet


def test_transparent_png_flattens_onto_black(image_file):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 20:, 3] = 255  # left half transparent
    out = load_image(image_file("t.png", Image.fromarray(rgba, "RGBA")), 40)
    assert out[:, :15].max() == 0 and out[:, 25:].min() == 255


def test_draft_decoding_matches_a_full_decode_on_real_fullres_xray():
    src = REPO.parent / "shared" / "data" / "chest_xray_fullres" / "train" / "NORMAL"
    files = sorted(src.glob("*.jpeg"))[:1]
    if not files:
        pytest.skip("../shared/data/chest_xray_fullres not present")
    fast = load_image(files[0], 256)
    with Image.open(files[0]) as im:
        w, h = im.size
        s = 256 / min(w, h)
        full = np.asarray(im.convert("L").resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS))
    assert fast.shape == full.shape
    assert np.abs(fast.astype(float) - full).mean() < 2.0  # same image to within JPEG noise


# -- convert on a whole tree --------------------------------------------------------------

def make_messy_tree(root: Path) -> dict:
    """Sample images + every odd-but-valid kind + every bad kind, in the Kaggle layout."""
    copy_sample(root, per_class=4)
    normal = root / "train" / "NORMAL"
    good = {
        "IM-9001-0001.jpeg": lambda p: Image.fromarray(gray_pattern()).convert("RGB").save(p),
        "IM-9002-0001.png": lambda p: Image.fromarray(gray_pattern()).convert("RGBA").save(p),
        "IM-9003-0001.jpeg": lambda p: Image.fromarray(gray_pattern()).convert("CMYK").save(p),
        "IM-9004-0001.png": lambda p: Image.fromarray(gray_pattern()).convert("P").save(p),
        "IM-9005-0001.png": lambda p: Image.fromarray(gray_pattern().astype(np.uint16) * 257).save(p),
    }
    for name, write in good.items():
        write(normal / name)
    real = sorted((root / "train" / "PNEUMONIA").glob("*.jpeg"))[0].read_bytes()
    bad = {
        "IM-9101-0001.jpeg": b"\xff\xd8\xff\xe0 this is not really a jpeg" * 20,  # corrupt
        "IM-9102-0001.jpeg": real[: len(real) // 2],  # truncated
        "IM-9103-0001.jpeg": b"",  # zero bytes
        "notes.jpeg": b"patient list, do not share\n",  # not an image
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(100),
    }
    for name, data in bad.items():
        (normal / name).write_bytes(data)
    return {"good": set(good), "bad": set(bad)}


def test_convert_keeps_odd_images_and_lists_bad_ones(tmp_path):
    kinds = make_messy_tree(tmp_path / "chest_xray")
    manifest = convert(tmp_path / "chest_xray", tmp_path / "out", short_side=SHORT, workers=2)
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == kinds["bad"]
    assert all(reason for reason in skipped.values())
    names = set()
    for split in ("train", "val"):
        d = ds.MindDataset(str(tmp_path / "out" / f"{split}.mindrecord"), shuffle=False)
        for row in d.create_dict_iterator(output_numpy=True):
            names.add(str(row["file_name"]))
            image = stored_image(row["image"], row["height"], row["width"])
            assert image.dtype == np.uint8 and min(image.shape[:2]) == SHORT
            assert np.array_equal(stored_image(row["image_clahe"], row["height"], row["width"]), clahe(image))
    assert kinds["good"] <= names
    counts = manifest["splits"]
    assert counts["train"]["images"] + counts["val"]["images"] == 8 + len(kinds["good"])
    assert counts["test"]["images"] == 8
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]


def test_strict_fails_and_leaves_nothing_behind(tmp_path):
    make_messy_tree(tmp_path / "chest_xray")
    with pytest.raises(XrayError, match="strict=true"):
        convert(tmp_path / "chest_xray", tmp_path / "out", short_side=SHORT, strict=True, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest_xray"]  # no out, no temp dir


def test_mean_std_come_from_train_only(tmp_path):
    copy_sample(tmp_path / "cx", per_class=5)
    m = convert(tmp_path / "cx", tmp_path / "out", short_side=SHORT, workers=1)
    pixels = {}
    for split in ("train", "val", "test"):
        d = ds.MindDataset(str(tmp_path / "out" / f"{split}.mindrecord"),
                           columns_list=["image", "height", "width"], shuffle=False)
        pixels[split] = np.concatenate([stored_image(r["image"], r["height"], r["width"]).ravel() / 255.0
                                        for r in d.create_dict_iterator(output_numpy=True)])
    assert m["mean"] == pytest.approx(pixels["train"].mean(), rel=1e-6)
    assert m["std"] == pytest.approx(pixels["train"].std(), rel=1e-4)
    everything = np.concatenate(list(pixels.values()))
    assert m["mean"] != pytest.approx(everything.mean(), rel=1e-6)


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    copy_sample(tmp_path / "cx", per_class=3)
    convert(tmp_path / "cx", tmp_path / "out", short_side=SHORT, workers=1, seed=1)
    before = (tmp_path / "out" / "manifest.json").read_text()
    with pytest.raises(XrayError, match="overwrite=true"):
        convert(tmp_path / "cx", tmp_path / "out", short_side=SHORT, workers=1)
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    convert(tmp_path / "cx", tmp_path / "out", short_side=40, workers=1, overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["short_side"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cx", "out"]


@pytest.mark.parametrize("layout, message", [
    (None, "does not exist"),
    ("nothing", "train is missing"),
    ("no_pneumonia", "PNEUMONIA is missing"),
    ("nested", "use data.root="),
])
def test_bad_roots_fail_at_once(tmp_path, layout, message):
    root = tmp_path / "root"
    if layout == "nothing":
        root.mkdir()
    elif layout == "no_pneumonia":
        (root / "train" / "NORMAL").mkdir(parents=True)
    elif layout == "nested":
        (root / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(XrayError, match=message):
        convert(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xray.convert", f"data.root={tmp_path / 'nowhere'}",
         f"data.dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data.root={tmp_path / 'nowhere'} does not exist; expected "
        "<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (Kaggle chest-xray-pneumonia)"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_pipelines_conversion_keeps_the_same_one_and_refuses_another(tmp_path):
    from jobs.pipeline import _convert, submit_pipeline
    from xray.preprocess import MAX_PIXELS

    out = tmp_path / "data"
    args = (str(SAMPLE), str(out), 128, "patients", 0.2, 42)
    first = _convert(*args, "subtype", MAX_PIXELS)
    stamp = (out / "train.mindrecord").stat().st_mtime_ns
    assert _convert(*args, "subtype", MAX_PIXELS)["created"] == first["created"]  # kept, not redone
    assert (out / "train.mindrecord").stat().st_mtime_ns == stamp
    # another split in the same data.dir: refused before anything is submitted, and by the job
    with pytest.raises(XrayError, match=f"data.dir={out} already holds something else"):
        submit_pipeline(["data=sample", f"data.dir={out}", "data.stratify=label"], tmp_path / "pipeline")
    assert not (tmp_path / "pipeline").exists()
    with pytest.raises(XrayError, match="exists"):
        _convert(*args, "label", MAX_PIXELS)
    # overwrite=true: converted again, with the split it asks for
    assert _convert(*args, "label", MAX_PIXELS, reconvert=True)["stratify"] == "label"
    assert json.loads((out / "manifest.json").read_text())["stratify"] == "label"


# -- one writer, places that cannot be written, inputs at the edges (issue 26) ------------------

def convert_cli(root, out, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "xray.convert", f"data.root={root}", f"data.dir={out}",
            "data.short_side=64", "workers=1", f"hydra.run.dir={run_dir}", *extra]


def one_line(proc) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_second_conversion_into_a_busy_data_dir_is_refused_naming_the_first(tmp_path):
    """Two real processes: while the first converts (frozen with SIGSTOP after it took the lock,
    so that it is surely still running), the second -- even with overwrite=true -- is refused in
    one line naming the first; the first then finishes as if alone and leaves no lock."""
    root = copy_sample(tmp_path / "cx", per_class=3)
    out = tmp_path / "data"
    first = subprocess.Popen(convert_cli(root, out, tmp_path / "run1"), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120  # until it writes (its temp folder beside data.dir)
        while not list(tmp_path.glob(".data.tmp-*")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert list(tmp_path.glob(".data.tmp-*")), f"the first conversion did not start: {first.poll()}"
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(convert_cli(root, out, tmp_path / "run2", "overwrite=true"),
                                    capture_output=True, text=True, cwd=tmp_path, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first_err = first.communicate(timeout=300)[1]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    error = one_line(second)
    assert f"{out} is in use: converting by" in error and f"pid {first.pid} " in error, error
    assert first.returncode == 0, first_err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"]["images"] == 6 and manifest["short_side"] == 64
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, no temp


@pytest.fixture
def read_only(tmp_path):
    """A small tmpfs holding `published/` (a converted data set, say), remounted read-only
    (root ignores file modes, a read-only mount it cannot ignore)."""
    disk = tmp_path / "ro"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {e}")
    try:
        (disk / "published").mkdir()
        (disk / "published" / "manifest.json").write_text("{}")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True, timeout=30)


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path, read_only):
    root = copy_sample(tmp_path / "cx", per_class=2)
    proc = subprocess.run(convert_cli(root, read_only / "data", tmp_path / "run"), capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    error = one_line(proc)
    assert f"{read_only / 'data'}" in error and "Read-only file system" in error, error
    assert "use another data.dir that you can write" in error
    for out in (read_only / "published", read_only / "new" / "data"):  # replaced; parent missing
        with pytest.raises(XrayError, match=rf"{out}.*Read-only.*data\.dir that you can write"):
            convert(root, out, short_side=SHORT, workers=1, overwrite=True)
    # a read-only mount *at* data.dir (its parent writable): refused before anything is decoded
    with pytest.raises(XrayError, match=rf"data\.dir={read_only} is a mount point"):
        convert(root, read_only, short_side=SHORT, workers=1, overwrite=True)
    assert (read_only / "published" / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cx", "ro", "run"]  # no lock, no temp left


def test_an_image_no_chest_xray_looks_like_is_skipped_before_it_fills_the_memory(tmp_path):
    """A 1x10000 PNG (~100 bytes) would become 128 x 1,280,000 px after the short-side resize
    (and 4 GB of float64 working copies): it is refused from its header, as is 10000x1; the
    rest converts, and the whole conversion's peak memory stays small."""
    root = copy_sample(tmp_path / "cx", per_class=3)
    thin = {"IM-9201-0001.png": (10000, 1), "IM-9202-0001.png": (1, 10000)}  # height, width
    for name, shape in thin.items():
        Image.fromarray(np.full(shape, 128, np.uint8)).save(root / "train" / "NORMAL" / name)
    assert max((root / "train" / "NORMAL" / n).stat().st_size for n in thin) < 200
    out = tmp_path / "data"
    measure = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", measure,
                           *convert_cli(root, out, tmp_path / "run", "data.short_side=128")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = int(proc.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss: KB, the largest process
    assert peak_mb < 1536, f"converting peaked at {peak_mb:.0f} MB"
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(thin)
    assert skipped["IM-9201-0001.png"].startswith("1x10000: aspect ratio 10000:1 is over max_aspect_ratio=4 ")
    assert skipped["IM-9202-0001.png"].startswith("10000x1: aspect ratio 10000:1 is over max_aspect_ratio=4 ")
    assert "it would become 128x1280000 pixels" in skipped["IM-9201-0001.png"]  # width x height
    splits = manifest["splits"]
    assert splits["train"]["images"] + splits["val"]["images"] == 6 and splits["test"]["images"] == 6


def test_the_aspect_ratio_limit_is_configurable(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=3)
    Image.fromarray(gray_pattern(40, 130)).save(root / "train" / "NORMAL" / "IM-9203-0001.png")  # 3.25:1
    skipped = convert(root, tmp_path / "a", short_side=SHORT, workers=1, max_aspect_ratio=3)["skipped"]
    assert [Path(s["file"]).name for s in skipped] == ["IM-9203-0001.png"]
    assert skipped[0]["reason"].startswith("130x40: aspect ratio 3.2:1 is over max_aspect_ratio=3 ")
    assert convert(root, tmp_path / "b", short_side=SHORT, workers=1)["skipped"] == []  # default 4
    with pytest.raises(XrayError, match="max_aspect_ratio=0.5 must be a number >= 1"):
        convert(root, tmp_path / "c", max_aspect_ratio=0.5)


@pytest.mark.parametrize("folder, leave", [
    ("train/NORMAL", []),
    ("train/PNEUMONIA", [".DS_Store"]),  # only hidden files: no image either
    ("test/NORMAL", []),
])
def test_an_empty_class_folder_is_refused_before_decoding(tmp_path, monkeypatch, folder, leave):
    root = copy_sample(tmp_path / "cx", per_class=3)
    for path in (root / folder).iterdir():
        path.unlink()
    for name in leave:
        (root / folder / name).write_bytes(b"\x00\x00\x00\x01Bud1")
    import xray.convert

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(xray.convert.mp, "get_context", no_decoding)
    with pytest.raises(XrayError, match=rf"^class folder {root / folder} holds (no files|only hidden "
                                        r"files \(\.DS_Store\)): every class needs images"):
        convert(root, tmp_path / "out", short_side=SHORT, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cx"]


def test_an_empty_class_folder_is_one_line_on_the_command_line(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=2)
    for path in (root / "train" / "NORMAL").iterdir():
        path.unlink()
    proc = subprocess.run(convert_cli(root, tmp_path / "out", tmp_path / "run"), capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert f"class folder {root / 'train' / 'NORMAL'} holds no files" in one_line(proc)
    assert not (tmp_path / "out").exists()


def test_a_class_folder_whose_every_file_is_skipped_is_refused(tmp_path):
    root = copy_sample(tmp_path / "cx", per_class=3)
    for path in (root / "train" / "NORMAL").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(XrayError, match=rf"class folder {root / 'train' / 'NORMAL'}: none of its 3 "
                                        r"files is a usable image \(all skipped; e\.g\. "):
        convert(root, tmp_path / "out", short_side=SHORT, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cx"]


# -- progress lines (xray.progress, used by convert and bench) --------------------------------

@pytest.mark.unit
def test_progress_is_a_log_line_every_few_seconds_and_one_at_the_end(monkeypatch, caplog):
    import time

    from xray.progress import Progress

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    caplog.set_level("INFO", logger="xray.progress")
    progress = Progress("convert", 100, every_s=5.0, per_item=2, unit="img")
    for done in range(1, 101):
        now[0] += 0.125  # 8 items a second, 2 images each
        progress.update(done)
    assert [r.getMessage() for r in caplog.records] == [
        "convert: 40/100 (40%), 16.0 img/s, eta 8 s",
        "convert: 80/100 (80%), 16.0 img/s, eta 2 s",
        "convert: 100/100 (100%), 16.0 img/s, eta 0 s",
    ]



def make_items(n_normal_patients=60, n_pneumonia_patients=150, seed=0):
    """Patients with 1-4 images each, as in the real data set."""
    import random
    rng = random.Random(seed)
    items = []
    for label, n, prefix in ((0, n_normal_patients, "IM-"), (1, n_pneumonia_patients, "person")):
        for p in range(n):
            for k in range(rng.randint(1, 4)):
                items.append(Item(Path(f"{prefix}{p}-{k}.jpeg"), "train", label,
                                  "normal" if label == 0 else "bacteria", f"{prefix}{p}"))
    return items


@pytest.mark.unit
def test_no_patient_in_two_splits_and_every_image_kept():
    items = make_items()
    splits = assign_splits({"train": items}, "patients", 0.2, seed=1)
    train_patients = {it.patient_id for it in splits["train"]}
    val_patients = {it.patient_id for it in splits["val"]}
    assert train_patients and val_patients
    assert not train_patients & val_patients
    assert sorted(map(str, (it.path for it in splits["train"] + splits["val"]))) == \
        sorted(str(it.path) for it in items)


@pytest.mark.unit
def test_stratified_by_class():
    items = make_items()
    val = split_by_patient(items, 0.2, seed=3)
    for label in (0, 1):
        total = sum(it.label == label for it in items)
        in_val = sum(it.label == label and it.patient_id in val for it in items)
        # whole patients (<= 4 images) are taken until the class's share is reached
        assert 0.2 * total <= in_val < 0.2 * total + 4


@pytest.mark.unit
def test_reproducible_and_seeded():
    items = make_items()
    assert split_by_patient(items, 0.1, seed=7) == split_by_patient(list(reversed(items)), 0.1, seed=7)
    assert split_by_patient(items, 0.1, seed=7) != split_by_patient(items, 0.1, seed=8)


@pytest.mark.unit
def test_official_val_is_pooled_by_default_and_kept_on_request():
    train, official_val = make_items(seed=1), make_items(5, 5, seed=2)
    official_val = [Item(it.path.with_name("v" + it.path.name), "val", it.label, it.subtype,
                         "v" + it.patient_id) for it in official_val]
    pooled = assign_splits({"train": train, "val": official_val}, "patients", 0.1, seed=0)
    assert len(pooled["train"]) + len(pooled["val"]) == len(train) + len(official_val)
    kept = assign_splits({"train": train, "val": official_val}, "official", 0.1, seed=0)
    assert kept["val"] == official_val and kept["train"] == train


@pytest.mark.unit
def test_bad_split_settings_say_what_to_do():
    with pytest.raises(XrayError, match="no val/ folder"):
        assign_splits({"train": make_items()}, "official", 0.1, 0)
    with pytest.raises(XrayError, match="val_fraction"):
        assign_splits({"train": make_items()}, "patients", 1.5, 0)
    with pytest.raises(XrayError, match="val_source=random is unknown"):
        assign_splits({"train": make_items()}, "random", 0.1, 0)


def test_real_data_split_has_no_shared_patient(sample_data):
    """The converted sample: patient ids never cross splits; counts add up."""
    import json
    import mindspore.dataset as ds
    patients = {}
    for split in ("train", "val", "test"):
        d = ds.MindDataset(str(sample_data / f"{split}.mindrecord"), columns_list=["patient_id"],
                           shuffle=False)
        patients[split] = Counter(str(r["patient_id"]) for r in d.create_dict_iterator(output_numpy=True))
    assert not set(patients["train"]) & set(patients["val"])
    assert not set(patients["train"]) & set(patients["test"])
    manifest = json.loads((sample_data / "manifest.json").read_text())
    for split in patients:
        assert sum(patients[split].values()) == manifest["splits"][split]["images"]
