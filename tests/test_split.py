from collections import Counter
from pathlib import Path

import pytest

from xray.convert import Item, assign_splits, split_by_patient
from xray.errors import XrayError


def make_items(n_normal_patients=60, n_pneumonia_patients=150, seed=0):
    """Patients with 1-4 images each, as in the real data set."""
    import random
    rng = random.Random(seed)
    items = []
    for label, n, prefix in ((0, n_normal_patients, "IM-"), (1, n_pneumonia_patients, "person")):
        for p in range(n):
            for k in range(rng.randint(1, 4)):
                items.append(Item(Path(f"{prefix}{p}-{k}.jpeg"), "train", label,
                                  "normal" if label == 0 else "bacteria", f"{prefix}{p}"))
    return items


def test_no_patient_in_two_splits_and_every_image_kept():
    items = make_items()
    splits = assign_splits({"train": items}, "patients", 0.2, seed=1)
    train_patients = {it.patient_id for it in splits["train"]}
    val_patients = {it.patient_id for it in splits["val"]}
    assert train_patients and val_patients
    assert not train_patients & val_patients
    assert sorted(map(str, (it.path for it in splits["train"] + splits["val"]))) == \
        sorted(str(it.path) for it in items)


def test_stratified_by_class():
    items = make_items()
    val = split_by_patient(items, 0.2, seed=3)
    for label in (0, 1):
        total = sum(it.label == label for it in items)
        in_val = sum(it.label == label and it.patient_id in val for it in items)
        # whole patients (<= 4 images) are taken until the class's share is reached
        assert 0.2 * total <= in_val < 0.2 * total + 4


def test_reproducible_and_seeded():
    items = make_items()
    assert split_by_patient(items, 0.1, seed=7) == split_by_patient(list(reversed(items)), 0.1, seed=7)
    assert split_by_patient(items, 0.1, seed=7) != split_by_patient(items, 0.1, seed=8)


def test_official_val_is_pooled_by_default_and_kept_on_request():
    train, official_val = make_items(seed=1), make_items(5, 5, seed=2)
    official_val = [Item(it.path.with_name("v" + it.path.name), "val", it.label, it.subtype,
                         "v" + it.patient_id) for it in official_val]
    pooled = assign_splits({"train": train, "val": official_val}, "patients", 0.1, seed=0)
    assert len(pooled["train"]) + len(pooled["val"]) == len(train) + len(official_val)
    kept = assign_splits({"train": train, "val": official_val}, "official", 0.1, seed=0)
    assert kept["val"] == official_val and kept["train"] == train


def test_bad_split_settings_say_what_to_do():
    with pytest.raises(XrayError, match="no val/ folder"):
        assign_splits({"train": make_items()}, "official", 0.1, 0)
    with pytest.raises(XrayError, match="val_fraction"):
        assign_splits({"train": make_items()}, "patients", 1.5, 0)
    with pytest.raises(XrayError, match="val_source=random is unknown"):
        assign_splits({"train": make_items()}, "random", 0.1, 0)


def test_real_data_split_has_no_shared_patient(sample_data):
    """The converted sample: patient ids never cross splits; counts add up."""
    import json
    import mindspore.dataset as ds
    patients = {}
    for split in ("train", "val", "test"):
        d = ds.MindDataset(str(sample_data / f"{split}.mindrecord"), columns_list=["patient_id"],
                           shuffle=False)
        patients[split] = Counter(str(r["patient_id"]) for r in d.create_dict_iterator(output_numpy=True))
    assert not set(patients["train"]) & set(patients["val"])
    assert not set(patients["train"]) & set(patients["test"])
    manifest = json.loads((sample_data / "manifest.json").read_text())
    for split in patients:
        assert sum(patients[split].values()) == manifest["splits"][split]["images"]
