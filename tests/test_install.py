"""`pip install .` (not only -e) gives a working package: the configs travel inside it."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_non_editable_install_into_a_fresh_venv_finds_its_configs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)],
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "cwd"  # not the checkout: nothing may come from there
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import xray; print(xray.__file__); print(xray.CONF_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv))
    job = subprocess.run([str(python), "-m", "xray.train", "+sweep=generalization", "data=sample",
                          "data/augment=intensity", "--cfg", "job", "--resolve"],
                         capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "sweep_name: generalization" in job.stdout and "gamma: 0.3" in job.stdout
    assert f"root: {venv}" in job.stdout  # the shipped sample, found inside the package
