"""xray: AlexNet (MindSpore) for chest X-rays, three tasks: NORMAL vs PNEUMONIA,
normal/bacterial/viral, and bacterial vs viral pneumonia."""
import os
from pathlib import Path

# MindSpore 2.10's oneDNN picks a reference (100x slower) convolution on CPUs with AVX-512/AMX
# (measured: 1 GFLOP/s instead of 105 on one 5x5 conv layer); its AVX2 kernels are the fast
# path there. A value the user set wins.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
# Hydra configs, absolute so that they work however xray.* is run: the checkout's conf/, or the
# copy an installed package carries as xray/conf
CONF_DIR = str(next(d for d in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf")
                    if (d / "config.yaml").is_file()))
SAMPLE_DIR = PACKAGE_DIR / "sample" / "chest_xray"  # the tiny real sample the tests use

# ${xray_sample:} in conf/data/sample.yaml -> the sample folder, ${xray_sample:demo} the demo set,
# wherever xray is installed
OmegaConf.register_new_resolver("xray_sample", lambda which="chest_xray": str(PACKAGE_DIR / "sample" / which),
                                replace=True)
# ${xray_dirname:...} in conf/config.yaml: a sweep over a config group (data/augment=intensity)
# must not put a "/" into a member's folder name
def folder_name(name: str) -> str:
    return str(name).replace("/", ".")


OmegaConf.register_new_resolver("xray_dirname", folder_name, replace=True)
