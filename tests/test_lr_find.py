"""The learning-rate range test (xray.lr_find): the suggestion on curves whose answer is known,
a real run on the shipped sample through the CLI, an early stop when the rate is absurd, and
bad values as one line."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY, TINY_OLD_DEFAULT, make_cfg
from xray.errors import XrayError
from xray.lr_find import Smoother, check_lr_find, lr_range, suggest

FILES = ("lr_find.csv", "lr_find.png", "lr_find.json")
STEPS = 24  # ~0.5-1 s each at 72 px on 2 shared CPU cores


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "lr_find.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def valley(lrs: np.ndarray) -> np.ndarray:
    """A loss that falls fastest at lr 1e-3 (a tanh step in log10 lr) and explodes above 0.3."""
    x = np.log10(lrs)
    return 1.0 - 0.5 * np.tanh(2 * (x + 3)) + 0.5 * np.exp(3 * (x + 0.5))


# ------------------------------------------------------------------------------------ unit

@pytest.mark.unit
def test_the_suggestion_is_the_steepest_descent_of_a_known_valley():
    lrs = lr_range(1e-6, 1.0, 121)  # 0.05 decades a step: 1e-3 is point 60
    found = suggest(lrs, valley(lrs), skip_start=10, skip_end=5)
    assert found["lr"] == pytest.approx(1e-3, rel=1e-9)
    assert found["step"] == 60
    assert found["slope_per_decade"] < 0
    assert "steepest descent" in found["how"]
    assert 1e-3 < found["lr_at_lowest_smoothed_loss"] < 0.3
    assert found["slope_per_decade"] == pytest.approx(-1.0, abs=0.01)  # d/dx of -tanh(2(x+3))/2 at -3
    # with train.amp a step whose gradients overflow is skipped: the next row repeats its lr
    repeated = np.insert(lrs, 20, lrs[20])
    found = suggest(repeated, valley(repeated), skip_start=10, skip_end=5)
    assert found["lr"] == pytest.approx(1e-3, rel=1e-9) and math.isfinite(found["slope_per_decade"])


@pytest.mark.unit
def test_the_suggestion_ignores_the_skipped_ends_and_the_divergent_side():
    lrs = lr_range(1e-6, 1.0, 121)
    loss = valley(lrs)
    loss[:5] += np.linspace(2.0, 0.0, 5)  # a steep fall in the first (skipped) points
    loss[-4:] = [0.8, 0.5, 0.3, np.nan]   # a fall in the last ones, then the loss is gone
    loss[103] += 0.3  # a spike on the rising side: a steeper fall right after it, at point 104
    assert suggest(lrs, loss, skip_start=10, skip_end=5)["lr"] == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.unit
def test_an_early_stop_still_gives_a_suggestion_from_the_finite_part():
    lrs = lr_range(1e-6, 1.0, 121)[:68]  # stopped just after the steep part: too few to skip 10 + 5
    loss = valley(lrs)
    loss[-1] = np.inf
    found = suggest(lrs[-14:], loss[-14:], skip_start=10, skip_end=5)
    assert found["lr"] == pytest.approx(1e-3, rel=1e-9) and "first 3 and last 1 of 13" in found["how"]
    assert suggest(lrs[:3], [1.0, np.nan, np.nan]) is None


@pytest.mark.unit
def test_the_range_is_geometric_and_the_smoothing_bias_corrected():
    lrs = lr_range(1e-6, 1.0, 7)
    np.testing.assert_allclose(lrs, np.logspace(-6, 0, 7), rtol=1e-12)
    assert lrs[0] == 1e-6 and lrs[-1] == 1.0
    smooth = Smoother(0.98)
    assert [smooth(0.7) for _ in range(5)] == pytest.approx([0.7] * 5)  # no pull towards 0
    assert smooth(1.7) == pytest.approx(0.7 + 0.02 / (1 - 0.98 ** 6))


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("lr_find.min_lr=0", "lr_find.min_lr=0 must be a number > 0"),
    ("lr_find.max_lr=1e-07", "lr_find.max_lr=1e-07 must be > lr_find.min_lr (1e-06)"),
    ("lr_find.steps=5", "lr_find.steps=5 must be an integer >= 10"),
    ("lr_find.beta=1", "lr_find.beta=1 must be a number in [0, 1)"),
    ("lr_find.diverge=1", "lr_find.diverge=1 must be a number > 1"),
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),  # the training's own rules apply
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(XrayError) as error:
        check_lr_find(make_cfg("lr_find", [override]))
    assert str(error.value) == message


# ------------------------------------------------------------------------------ real runs

def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "xray.lr_find", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_a_range_test_on_the_sample_writes_its_files(sample_data, tmp_path):
    run_dir = tmp_path / "run"
    # the binary defaults of before: on the sample their loss stays finite up to lr 1, so every step
    # runs (today's defaults diverge there before lr 1 and stop early, as the next test does)
    proc = run_cli([*TINY_OLD_DEFAULT, f"data.dir={sample_data}", f"lr_find.steps={STEPS}", f"hydra.run.dir={run_dir}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.ckpt"))  # the weights are thrown away

    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    lrs = np.array([r["lr"] for r in rows])
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.all(np.diff(lrs) > 0)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 1e6 ** (1 / (STEPS - 1)), rtol=1e-9)  # geometric
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["smoothed"]) for r in rows)

    result = json.loads((run_dir / "lr_find.json").read_text())
    lr = result["suggested_lr"]
    assert 1e-6 <= lr <= 1.0 and lr in lrs
    assert result["try"] == pytest.approx([lr, 10 * lr / 3])
    assert result["steps_run"] == STEPS and result["stopped_early"] is None
    assert result["settings"]["image_size"] == 72 and result["settings"]["batch_size"] == 8
    assert result["lr_find"]["steps"] == STEPS and "git" in result["provenance"]
    logged = proc.stdout + proc.stderr
    assert f"suggested lr: {lr:.3g} (steepest descent of the smoothed loss; try {lr:.3g} to " in logged

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("lr_find/loss")] == list(range(STEPS))
    assert [e.value for e in acc.Scalars("lr_find/lr")] == pytest.approx(lrs, rel=1e-6)
    assert "lr_find/loss_vs_lr" in acc.Tags()["images"]


def test_an_absurd_max_lr_stops_early_with_a_suggestion_from_the_finite_part(sample_data, tmp_path):
    from xray.lr_find import range_test
    from xray.run_folder import RunFolder

    cfg = make_cfg("lr_find", TINY + [f"data.dir={sample_data}", "lr_find.steps=20", "lr_find.max_lr=1000"])
    result = range_test(cfg, RunFolder(tmp_path / "run"))
    rows = read_rows(tmp_path / "run")
    assert len(rows) == result["steps_run"] < 20
    assert result["stopped_early"]
    last = rows[-1]
    assert not math.isfinite(last["loss"]) or last["smoothed"] > 4 * min(r["smoothed"] for r in rows[:-1])
    lr = result["suggested_lr"]
    assert lr is not None and 1e-6 <= lr < last["lr"]
    assert math.isfinite(next(r["smoothed"] for r in rows if r["lr"] == lr))
    assert (tmp_path / "run" / "lr_find.png").is_file()


def test_a_bad_value_is_one_line_and_exit_2(sample_data, tmp_path):
    proc = run_cli([*TINY, f"data.dir={sample_data}", "lr_find.max_lr=1e-7", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] == [
        "error: lr_find.max_lr=1e-07 must be > lr_find.min_lr (1e-06)"]
