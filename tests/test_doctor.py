"""xray.doctor: what a node can train on, and one line when the device asked for cannot."""
import shutil
import subprocess
import sys

import pytest

from xray.doctor import describe, gpu_plugins, require
from xray.errors import XrayError


@pytest.mark.unit
def test_the_wheels_gpu_plugins_are_read_with_their_cuda_libraries():
    plugins = gpu_plugins()
    assert plugins, "MindSpore 2.10's wheel ships libmindspore_gpu.so.11.1 / 11.6"
    for libs in plugins.values():
        assert {"libcudart.so.11.0", "libcudnn.so.8", "libcublas.so.11"} <= set(libs)
        if shutil.which("nvidia-smi") is None:
            assert libs["libcuda.so.1"] is None  # no driver here: found nowhere


def _report(gpu_ok: bool, smi, missing=()):
    return {"python": "3", "host": "n1", "mindspore": "2.10.0", "numpy": "1", "pillow": "1",
            "nvidia_smi": smi, "amp": "O2",
            "gpu_plugins": {"libmindspore_gpu.so.11.6": {"libcudnn.so.8": None if "libcudnn.so.8" in missing
                                                          else "/usr/lib/libcudnn.so.8"}},
            "devices": {"GPU": {"ok": gpu_ok, "seconds": 1.0, "message": "boom" if not gpu_ok else "fine"},
                        "CPU": {"ok": True, "seconds": 1.0, "message": "fine"}}}


@pytest.mark.unit
def test_require_names_the_missing_library_or_the_missing_driver():
    require(_report(True, "0, H100, 80 GiB, 550.54"), "GPU")
    with pytest.raises(XrayError, match="cannot find libcudnn.so.8: install CUDA 11.6"):
        require(_report(False, "0, H100, 80 GiB, 550.54", missing=["libcudnn.so.8"]), "GPU")
    with pytest.raises(XrayError, match="no NVIDIA driver"):
        require(_report(False, None), "GPU")
    assert "missing libcudnn.so.8" in describe(_report(False, None, missing=["libcudnn.so.8"]))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this node may have a usable GPU")
def test_doctor_trains_a_step_on_cpu_and_refuses_a_gpu_here(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xray.doctor", "--device", "GPU", "--amp", "O2",
                           "--json", str(tmp_path / "doctor.json")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: device_target=GPU cannot train")
    ok_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("CPU"))
    assert " ok " in ok_line and "amp O2" in ok_line and "loss" in ok_line
    assert (tmp_path / "doctor.json").is_file()
