"""xray.registry: a component registered once is creatable by its config key and allowed by the
checks; an unknown name is one line naming the key and the registered names."""
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from helpers import CONF_DIR, make_cfg
from xray.checks import TRAIN, check
from xray.errors import XrayError
from xray.registry import LOSSES, MODELS, SCHEDULES, Registry, create_loss, create_model, create_schedule


# (registry, override selecting a name, the factory called on the composed config)
SELECT = {
    "model": (MODELS, "model.name", lambda cfg: create_model(cfg.model, 72, 2)),
    "loss": (LOSSES, "loss.name", lambda cfg: create_loss(cfg.loss, 2, [30, 10])),
    "schedule": (SCHEDULES, "optim.schedule", lambda cfg: create_schedule(0.1, cfg.optim, 2, 5)),
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", SELECT)
def test_a_registered_name_is_allowed_by_the_checks_and_created(kind, monkeypatch):
    registry, key, create = SELECT[kind]
    made = []  # the builder's calls; it returns a learning rate per step, enough for every kind
    monkeypatch.setitem(registry._builders, "new_one", lambda *args: made.append(args) or np.zeros(10))
    cfg = make_cfg("config", [f"{key}=new_one"])
    check(cfg, TRAIN)
    create(cfg)
    assert len(made) == 1


@pytest.mark.unit
def test_a_registered_loss_gets_the_class_weights_and_smoothing(monkeypatch):
    made = []
    monkeypatch.setitem(LOSSES._builders, "new_one", lambda *args: made.append(args))
    cfg = make_cfg("config", ["loss.name=new_one", "loss.class_weighted=true", "loss.label_smoothing=0.1"])
    create_loss(cfg.loss, 2, [30, 10])
    assert made == [(2, pytest.approx([40 / 60, 40 / 20]), 0.1)]


@pytest.mark.unit
@pytest.mark.parametrize("kind", SELECT)
def test_an_unknown_name_is_one_line_naming_the_key_and_the_registered_names(kind):
    registry, key, create = SELECT[kind]
    cfg = make_cfg("config", [f"{key}=nonesuch"])
    expected = f"{key}=nonesuch must be one of {', '.join(registry.names())}"
    with pytest.raises(XrayError) as checked:
        check(cfg, TRAIN)
    with pytest.raises(XrayError) as created:
        create(cfg)
    assert str(checked.value) == str(created.value) == expected


def test_every_registered_name_builds():
    for name in MODELS.names():
        net = create_model(make_cfg("config", [f"model.name={name}"]).model, 72, 3)
        net.set_train(False)
        assert net(ms.Tensor(np.zeros((1, 1, 72, 72), np.float32))).shape == (1, 3)
    logits, labels = ms.Tensor(np.array([[2.0, -1.0, 0.0]], np.float32)), ms.Tensor(np.array([1], np.int32))
    for name in LOSSES.names():
        loss = create_loss(make_cfg("config", [f"loss.name={name}"]).loss, 3, [1, 1, 1])
        assert float(loss(logits, labels).asnumpy()) > float(loss(logits, ms.Tensor(np.array([0], np.int32))).asnumpy())
    for name in SCHEDULES.names():
        optim = make_cfg("config", [f"optim.schedule={name}", "optim.warmup_epochs=0"]).optim
        lr = create_schedule(0.1, optim, 3, 4)
        assert lr.dtype == np.float32 and len(lr) == 12 and lr.max() == pytest.approx(0.1, rel=0.01)  # (onecycle: its peak, between steps)


@pytest.mark.unit
@pytest.mark.parametrize("group, registry", [("model", MODELS), ("loss", LOSSES)])
def test_every_registered_model_and_loss_has_its_config_group_file(group, registry):
    """`model=<name>` / `loss=<name>` on the command line needs conf/<group>/<name>.yaml."""
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    assert set(registry.names()) == files
    for name in registry.names():
        assert make_cfg("config", [f"{group}={name}"])[group].name == name


@pytest.mark.unit
def test_a_name_registered_twice_is_refused():
    registry = Registry("thing.name", "xray.registry")
    registry.register("a")(len)
    with pytest.raises(ValueError, match="thing.name: a is registered twice"):
        registry.register("a")(len)


@pytest.mark.unit
def test_the_checks_do_not_import_mindspore():
    """Listing names imports their modules only when a value is checked: xray.convert's pool
    workers import xray.checks and must not pay MindSpore's start-up."""
    code = "import sys, xray.checks; print('mindspore' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
