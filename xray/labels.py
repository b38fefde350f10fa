"""The one label map and the file-name conventions of the Kermany chest X-ray set."""
from __future__ import annotations

import re
from pathlib import Path

# Index = class id used everywhere (targets, logits, p(pneumonia) = softmax[:, 1]).
CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
LABEL_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
POSITIVE = LABEL_TO_INDEX["PNEUMONIA"]

# person<N>_<bacteria|virus>_<K>.jpeg ; the same N under both subtypes is kept as one
# patient, which can only make the split more conservative.
_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
# IM-<NNNN>-<KKKK>[-<KKKK>].jpeg or NORMAL2-IM-<NNNN>-<KKKK>.jpeg
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def parse_file_name(name: str, label: str) -> tuple[str, str]:
    """Return (subtype, patient_id) for an image file name in class folder `label`.

    Subtype is normal / bacteria / virus, or unknown when the name does not follow the
    data set's convention; then the file is its own patient.
    """
    stem = Path(name).stem
    if label == "NORMAL":
        m = _NORMAL_NAME.match(stem)
        return "normal", (m.group(1) if m else stem)
    m = _PNEUMONIA_NAME.match(stem)
    if m:
        return m.group(2).lower(), m.group(1).lower()
    return "unknown", stem
