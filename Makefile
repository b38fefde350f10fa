# The two commands a new user needs:
#   make demo   set up, then convert -> train -> evaluate -> predict on the shipped demo set
#   make test   set up, then run the tests but the long ones (make test SUITE=all: every one;
#               make test-unit: only the unit tier, no training, well under a minute)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   := outputs/demo

.PHONY: setup demo test test-unit slurm-up slurm-down soak clean

setup: $(VENV)/.installed

# (re)install whenever the package metadata changes
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# the filter: setuptools' "Editable installation" notice, printed for every flat-layout -e install
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(PY) -m xray.convert data=demo data.dir=$(DEMO)/data hydra.run.dir=$(DEMO)/convert
	$(PY) -m xray.train +experiment=demo data.dir=$(DEMO)/data hydra.run.dir=$(DEMO)/train
	$(PY) -m xray.evaluate ckpt=$(DEMO)/train/checkpoints/best.ckpt split=test hydra.run.dir=$(DEMO)/evaluate
	$(PY) -m xray.predict ckpt=$(DEMO)/train/checkpoints/best.ckpt image=xray/sample/demo/test/PNEUMONIA plot=true hydra.run.dir=$(DEMO)/predict
	@echo "demo done: $(DEMO)/  (tensorboard --logdir $(DEMO))"

# `make test`: every test but the longer ones that train, sweep, install or submit Slurm jobs
# for real (marked slow / slurm; about 12 minutes here with a training beside it).
# `make test SUITE=all` runs them too (40-60 minutes; CI does).
SUITE ?= fast
ifneq ($(words $(SUITE))$(filter-out fast all,$(SUITE)),1)
$(error SUITE=$(SUITE): use SUITE=fast (the default) or SUITE=all)
endif
MARKS_fast = -m "not slow and not slurm"
MARKS_all =
test: setup
	$(PY) -m pytest $(MARKS_$(SUITE))

test-unit: setup
	$(PY) -m pytest -m unit

# a model card and a sweep page rendered in headless Chromium (Debian: apt-get install -y chromium);
# the screenshots are kept in outputs/card-check/ to look at
.PHONY: card-check
card-check: setup
	XRAY_SCREENSHOTS=outputs/card-check $(PY) -m pytest -m slow tests/test_card.py -k chromium

# a real single-node Slurm on this machine (root, Debian): the `slurm` tests use it
slurm-up:
	bash jobs/slurm-up.sh

slurm-down:
	bash jobs/slurm-down.sh

# a real sweep on the local Slurm under seeded faults, then checks and figures (docs/reliability.md);
# 3-6 minutes here; e.g. make soak SOAK_ARGS="--seed 3 --out /tmp/soak"
soak: setup
	$(PY) -m jobs.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) outputs/demo .pytest_cache
