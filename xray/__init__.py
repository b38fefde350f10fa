"""xray: AlexNet (MindSpore) for NORMAL vs PNEUMONIA chest X-rays."""
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = str(PACKAGE_DIR.parent / "conf")  # Hydra configs (absolute: works however xray.* is run)
SAMPLE_DIR = PACKAGE_DIR / "sample" / "chest_xray"  # the small real sample shipped for the demo

# ${xray_sample:} in conf/data/sample.yaml -> the sample folder, wherever xray is installed
OmegaConf.register_new_resolver("xray_sample", lambda: str(SAMPLE_DIR), replace=True)
