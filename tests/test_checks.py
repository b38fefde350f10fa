"""xray.checks: every bad value of every entrypoint is one line naming the key, the value and its
range (a name of a registered component: tests/test_registry.py)."""
import pytest

from helpers import TINY, make_cfg
from xray.checks import CONVERT, EVALUATE, PREDICT, TRAIN, check
from xray.errors import XrayError

pytestmark = pytest.mark.unit
RULES = {"config": TRAIN, "predict": PREDICT, "evaluate": EVALUATE, "convert": CONVERT}


@pytest.mark.parametrize("config", RULES)
def test_the_defaults_pass(config):
    check(make_cfg(config, TINY if config == "config" else []), RULES[config])


@pytest.mark.parametrize("override, message", [
    ("lr=-1", "lr=-1 must be a number > 0"), ("lr=0", "lr=0 must be a number > 0"),
    ("lr=abc", "lr=abc must be a number > 0"), ("momentum=2", r"momentum=2 must be a number in \[0, 1\)"),
    ("epochs=0", "epochs=0 must be an integer >= 1"), ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("epochs=2.5", "epochs=2.5 must be an integer >= 1"), ("optim.schedule=linear", "must be one of constant"),
    ("data.augment.scale=[0.9,0.5]", r"data.augment.scale=\[0.9, 0.5\] must be \[low, high\]"),
    ("train.amp=fp16", "train.amp=fp16 must be one of O0, O1, O2, O3"),
    ("train.threshold_rule=median", "train.threshold_rule=median must be one of youden, sensitivity"),
    ("train.target_sensitivity=0", r"train.target_sensitivity=0 must be a number in \(0, 1\]"),
    ("train.bacterial_vs_viral_rule=half", "train.bacterial_vs_viral_rule=half must be one of youden, prior"),
    # the recipe's switches (tests/test_recipe.py)
    ("data.equalize=sharpen", "data.equalize=sharpen must be one of none, hist, clahe"),
    ("data.sampling=stratified", "data.sampling=stratified must be one of shuffle, balanced"),
    ("loss.label_smoothing=1.5", r"loss.label_smoothing=1.5 must be a number in \[0, 1\)"),
])
def test_bad_training_values_are_named_with_their_range(override, message):
    with pytest.raises(XrayError, match=message):
        check(make_cfg("config", TINY + [override]), TRAIN)


@pytest.mark.parametrize("config, override, message", [
    ("predict", "threshold=abc", r"threshold=abc must be val or a number in \[0, 1\]"),
    ("predict", "threshold=2", r"threshold=2 must be val or a number in \[0, 1\]"),
    ("predict", "tta=0", "tta=0 must be an integer from 1 to 5"),
    ("evaluate", "bootstrap=-5", "bootstrap=-5 must be an integer >= 0"),
    ("evaluate", "batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("evaluate", "threshold_rule=Youden", "threshold_rule=Youden must be one of youden, sensitivity"),
    ("evaluate", "target_sensitivity=95", r"target_sensitivity=95 must be a number in \(0, 1\]"),
    ("evaluate", "bacterial_vs_viral_rule=Prior", "bacterial_vs_viral_rule=Prior must be one of youden, prior"),
    ("convert", "data.val_fraction=1.5", r"data.val_fraction=1.5 must be a number in \(0, 1\)"),
])
def test_bad_values_of_the_other_entrypoints(config, override, message):
    with pytest.raises(XrayError, match=message):
        check(make_cfg(config, [override]), RULES[config])
