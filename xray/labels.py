"""The label maps of the tasks (normal vs pneumonia, three classes, bacterial vs viral), the
two-class questions each task answers, and the file-name conventions of the Kermany chest
X-ray set."""
from __future__ import annotations

import re
from pathlib import Path

from xray.errors import XrayError

# The folders of the data set: a record's `label` (0 NORMAL, 1 PNEUMONIA).
CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
LABEL_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
POSITIVE = LABEL_TO_INDEX["PNEUMONIA"]

# What a model is trained to tell apart: one label map per task, each derived from the record's
# subtype (normal / bacteria / virus, parsed from the file name). Index = class id everywhere
# (targets, logits); in a two-class task class 1 is the positive one (p = softmax[:, 1]).
TASKS: dict[str, dict[str, int]] = {
    "binary": {"normal": 0, "bacteria": 1, "virus": 1, "unknown": 1},
    "subtype": {"normal": 0, "bacteria": 1, "virus": 2},
    "bacterial_vs_viral": {"virus": 0, "bacteria": 1},  # pneumonia images only, as in Kermany 2018
}
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "binary": CLASSES,
    "subtype": ("NORMAL", "BACTERIAL", "VIRAL"),
    "bacterial_vs_viral": ("VIRAL", "BACTERIAL"),
}


def task_classes(task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise XrayError(f"task={task} is unknown; use {', '.join(TASKS)}")
    return TASK_CLASSES[task]


def task_targets(task: str, subtypes) -> tuple["np.ndarray", "np.ndarray"]:
    """(indices of the records the task uses, their class ids) from the records' subtypes."""
    import numpy as np

    task_classes(task)
    label_map = TASKS[task]
    keep = np.array([i for i, s in enumerate(subtypes) if s in label_map], dtype=np.int64)
    return keep, np.array([label_map[subtypes[i]] for i in keep], dtype=np.int64)


def binary_read_offs(task: str, labels, probs) -> dict[str, tuple["np.ndarray", "np.ndarray"]]:
    """The two-class questions a `subtype` model answers too, read off its class probabilities:
    {name: (0/1 targets, p of the positive class)}. pneumonia_vs_normal: every image, p = 1 -
    p(normal); bacterial_vs_viral: the pneumonia images, p = p(bacterial) / (p(bacterial) +
    p(viral)), as the bacterial_vs_viral task's class 1. Other tasks: none."""
    import numpy as np

    if task != "subtype":
        return {}
    pneumonia = decision_rows(task, labels)["bacterial_vs_viral"]
    bacterial, viral = probs[pneumonia, 1], probs[pneumonia, 2]
    either = bacterial + viral
    return {"pneumonia_vs_normal": (pneumonia.astype(np.int64), 1.0 - probs[:, 0]),
            "bacterial_vs_viral": ((labels[pneumonia] == 1).astype(np.int64),
                                   np.divide(bacterial, either, out=np.full_like(either, 0.5), where=either > 0))}


def binary_decisions(task: str, labels, probs) -> dict[str, tuple["np.ndarray", "np.ndarray"]]:
    """Every two-class question a model of `task` answers, {name: (0/1 targets, p of the
    positive class)} from its NxK class probabilities: a two-class task its own (named after
    the task, p = probs[:, 1]), a subtype model its read-offs (binary_read_offs)."""
    if len(TASK_CLASSES[task]) == 2:
        return {task: (labels, probs[:, 1])}
    return binary_read_offs(task, labels, probs)


def decision_rows(task: str, labels) -> dict[str, "np.ndarray"]:
    """Which images each of binary_decisions' questions is asked of, {name: boolean mask over
    the task's images}: all of them, but the pneumonia images only for a subtype model's
    bacterial_vs_viral read-off."""
    import numpy as np

    labels = np.asarray(labels)
    if len(TASK_CLASSES[task]) == 2:
        return {task: np.ones(len(labels), bool)}
    if task != "subtype":
        return {}
    return {"pneumonia_vs_normal": np.ones(len(labels), bool), "bacterial_vs_viral": labels > 0}


def supported_tasks(subtype_counts: dict[str, int]) -> list[str]:
    """The tasks a data set with these training subtypes can train: every class present."""
    def images(task: str, cls: int) -> int:
        return sum(subtype_counts.get(s, 0) for s, c in TASKS[task].items() if c == cls)

    return [task for task in TASKS if all(images(task, c) > 0 for c in range(len(TASK_CLASSES[task])))]

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


# The file-name families of the Kermany set, most specific first: they come from different
# sources (NORMAL2-IM- normal images were added in a later release), so a model's errors can
# differ between them. IM- and NORMAL2-IM- hold normal images only, person... pneumonia only.
FAMILIES: tuple[tuple[str, str], ...] = (("NORMAL2-IM-", "NORMAL2-IM-"), ("IM-", "IM-"), ("person", "person"))
OTHER_FAMILY = "other"


def file_family(name: str) -> str:
    """The family of an image's file name: IM-, NORMAL2-IM-, person (case-insensitive), or
    other (names that follow none of the data set's conventions)."""
    stem = Path(name).name.lower()
    return next((family for prefix, family in FAMILIES if stem.startswith(prefix.lower())), OTHER_FAMILY)
