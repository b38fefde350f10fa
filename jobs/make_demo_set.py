"""Build the demo set shipped in xray/sample/demo/ from a Kermany copy's official training split.

    python jobs/make_demo_set.py ../shared/data/chest_xray xray/sample/demo

One image per patient, chosen at random (seed 2026), classes balanced, pneumonia subtypes in
their natural mix; `train/` and `test/` hold different patients. Each image is stored as 8-bit
grayscale with its shorter side at 128 px (Pillow, LANCZOS), JPEG quality 85, under its
original file name; MANIFEST.tsv lists split, label, subtype, patient id, file and sha256.
The tests keep the tiny sample in xray/sample/chest_xray/; this set is what `make demo` learns on."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xray.labels import parse_file_name

SEED = 2026
PER_CLASS = {"train": 200, "test": 50}  # images (= patients) per class and folder
SHORT_SIDE, QUALITY = 128, 85


def one_image_per_patient(folder: Path, label: str, rng: np.random.Generator) -> list[tuple[str, str, Path]]:
    """(patient id, subtype, file) of one random image of each patient, in random order."""
    by_patient: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(folder.glob("*.jpeg")):
        subtype, patient = parse_file_name(path.name, label)
        by_patient.setdefault(patient, []).append((subtype, path))
    picked = []
    for patient in sorted(by_patient):
        subtype, path = by_patient[patient][rng.integers(len(by_patient[patient]))]
        picked.append((patient, subtype, path))
    return [picked[i] for i in rng.permutation(len(picked))]


def store(source: Path, dest: Path) -> str:
    """Write the small grayscale copy; returns its sha256."""
    with Image.open(source) as image:
        gray = image.convert("L")
        scale = SHORT_SIDE / min(gray.size)
        gray = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    gray.save(dest, quality=QUALITY)
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def main(root: Path, out: Path) -> None:
    rng = np.random.default_rng(SEED)
    rows = ["split\tlabel\tsubtype\tpatient_id\tfile\tsha256"]
    for label in ("NORMAL", "PNEUMONIA"):
        patients = one_image_per_patient(root / "train" / label, label, rng)
        start = 0
        for split, count in PER_CLASS.items():
            for patient, subtype, path in patients[start:start + count]:
                digest = store(path, out / split / label / path.name)
                rows.append(f"{split}\t{label}\t{subtype}\t{patient}\t{path.name}\t{digest}")
            start += count
    (out / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    print(f"{len(rows) - 1} images -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
