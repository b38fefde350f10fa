import pytest

from xray.labels import CLASSES, LABEL_TO_INDEX, POSITIVE, parse_file_name


def test_one_label_map():
    assert CLASSES == ("NORMAL", "PNEUMONIA")
    assert LABEL_TO_INDEX == {"NORMAL": 0, "PNEUMONIA": 1}
    assert POSITIVE == 1


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


def test_patient_ids_match_the_data_set_manifest():
    """Against the real data set's own MANIFEST.tsv (patient ids assigned by its curators)."""
    import csv

    from conftest import SAMPLE
    rows = list(csv.DictReader(open(SAMPLE / "MANIFEST.tsv"), delimiter="\t"))
    assert len(rows) == 60
    for row in rows:
        subtype, patient = parse_file_name(row["file"], row["label"])
        assert (subtype, patient.lower()) == (row["subtype"], row["patient_id"].lower())
