"""Can this node train? MindSpore's version, the devices it can use, the CUDA libraries its GPU
plugins need (found or missing), and one tiny AlexNet forward/backward step on each device.

    python -m xray.doctor                      # report only
    python -m xray.doctor --device GPU --amp O2   # exit 2, one line, if that cannot train here

`jobs.pipeline` runs it as its first job on the GPU partition and stops there with its message.
Each device is tried in a child process: MindSpore binds a process to one device for good."""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from xray.checks import AMP_LEVELS
from xray.errors import XrayError, one_line_errors

DEVICES = ("CPU", "GPU", "Ascend")
PROBE_SIZE = 96  # px: a real AlexNet, small enough to run in seconds on a CPU


def mindspore_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mindspore")
    if spec is None or spec.origin is None:
        raise XrayError("MindSpore is not installed in this Python; pip install -e . (or .[test])")
    return Path(spec.origin).parent


def gpu_plugins() -> dict[str, dict[str, Optional[str]]]:
    """{plugin file: {CUDA/cuDNN library it links: path found, or None}} for every GPU plugin
    of the MindSpore wheel (2.10 ships one for CUDA 11.1 and one for CUDA 11.6), read with ldd."""
    plugins = {}
    for plugin in sorted((mindspore_dir() / "lib" / "plugin").glob("libmindspore_gpu.so.*")):
        try:
            out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        libs = {}
        for name, target in re.findall(r"^\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", out, re.M):
            if re.match(r"lib(cuda|cudart|cublas|cudnn|cufft|curand|cusolver|cusparse|nvrtc|nccl)\b", name):
                libs[name] = None if target.strip() == "not found" else target.strip()
        plugins[plugin.name] = libs
    return plugins


def nvidia_smi() -> Optional[str]:
    """GPU names, memory and the driver version, or None where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return (out.stdout.strip() or out.stderr.strip()) or None


def available_devices() -> dict[str, bool]:
    """{device: whether MindSpore sees it}, asked in a child process (MindSpore prints its
    failed plugin loads there, and binds a process to one device)."""
    proc = subprocess.run([sys.executable, "-c", "import json, xray, mindspore as ms; print(json.dumps("
                           f"{{d: d == 'CPU' or ms.hal.is_available(d) for d in {list(DEVICES)}}}))"],
                          capture_output=True, text=True, timeout=600)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise XrayError(f"MindSpore does not import here: {(proc.stderr.strip().splitlines() or ['?'])[-1]}") from None


def probe(device: str, amp: str = "O0") -> dict:
    """One training step of AlexNet on `device` at mixed-precision level `amp`, in a child
    process: {"ok", "seconds", "message"}."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "xray.doctor", "--probe", device, "--amp", amp],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": 600.0, "message": "no answer in 600 s"}
    seconds = round(time.perf_counter() - start, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("probe:")]
    if proc.returncode == 0 and lines:
        return {"ok": True, "seconds": seconds, "message": lines[-1][len("probe:"):].strip()}
    errors = [line for line in proc.stderr.splitlines() if line.strip()
              and not line.startswith("[WARNING]") and "Load dynamic library" not in line]
    return {"ok": False, "seconds": seconds, "message": (errors[-1] if errors else
                                                         f"exit code {proc.returncode}")[:300]}


def _probe_here(device: str, amp: str) -> str:
    """The child's side: set the device, run one step, describe it."""
    import numpy as np

    import mindspore as ms
    from hydra import compose, initialize_config_dir

    from xray import CONF_DIR
    from xray.device import setup_device
    from xray.registry import create_schedule
    from xray.step import build_training

    if device != "CPU" and not ms.hal.is_available(device):
        raise XrayError(f"MindSpore sees no {device} here")
    setup_device(device, "graph")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # the training defaults
        cfg = compose("config", overrides=[f"device_target={device}", f"train.amp={amp}", "seed=0"])
    _, _, _, _, step = build_training(cfg, PROBE_SIZE, [1, 1], create_schedule(0.01, cfg.optim, 1, 2))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(8, 1, PROBE_SIZE, PROBE_SIZE)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1] * 4, np.int32))
    loss0 = float(step(x, y, 0).asnumpy())  # compiles
    start = time.perf_counter()
    loss1 = float(step(x, y, 1).asnumpy())
    if not (np.isfinite(loss0) and np.isfinite(loss1)):
        raise XrayError(f"the step's loss is not finite on {device} ({loss0}, {loss1})")
    return (f"AlexNet {PROBE_SIZE} px, batch 8, amp {amp}: loss {loss0:.4f} -> {loss1:.4f}, "
            f"{(time.perf_counter() - start) * 1000:.0f} ms a step")


def doctor(devices=DEVICES, amp: str = "O0") -> dict:
    from xray.provenance import versions

    seen = available_devices()
    installed = versions()
    report = {
        "python": installed["python"],
        "host": platform.node(),
        "mindspore": installed["mindspore"],
        "numpy": installed["numpy"],
        "pillow": installed["pillow"],
        "nvidia_smi": nvidia_smi(),
        "gpu_plugins": gpu_plugins(),
        "devices": {d: probe(d, amp) if seen[d] else
                    {"ok": False, "seconds": 0.0, "message": f"MindSpore sees no {d} on this node"}
                    for d in devices},
        "amp": amp,
    }
    return report


def describe(report: dict) -> str:
    lines = [f"python {report['python']}, MindSpore {report['mindspore']}, numpy {report['numpy']}, "
             f"Pillow {report['pillow']} on {report['host']}",
             f"nvidia-smi: {report['nvidia_smi'] or 'not found (no NVIDIA driver on this node)'}"]
    for plugin, libs in report["gpu_plugins"].items():
        missing = [name for name, path in libs.items() if path is None]
        lines.append(f"GPU plugin {plugin}: " + ("all CUDA libraries found" if not missing else
                                                  f"missing {', '.join(missing)}"))
    lines.append(f"one training step (amp {report['amp']}):")
    for device, result in report["devices"].items():
        lines.append(f"  {device:<7} {'ok  ' if result['ok'] else 'FAIL'} {result['message']} "
                     f"({result['seconds']} s)")
    return "\n".join(lines)


def require(report: dict, device: str) -> None:
    """One line, naming what to fix, if `device` cannot train here."""
    result = report["devices"][device]
    if result["ok"]:
        return
    hint = ""
    if device == "GPU":
        missing = sorted({name for libs in report["gpu_plugins"].values()
                          for name, path in libs.items() if path is None})
        if report["nvidia_smi"] is None:
            hint = "; this node has no NVIDIA driver (submit to a GPU partition, with --gpus)"
        elif missing:
            hint = (f"; MindSpore's GPU plugin cannot find {', '.join(missing)}: install CUDA 11.6 "
                    "(or 11.1) and cuDNN 8 and put their lib folders on LD_LIBRARY_PATH (docs/speed-and-gpus.md)")
    raise XrayError(f"device_target={device} cannot train on {report['host']}: {result['message']}{hint}")


@one_line_errors
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xray.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="exit 2 with one line unless this device can train here")
    parser.add_argument("--amp", choices=AMP_LEVELS, default="O0",
                        help="mixed-precision level of the test step")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--probe", choices=DEVICES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print("probe:", _probe_here(args.probe, args.amp), flush=True)
        return
    devices = DEVICES if args.device is None else (args.device,) + tuple(d for d in DEVICES if d != args.device)
    report = doctor(devices, args.amp)
    print(describe(report))
    if args.json:
        from xray.files import write_json

        write_json(args.json, report)
    if args.device:
        require(report, args.device)


if __name__ == "__main__":
    main()
