"""Device and execution mode, from config (device_target, mode)."""
from __future__ import annotations

import mindspore as ms

from xray.errors import XrayError

DEVICES = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def setup_device(device_target: str, mode: str = "graph", device_id: int = 0) -> None:
    """Select the device (`device_id`: which of the node's accelerators, one per data-parallel
    rank) and execution mode; a missing accelerator fails at once."""
    target = DEVICES.get(str(device_target).lower())
    if target is None:
        raise XrayError(f"device_target={device_target} is unknown; use CPU, GPU or Ascend")
    if mode not in MODES:
        raise XrayError(f"mode={mode} is unknown; use graph or pynative")
    if target != "CPU" and not ms.hal.is_available(target):
        raise XrayError(f"device_target={target} but MindSpore cannot see a {target} on this node "
                        f"(check the job's GPU request and CUDA setup, or use device_target=CPU)")
    try:
        ms.set_device(target, device_id if target != "CPU" else None)
    except RuntimeError:  # kernels already ran in this process (tests, notebooks): fine if on target
        if ms.get_context("device_target") != target:
            raise XrayError(f"device_target={target}, but this process already runs MindSpore on "
                            f"{ms.get_context('device_target')}; start a new process") from None
    ms.set_context(mode=MODES[mode])
