"""`pip install .` (not only -e) gives a working package: the configs travel inside it; and
building it prints no setuptools warnings (it once printed one per config group folder)."""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_warnings(output: str) -> list[str]:
    """setuptools' warnings (BuildBackendWarning, SetuptoolsDeprecationWarning, ...) in pip's output."""
    return re.findall(r"\w+Warning: .*", output)


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_holds_every_config_and_the_sample(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert build_warnings(build.stdout + build.stderr) == []
    shipped = set(zipfile.ZipFile(next(tmp_path.glob("xray-*.whl"))).namelist())
    wanted = set()
    for folder, prefix, kinds in ((REPO / "conf", "xray/conf", (".yaml",)),
                                  (REPO / "xray" / "sample", "xray/sample", (".jpeg", ".md", ".tsv"))):
        for root, _, files in os.walk(folder, followlinks=True):  # conf/sweep links to sweeps/
            wanted |= {f"{prefix}/{(Path(root) / f).relative_to(folder).as_posix()}" for f in files
                       if f.endswith(kinds)}
    assert any(name.startswith("xray/conf/experiment/") for name in wanted)
    assert wanted - shipped == set()


@pytest.mark.slow
def test_a_non_editable_install_into_a_fresh_venv_finds_its_configs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)],
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    assert build_warnings(install.stdout + install.stderr) == []
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
