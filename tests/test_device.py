"""xray.device and the package's import-time settings: a device that is not there fails fast;
oneDNN is steered to its fast CPU kernels."""
import pytest

from xray.errors import XrayError


@pytest.mark.unit
def test_gpu_requested_on_a_node_without_one_fails_fast():
    """device_target=GPU must never fall back to training on the CPU silently."""
    import mindspore as ms
    from xray.device import setup_device
    if ms.hal.is_available("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(XrayError, match="device_target=GPU but MindSpore cannot see a GPU"):
        setup_device("GPU")
    with pytest.raises(XrayError, match="device_target=TPU is unknown"):
        setup_device("TPU")
    setup_device("cpu")  # case-insensitive, and CPU always works


@pytest.mark.unit
def test_xray_steers_onednn_to_its_fast_cpu_kernels():
    """MindSpore 2.10's oneDNN runs convolutions ~100x slower on AVX-512/AMX CPUs unless limited
    to AVX2 (the speed is the bench's job; here: the setting is made, and a user's value wins)."""
    import os
    import subprocess
    import sys
    code = "import xray, os; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "AVX2"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "AVX512_CORE"
