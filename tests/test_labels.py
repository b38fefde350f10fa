import numpy as np
import pytest

from xray.labels import (CLASSES, LABEL_TO_INDEX, POSITIVE, TASK_CLASSES, TASKS, binary_decisions,
                         binary_read_offs, decision_rows, file_family, parse_file_name)


@pytest.mark.unit
def test_every_tasks_label_map_matches_its_class_names():
    """TASKS (subtype -> class id) and TASK_CLASSES (class id -> name) are two views of one map;
    in the binary task, pneumonia of either kind is the data set's PNEUMONIA folder, class 1."""
    for task, label_map in TASKS.items():
        assert sorted(set(label_map.values())) == list(range(len(TASK_CLASSES[task]))), task
    assert TASK_CLASSES["binary"] == CLASSES and LABEL_TO_INDEX == {c: i for i, c in enumerate(CLASSES)}
    assert TASKS["binary"]["bacteria"] == TASKS["binary"]["virus"] == POSITIVE == LABEL_TO_INDEX["PNEUMONIA"]


@pytest.mark.unit
def test_each_task_answers_its_two_class_questions():
    """A two-class task answers its own (p of class 1), a subtype model its read-offs."""
    y2, probs2 = np.array([0, 1, 1, 0]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    [(name, (y, p))] = binary_decisions("bacterial_vs_viral", y2, probs2).items()
    assert name == "bacterial_vs_viral" and list(y) == list(y2) and np.allclose(p, [0.2, 0.7, 0.4, 0.9])
    y3 = np.array([0, 1, 2])
    probs3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    decisions, read_offs = binary_decisions("subtype", y3, probs3), binary_read_offs("subtype", y3, probs3)
    assert list(decisions) == ["pneumonia_vs_normal", "bacterial_vs_viral"]
    assert all(np.array_equal(decisions[n][1], read_offs[n][1]) for n in decisions)


@pytest.mark.unit
@pytest.mark.parametrize("name, label, expected", [
    ("person1000_bacteria_2931.jpeg", "PNEUMONIA", ("bacteria", "person1000")),
    ("person1000_virus_1681.jpeg", "PNEUMONIA", ("virus", "person1000")),
    ("PERSON7_VIRUS_3.JPEG", "PNEUMONIA", ("virus", "person7")),
    ("IM-0115-0001.jpeg", "NORMAL", ("normal", "IM-0115")),
    ("IM-0656-0001-0002.jpeg", "NORMAL", ("normal", "IM-0656")),
    ("NORMAL2-IM-0383-0001.jpeg", "NORMAL", ("normal", "NORMAL2-IM-0383")),
    ("scan_17.png", "PNEUMONIA", ("unknown", "scan_17")),
    ("odd.jpeg", "NORMAL", ("normal", "odd")),
])
def test_parse_file_name(name, label, expected):
    assert parse_file_name(name, label) == expected


@pytest.mark.unit
def test_patient_ids_match_the_data_set_manifest():
    """Against the real data set's own MANIFEST.tsv (patient ids assigned by its curators)."""
    import csv

    from helpers import SAMPLE
    rows = list(csv.DictReader(open(SAMPLE / "MANIFEST.tsv"), delimiter="\t"))
    assert len(rows) == 60
    for row in rows:
        subtype, patient = parse_file_name(row["file"], row["label"])
        assert (subtype, patient.lower()) == (row["subtype"], row["patient_id"].lower())


@pytest.mark.unit
@pytest.mark.parametrize("name, family", [
    ("IM-0115-0001.jpeg", "IM-"), ("NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM-"), ("normal2-im-1-2.JPEG", "NORMAL2-IM-"),
    ("person1000_bacteria_2931.jpeg", "person"), ("PERSON7_VIRUS_3.JPEG", "person"), ("scan_17.png", "other"),
])
def test_file_name_families(name, family):
    """The sources of the Kermany set, told apart by their names (subgroup metrics per family)."""
    assert file_family(name) == family


@pytest.mark.unit
def test_each_decision_names_the_images_it_is_asked_of():
    """decision_rows picks, for each of binary_decisions' questions, the images whose (y, p) it
    returns: the subgroups of a read-off are of those images."""
    labels = np.array([0, 1, 2, 1, 0])
    probs = np.full((5, 3), 1 / 3)
    rows = decision_rows("subtype", labels)
    for name, (y, _) in binary_decisions("subtype", labels, probs).items():
        assert rows[name].sum() == len(y)
    assert list(rows["bacterial_vs_viral"]) == [False, True, True, True, False]
    assert list(decision_rows("binary", np.array([0, 1, 1]))["binary"]) == [True] * 3
