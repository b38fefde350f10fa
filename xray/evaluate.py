"""Evaluate a checkpoint (or an ensemble) on a split, with bootstrap CIs.

One path for every task, K classes (a two-class task is K = 2): the predictions, the result
header, the files and their captions. On it sit the two-class decisions (labels.binary_decisions),
each at the threshold its rule chose on val, or for the bacterial-vs-viral prior rule before any
split was seen (`at_val_threshold`, named so for both), and at 0.5: a two-class task's
own (p(class 1); at the top level of the result) and a subtype model's read-offs, pneumonia vs
normal and bacterial vs viral (under `read_off`). A K-class task also decides by argmax (`argmax`).

    python -m xray.evaluate ckpt=<run>/checkpoints/best.ckpt split=test [tta=4]
    python -m xray.evaluate ckpt=[<run1>/checkpoints/best.ckpt,<run2>/...] split=test
    python -m xray.evaluate ckpt=outputs/best/<sweep> top_k=3 split=test

Every 95 % CI is a bootstrap over patients (bootstrap_unit=patient, the default: some test
patients have up to 9 images) or over images (bootstrap_unit=image). Each two-class decision is
also broken down by subgroup (`subgroups`: pneumonia subtype, file-name family, aspect ratio of
the stored image) at the split's own threshold. The split must not share an image with the
train split of the checkpoint's run (a data set re-converted with other splits would); the data
set evaluated is recorded by its fingerprint (`data`).

Writes eval_<split>.json, predictions_<split>.csv, roc_<split>.png, confusion_<split>.png and
reliability_<split>.png (explain=N: cam_errors_<split>.png; with tta > 1:
eval_<split>_tta<K>.json, ...) into the checkpoint's run folder, or out_dir; an ensemble writes
them into this command's own output folder (outputs/evaluate/<time>/) unless out_dir is given.
card=true also evaluates val and writes a model card (xray.card) beside them.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from xray import CONF_DIR
from xray.calibration import (BINS, calibration_metrics, calibration_of, fit_temperature, reliability_figure,
                              save_temperature, scale_probs)
from xray.calibration import FILE as CALIBRATION_FILE
from xray.checks import EVALUATE, check
from xray.checkpoint import TrainedModel, load_trained_model, resolve_checkpoints
from xray.data import (TaskRecords, check_task, fingerprint, make_eval_dataset, read_column, read_manifest,
                       split_file, split_images, task_records)
from xray.device import setup_device
from xray.errors import XrayError, one_line_errors
from xray.explain import cam_grid, grad_cam
from xray.files import write_json, write_text
from xray.hparams import ARGMAX, AT_HALF, AT_VAL_THRESHOLD, NO_RULE, PRIOR, binary_results, with_current_keys
from xray.labels import CLASSES, binary_decisions, decision_rows, file_family, parse_file_name
from xray.metrics import (binary_metrics, bootstrap_ci, confusion, confusion_k, multiclass_metrics, roc_curve,
                          sensitivity_threshold, youden_threshold)
from xray.plots import confusion_figure, roc_figure, save_figure
from xray.predict import writable_folder
from xray.run_folder import RunFolder

log = logging.getLogger(__name__)


def predict_records(model: TrainedModel, records: TaskRecords, batch_size: int, workers: int = 2,
                    tta: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file names, class ids, NxK raw class probabilities) of the task's records, in file order."""
    dataset = make_eval_dataset(records, model.spec, batch_size, workers=workers, with_names=True,
                                tta=tta)
    names, labels, probs = [], [], []
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        probs.append(model.class_probabilities(batch["image"]))
        labels.append(batch["label"])
        names.extend(str(n) for n in batch["file_name"])
    return names, np.concatenate(labels), np.concatenate(probs)


def calibrated(model: TrainedModel, probs: np.ndarray) -> np.ndarray:
    """A model's NxK class probabilities through its temperature, if it has one (any K)."""
    return scale_probs(probs, model.temperature)


BOOTSTRAP_UNITS = ("patient", "image")
# the subgroups of every two-class decision: grouping -> its groups in the order shown
SUBTYPES = ("normal", "bacteria", "virus", "unknown")
FAMILY_ORDER = ("IM-", "NORMAL2-IM-", "person", "other")
ASPECT_BUCKETS = ((1.1, "<1.1"), (1.3, "1.1-1.3"), (1.5, "1.3-1.5"), (float("inf"), ">=1.5"))  # long / short side
GROUPINGS = {"subtype": SUBTYPES, "family": FAMILY_ORDER, "aspect_ratio": tuple(b for _, b in ASPECT_BUCKETS)}


def aspect_bucket(height: int, width: int) -> str:
    """The aspect-ratio bucket (long side / short side) of a stored image."""
    ratio = max(height, width) / max(min(height, width), 1)
    return next(label for limit, label in ASPECT_BUCKETS if ratio < limit)


@dataclass
class ImageInfo:
    """What the records say about each of a split's task images (in file order): the grouping
    of the bootstrap (patient) and of the subgroups (subtype, family, aspect_ratio)."""

    patient: np.ndarray
    subtype: np.ndarray
    family: np.ndarray
    aspect_ratio: np.ndarray

    def rows(self, mask: np.ndarray) -> "ImageInfo":
        return ImageInfo(*(getattr(self, k)[mask] for k in ("patient", "subtype", "family", "aspect_ratio")))


def _text(value) -> str:
    value = value.item() if hasattr(value, "item") else value
    return value.decode() if isinstance(value, bytes) else str(value)


def image_info(records: TaskRecords) -> tuple[list[str], ImageInfo]:
    """(file names, ImageInfo) of the task's records: the patient parsed from the file name and
    its folder label (labels.parse_file_name, as convert did), the stored subtype, the
    file-name family and the aspect-ratio bucket of the stored height and width."""
    columns = {c: read_column(records.path, c) for c in ("file_name", "label", "subtype", "height", "width")}
    rows = records.indices.tolist()
    names = [_text(columns["file_name"][i]) for i in rows]
    labels = [CLASSES[int(columns["label"][i])] for i in rows]
    return names, ImageInfo(
        np.array([parse_file_name(n, label)[1] for n, label in zip(names, labels)]),
        np.array([_text(columns["subtype"][i]) for i in rows]),
        np.array([file_family(n) for n in names]),
        np.array([aspect_bucket(int(columns["height"][i]), int(columns["width"][i])) for i in rows]))


@dataclass
class SplitPredictions:
    split: str
    names: list[str]
    labels: np.ndarray
    raw: list[np.ndarray]  # per model, NxK, before its temperature
    info: Optional[ImageInfo] = None
    overlap_with_train: object = "unknown"  # images shared with the models' train split (int), or "unknown"

    def probabilities(self, models: Sequence[TrainedModel]) -> np.ndarray:
        """The ensemble's NxK probabilities: the mean of each member's (calibrated) ones."""
        return np.mean([calibrated(m, p) for m, p in zip(models, self.raw)], axis=0)


def train_overlap(models: Sequence[TrainedModel], data_dir: Path, manifest: dict, split: str):
    """How many images of `split` the models' runs trained on (train_images.txt of each run
    folder; "unknown" for a run that recorded none, a run from before it existed or a best
    folder). Any, in a split other than train, is refused: the data set was re-converted with
    other splits (or is another one holding training images), and the numbers would be
    inflated by images the model has learnt."""
    trained = {m.run_dir: RunFolder(m.run_dir).read_train_images() for m in models}
    known = {run: images for run, images in trained.items() if images is not None}
    if not known:
        return "unknown"
    images = split_images(data_dir, manifest, split)
    for run, train in known.items():
        shared = [image for image in images if image in train]
        if shared and split != "train":
            raise XrayError(f"split={split} of {data_dir} shares {len(shared)} of its {len(images)} images with "
                            f"the train split {run} was trained on (e.g. {shared[0]}): the data set was "
                            "re-converted with other splits since; evaluate on the data set the run trained "
                            "on (data_dir=<it>, or convert it again with the run's data.seed and options)")
    shared = len({image for image in images if any(image in train for train in known.values())})
    return shared if len(known) == len(trained) or shared else "unknown"


def predict_split(models: Sequence[TrainedModel], data_dir: Path, manifest: dict, split: str,
                  batch_size: int, workers: int, tta: int) -> SplitPredictions:
    """Every model's raw probabilities on a split, each model through its own preprocessing
    (refused first if the split shares images with the models' train split)."""
    overlap = train_overlap(models, data_dir, manifest, split)
    records = task_records(split_file(data_dir, manifest, split), models[0].task)  # (checks the file)
    names, info = image_info(records)
    runs = [predict_records(m, records, batch_size, workers, tta) for m in models]
    if runs[0][0] != names:  # (the pipeline keeps file order; this says so)
        raise XrayError(f"{records.path}: the images came back in another order than the records'")
    return SplitPredictions(split, runs[0][0], runs[0][1], [p for _, _, p in runs], info, overlap)


def with_ci(metric: Callable[[np.ndarray, np.ndarray], dict], y: np.ndarray, p: np.ndarray,
            n_boot: int, seed: int, groups: Optional[np.ndarray] = None) -> dict:
    """Every value metric(y, p) returns as {value, ci95}, a bootstrap CI over images, or over
    `groups` (each image's patient: whole patients resampled) (n_boot = 0: ci95 null)."""
    ci = bootstrap_ci(y, p, metric, n=n_boot, seed=seed, groups=groups) if n_boot > 0 else {}
    return {k: {"value": v, "ci95": ci.get(k)} for k, v in metric(y, p).items()}


def metrics_at(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int,
               groups: Optional[np.ndarray] = None) -> dict:
    """A two-class decision at one threshold: every metric with its CI, the 2x2 confusion matrix."""
    return {"threshold": threshold,
            **with_ci(lambda yy, pp: binary_metrics(yy, pp, threshold), y, p, n_boot, seed, groups),
            "confusion_matrix": confusion(y, p, threshold).tolist()}


def binary_result(y: np.ndarray, p: np.ndarray, threshold: float, rule: str, n_boot: int, seed: int,
                  groups: Optional[np.ndarray] = None) -> dict:
    """A two-class decision's result: at the threshold `rule` chose on val, and at 0.5."""
    return {"images": int(len(y)), "positives": int(y.sum()),
            AT_VAL_THRESHOLD: {"rule": rule, **metrics_at(y, p, threshold, n_boot, seed, groups)},
            AT_HALF: metrics_at(y, p, 0.5, n_boot, seed, groups)}


def argmax_result(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int, seed: int,
                  groups: Optional[np.ndarray] = None) -> dict:
    """A K-class decision by argmax: accuracy, balanced accuracy, macro and per-class one-vs-rest
    AUC, per-class sensitivity and specificity, with CIs, and the KxK confusion matrix."""
    return {**with_ci(lambda yy, pp: multiclass_metrics(yy, pp, classes), y, probs, n_boot, seed, groups),
            "confusion_matrix": confusion_k(y, probs.argmax(axis=1), len(classes)).tolist()}


def subgroup_cell(y: np.ndarray, p: np.ndarray, threshold: float, patients: np.ndarray, n_boot: int,
                  seed: int, by_patient: bool) -> dict:
    """One subgroup of a two-class decision at the split's threshold: its counts, and what is
    defined in it with CIs: sensitivity and specificity, AUC, accuracy and balanced accuracy
    where both classes are present; only sensitivity (all positive: e.g. the person... family)
    or only specificity (all negative: IM-, NORMAL2-IM-) where one is."""
    both = 0 < int(y.sum()) < len(y)
    keys = (("sensitivity", "specificity", "auc", "accuracy", "balanced_accuracy") if both
            else ("sensitivity",) if y.all() else ("specificity",))

    def metric(yy: np.ndarray, pp: np.ndarray) -> dict:
        values = binary_metrics(yy, pp, threshold)
        return {k: values[k] for k in keys}

    return {"images": int(len(y)), "patients": int(len(np.unique(patients))), "positives": int(y.sum()),
            **with_ci(metric, y, p, n_boot, seed, patients if by_patient else None),
            "confusion_matrix": confusion(y, p, threshold).tolist()}


def subgroups_of(y: np.ndarray, p: np.ndarray, threshold: float, rule: str, info: ImageInfo, n_boot: int,
                 seed: int, by_patient: bool) -> dict:
    """A two-class decision broken down by subtype, file-name family and aspect-ratio bucket,
    all at the split's (val-chosen) threshold: {threshold, rule, by: {grouping: {group: cell}}}
    (groups without images left out)."""
    by = {}
    for grouping, order in GROUPINGS.items():
        values = getattr(info, grouping)
        by[grouping] = {group: subgroup_cell(y[values == group], p[values == group], threshold,
                                             info.patient[values == group], n_boot, seed, by_patient)
                        for group in order if np.any(values == group)}
    return {"threshold": threshold, "rule": rule, "by": by}


def chosen_thresholds(val_result: dict) -> dict[str, tuple[float, str]]:
    """{decision name: (threshold, rule)} a val evaluation chose, to hand to the other splits
    (an eval_val.json written before `youden` was renamed too)."""
    return {name: (r[AT_VAL_THRESHOLD]["threshold"], r[AT_VAL_THRESHOLD]["rule"])
            for name, r in binary_results(with_current_keys(val_result)).items()}


def origin(rule: str) -> str:
    """How a plot title or log line says where a threshold came from."""
    if rule == "youden":
        return "Youden on val"
    if rule.startswith("sensitivity>="):  # "sensitivity>=0.93"
        return f"sensitivity >= {rule[len('sensitivity>='):]} on val"
    if rule == PRIOR:
        return "the training prior"
    return rule  # NO_RULE


@dataclass(frozen=True)
class ThresholdRule:
    """How the threshold a split is scored at is chosen before that split is seen.

    Pneumonia vs normal (task=binary, and a subtype model's pneumonia_vs_normal read-off), on val:
    `youden` maximizes sensitivity + specificity - 1; `sensitivity` takes the highest threshold
    whose val sensitivity is still >= `target_sensitivity` (a screening operating point: on new
    patients, whose healthy lungs score higher than val's, it keeps more of them below it).

    Bacterial vs viral (`bacterial_vs_viral`): `youden` on val, or `prior`: the share of bacterial
    among the pneumonia images the training drew (0.5 after balanced sampling), where a model
    trained on those odds puts equal odds. Val ranks the two pneumonias far worse than new
    patients do, so its Youden threshold is noisy; the prior needs no val image."""

    name: str = "youden"  # (checked by xray.checks: youden | sensitivity)
    target_sensitivity: float = 0.95
    bacterial_vs_viral: Optional[str] = "youden"  # (checked by xray.checks: youden | prior; None: as trained)

    @classmethod
    def of(cls, node) -> "ThresholdRule":
        """The rule a config node names (evaluate's config, a run's `train`); Youden where it
        names none (runs from before the rules existed)."""
        return cls(node.get("threshold_rule", "youden"), node.get("target_sensitivity", 0.95),
                   node.get("bacterial_vs_viral_rule", "youden"))

    def tag(self, trained: "ThresholdRule", task: str) -> str:
        """Its short name in file names: the parts that differ from the rule the run `trained`
        with, among the decisions `task` has ("" if none): youden, sensitivity0.95 (pneumonia vs
        normal), bvprior, bvyouden (bacterial vs viral), joined by _ when both differ."""
        def pneumonia(rule: ThresholdRule) -> str:
            return "youden" if rule.name == "youden" else f"sensitivity{float(rule.target_sensitivity):g}"
        parts = []
        if task in ("binary", "subtype") and pneumonia(self) != pneumonia(trained):
            parts.append(pneumonia(self))
        if task in ("subtype", "bacterial_vs_viral") and self.subtype_rule != trained.subtype_rule:
            parts.append(f"bv{self.subtype_rule}")
        return "_".join(parts)

    @property
    def label(self) -> str:
        """Its name in results (`rule`) when chosen on val: youden, sensitivity>=0.95."""
        return "youden" if self.name == "youden" else f"sensitivity>={float(self.target_sensitivity):g}"

    def for_decision(self, name: str) -> "ThresholdRule":
        """The rule for one decision (a two-class task or a read-off): this one for pneumonia vs
        normal, the bacterial-vs-viral one for that decision."""
        return self if name in PNEUMONIA_DECISIONS else ThresholdRule(self.subtype_rule)

    @property
    def subtype_rule(self) -> str:
        """The bacterial-vs-viral rule's name (unset: youden, the rule before there was a choice)."""
        return self.bacterial_vs_viral or "youden"


YOUDEN = ThresholdRule()
PNEUMONIA_DECISIONS = ("binary", "pneumonia_vs_normal")  # the ones `threshold_rule` applies to


def training_prior(models: Sequence[TrainedModel]) -> float:
    """p(bacterial) among the pneumonia images as the models' training weighed them, where a
    model trained on those odds is indifferent: the odds of drawing a bacterial rather than a
    viral image (1 after balanced sampling, else the run's own train split's n_b / n_v, counted
    from its train_images.txt) times the loss's weight ratio (n_v / n_b with
    loss.class_weighted, else 1). Balanced sampling alone, or class weights alone: 0.5. An
    ensemble's members must agree."""
    priors = set()
    for model in models:
        balanced = OmegaConf.select(model.cfg, "data.sampling") == "balanced"
        weighted = bool(OmegaConf.select(model.cfg, "loss.class_weighted", default=False))
        if balanced != weighted:  # one or the other makes bacterial and viral equally likely
            priors.add(0.5)
            continue
        bacteria, virus = subtype_counts(model)
        odds = virus / bacteria if weighted else bacteria / virus  # (both: the weights on equal draws)
        priors.add(round(odds / (1 + odds), 6))
    if len(priors) > 1:
        raise XrayError(f"bacterial_vs_viral_rule=prior: the ensemble's members were trained with different priors "
                        f"{sorted(priors)}; pass bacterial_vs_viral_rule=youden")
    return priors.pop()


def subtype_counts(model: TrainedModel) -> tuple[int, int]:
    """(bacterial, viral) images of the train split the model's run trained on (train_images.txt)."""
    images = RunFolder(model.run_dir).read_train_images()
    counts = {"bacteria": 0, "virus": 0}
    for image in images or []:
        label, _, name = image.partition("/")
        subtype = parse_file_name(name, "NORMAL" if label == "0" else "PNEUMONIA")[0]
        if subtype in counts:
            counts[subtype] += 1
    if not counts["bacteria"] or not counts["virus"]:
        found = "is missing" if images is None else f"holds {counts['bacteria']} bacterial and {counts['virus']} viral"
        raise XrayError(f"bacterial_vs_viral_rule=prior: {model.run_dir}/train_images.txt (the images its run trained "
                        f"on, for the training prior) {found}; pass bacterial_vs_viral_rule=youden")
    return counts["bacteria"], counts["virus"]


def trained_with(model: TrainedModel) -> ThresholdRule:
    """The threshold rule the model's run was trained (and evaluated at its end) with."""
    return ThresholdRule.of(model.cfg.get("train", {}))


def threshold_on_val(y_val: np.ndarray, p_val: np.ndarray, what: str,
                     rule: ThresholdRule = YOUDEN) -> tuple[float, str]:
    """(the threshold `rule` chooses on val, the rule's label): 0.5 when val has one class only."""
    if np.all(y_val) or not np.any(y_val):
        log.warning("%s: val has one class only, so no threshold can be chosen on it; 0.5 used", what)
        return 0.5, NO_RULE
    if rule.name == "sensitivity":
        return sensitivity_threshold(y_val, p_val, float(rule.target_sensitivity)), rule.label
    return youden_threshold(y_val, p_val), rule.label


def val_predictions(run: SplitPredictions, models: Sequence[TrainedModel], data_dir: Path, manifest: dict,
                    batch_size: int, workers: int, tta: int) -> SplitPredictions:
    """The val predictions: `run` itself when it is val, else predicted now."""
    if run.split == "val":
        return run
    return predict_split(models, data_dir, manifest, "val", batch_size, workers, tta)


def load_models(checkpoints: Sequence[Path], data_dir: Optional[Path], calibrate: bool,
                explain: int) -> tuple[list[TrainedModel], Path, dict]:
    """(the models, the data folder, its manifest), checked to fit together and the options."""
    models = [load_trained_model(Path(c)) for c in checkpoints]
    if not models:
        raise XrayError("ckpt is empty; pass a checkpoint, a list [a.ckpt,b.ckpt] or a best folder")
    if (calibrate or explain) and len(models) > 1:
        raise XrayError("calibrate=true and explain=N work on one checkpoint, not an ensemble "
                        "(its members' own temperatures are applied)")
    data_dir = Path(data_dir or models[0].cfg.data.dir)
    manifest = read_manifest(data_dir)
    for model in models:
        if manifest["short_side"] != model.spec.short_side:
            raise XrayError(f"data.dir={data_dir} was converted at short_side={manifest['short_side']} "
                            f"but {model.checkpoint} was trained on short_side={model.spec.short_side}")
    if len({m.task for m in models}) > 1:
        raise XrayError(f"an ensemble's members must share one task, not {sorted({m.task for m in models})}")
    check_task(manifest, models[0].task, data_dir)
    if calibrate:  # the temperature is stored beside the checkpoint, whatever out_dir says
        writable_folder(models[0].run_dir, "calibrate=true stores the temperature (calibration.json) beside the "
                        "checkpoint", "copy the run folder somewhere you can write and calibrate the copy")
    return models, data_dir, manifest


def evaluate(checkpoints: Sequence[Path], split: str = "test", data_dir: Optional[Path] = None,
             batch_size: int = 64, bootstrap: int = 1000, seed: int = 0, workers: int = 2,
             tta: int = 1, out_dir: Optional[Path] = None, calibrate: bool = False, explain: int = 0,
             val_thresholds: Optional[dict[str, tuple[float, str]]] = None,
             threshold_rule: Optional[ThresholdRule] = None, bootstrap_unit: str = "patient",
             card: bool = False) -> dict:
    """Evaluate one checkpoint, or the mean probability of several (an ensemble), on `split`,
    with tta test-time views per image: each two-class decision at the threshold chosen on val
    (by `threshold_rule`; None: the rule the first checkpoint's run trained with) and at 0.5,
    with its subgroups, a K-class task's argmax too, and the calibration (ECE, Brier, NLL,
    reliability diagram). CIs resample `bootstrap_unit`s: patients or images. calibrate=True
    first fits the checkpoint's temperature on val (calibration.json beside it: evaluate and
    predict apply it from then on). explain=N draws Grad-CAM maps of the N most confident false
    positives, false negatives, true positives and true negatives (K classes: wrong and right
    calls of each). Writes eval_<split>.json, predictions, ROC, confusion and reliability PNGs
    into `out_dir`, by default the run folder (one checkpoint; an ensemble needs out_dir), and
    returns the JSON. `val_thresholds` (chosen_thresholds of these models' val evaluation)
    spares a second pass over val. card=True evaluates val too (when split is not val) and
    writes a model card of both beside the results (xray.card.write_model_card)."""
    if bootstrap_unit not in BOOTSTRAP_UNITS:
        raise XrayError(f"bootstrap_unit={bootstrap_unit} must be one of {', '.join(BOOTSTRAP_UNITS)}")
    models, data_dir, manifest = load_models(checkpoints, data_dir, calibrate, explain)
    trained = trained_with(models[0])
    threshold_rule = threshold_rule or trained
    if threshold_rule.bacterial_vs_viral is None:  # (evaluate's default: the rule the run trained with)
        threshold_rule = replace(threshold_rule, bacterial_vs_viral=trained.bacterial_vs_viral)
    options = dict(batch_size=batch_size, bootstrap=bootstrap, seed=seed, workers=workers, tta=tta,
                   out_dir=out_dir, threshold_rule=threshold_rule, bootstrap_unit=bootstrap_unit)
    if not card:
        return evaluate_models(models, data_dir, manifest, split, calibrate=calibrate, explain=explain,
                               val_thresholds=val_thresholds, **options)
    results = {}
    if split != "val":  # (calibrated, if asked, on this pass; the split then uses its thresholds)
        results["val"] = evaluate_models(models, data_dir, manifest, "val", calibrate=calibrate, **options)
        calibrate, val_thresholds = False, chosen_thresholds(results["val"])
    results[split] = evaluate_models(models, data_dir, manifest, split, calibrate=calibrate, explain=explain,
                                     val_thresholds=val_thresholds, **options)
    from xray.card import write_model_card  # (written by another part of xray; imported when asked for)

    folder = output_place(models, out_dir, split, tta, threshold_rule)[0]
    other_rule = threshold_rule.tag(trained, models[0].task)  # (another rule's card beside the run's own)
    written = write_model_card(folder, [m.checkpoint for m in models], results,
                               name="model_card" + (f"_{other_rule}" if other_rule else ""))
    log.info("card: %s", ", ".join(str(w) for w in written))
    return results[split]


def evaluate_models(models: Sequence[TrainedModel], data_dir: Path, manifest: dict, split: str,
                    batch_size: int = 64, bootstrap: int = 1000, seed: int = 0, workers: int = 2,
                    tta: int = 1, out_dir: Optional[Path] = None, calibrate: bool = False, explain: int = 0,
                    val_thresholds: Optional[dict[str, tuple[float, str]]] = None,
                    threshold_rule: ThresholdRule = YOUDEN, bootstrap_unit: str = "patient") -> dict:
    """`evaluate` of loaded models (load_models) on one split."""
    out, tag = output_place(models, out_dir, split, tta, threshold_rule)
    writable_folder(out, "the results of evaluate go there")
    task, classes = models[0].task, models[0].classes
    run = predict_split(models, data_dir, manifest, split, batch_size, workers, tta)
    val = None  # predicted when needed
    if calibrate:  # a new temperature, so new thresholds too
        val = val_predictions(run, models, data_dir, manifest, batch_size, workers, tta)
        fit_temperature_of(models[0], val.labels, val.raw[0])
        val_thresholds = None
    y, probs = run.labels, run.probabilities(models)
    decisions = binary_decisions(task, y, probs)
    thresholds = {name: t for name, t in (val_thresholds or {}).items() if name in decisions}
    if set(thresholds) != set(decisions):
        rules = {name: threshold_rule.for_decision(name) for name in decisions}
        prior = training_prior(models) if any(r.name == PRIOR for r in rules.values()) else None
        if val is None and any(r.name != PRIOR for r in rules.values()):  # (the prior needs no val)
            val = val_predictions(run, models, data_dir, manifest, batch_size, workers, tta)
        on_val = binary_decisions(task, val.labels, val.probabilities(models)) if val is not None else {}
        thresholds = {name: (prior, PRIOR) if rule.name == PRIOR else threshold_on_val(*on_val[name], name, rule)
                      for name, rule in rules.items()}
    two_class = len(classes) == 2
    raw = np.mean(run.raw, axis=0)  # (before the temperatures)
    by_patient = bootstrap_unit == "patient"
    patients = run.info.patient
    result = {
        "split": split, "task": task, "classes": list(classes),
        "checkpoint": str(models[0].checkpoint) if len(models) == 1 else [str(m.checkpoint) for m in models],
        "tta": tta, "data_dir": str(data_dir), "images": int(len(y)), "patients": int(len(np.unique(patients))),
        **({} if two_class else {"per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)}}),
        "bootstrap": {"resamples": bootstrap, "level": 0.95, "unit": bootstrap_unit},
        "data": {**fingerprint(data_dir, manifest, [split]), "overlap_with_train": run.overlap_with_train},
    }
    rows = decision_rows(task, y)
    read_offs, subgroups = {}, {}
    for name, (yy, pp) in decisions.items():
        info = run.info.rows(rows[name])
        groups = info.patient if by_patient else None
        read_offs[name] = binary_result(yy, pp, *thresholds[name], bootstrap, seed, groups)
        subgroups[name] = subgroups_of(yy, pp, *thresholds[name], info, bootstrap, seed, by_patient)
    temperature = [m.temperature for m in models] if len(models) > 1 else models[0].temperature
    result["calibration"] = {  # how far to trust the probabilities: now, and as trained
        "of": calibration_of(classes), **calibration_metrics(y, probs), "bins": BINS, "temperature": temperature,
        "uncalibrated": calibration_metrics(y, raw)}
    if two_class:  # the task's own decision at the top level, as always
        result.update(read_offs[task])
    else:
        result[ARGMAX] = argmax_result(y, probs, classes, bootstrap, seed, patients if by_patient else None)
        if read_offs:
            result["read_off"] = read_offs
    result["subgroups"] = subgroups
    write_json(out / f"eval_{tag}.json", result)
    first = 1 if two_class else 0  # two classes: only p of the positive one
    write_text(out / f"predictions_{tag}.csv", predictions_csv(run.names, y, probs[:, first:], classes[first:]))
    what = f"{split}" + (f", {len(models)} models" if len(models) > 1 else "") + (f", tta {tta}" if tta > 1 else "")
    save_figures(result, y, probs, raw, any(m.temperature for m in models), what, out, tag)
    if explain:
        picks = (error_picks(y, probs[:, 1], result[AT_VAL_THRESHOLD]["threshold"], explain) if two_class
                 else class_picks(y, probs, classes, explain))
        explain_errors(models[0], task_records(split_file(data_dir, manifest, split), task), run.names, y,
                       probs[:, 1] if two_class else probs, picks, out / f"cam_errors_{tag}.png")
    log_result(result, out / f"eval_{tag}.json")
    return result


def save_figures(result: dict, y: np.ndarray, probs: np.ndarray, raw: np.ndarray, temperature_scaled: bool,
                 what: str, out: Path, tag: str) -> None:
    """roc_<tag>.png, confusion_<tag>.png and reliability_<tag>.png: a two-class task's curve
    with its val-chosen operating point, its confusion there and the reliability of p(class 1);
    a K-class task's one-vs-rest curves, its argmax confusion and the reliability of its top
    class."""
    classes, n = result["classes"], len(y)
    of = result["calibration"]["of"]
    shown = (lambda q: q[:, 1]) if len(classes) == 2 else (lambda q: q)  # noqa: E731
    curves = {"as trained": shown(raw), **({"temperature-scaled": shown(probs)} if temperature_scaled else {})}
    save_figure(reliability_figure(y, curves, f"{what}: reliability of {of} ({n} images)", of=of),
                out / f"reliability_{tag}.png")
    if len(classes) == 2:
        r = result[AT_VAL_THRESHOLD]
        fpr, tpr, _ = roc_curve(y, probs[:, 1])
        roc = roc_figure(fpr, tpr, r["auc"]["value"], f"{what}: ROC ({n} images)",
                         (1 - r["specificity"]["value"], r["sensitivity"]["value"]))
        title = f"{what}, threshold {r['threshold']:.3f} ({origin(r['rule'])})"
    else:
        r = result[ARGMAX]
        curves = {c: (*roc_curve(y == i, probs[:, i])[:2], r[f"auc_{c}"]["value"]) for i, c in enumerate(classes)}
        roc = roc_figure(None, None, r["auc"]["value"], f"{what}: one-vs-rest ROC ({n} images)", more=curves)
        title = f"{what}, argmax"
    save_figure(roc, out / f"roc_{tag}.png")
    save_figure(confusion_figure(np.array(r["confusion_matrix"]), title, classes), out / f"confusion_{tag}.png")


def log_result(result: dict, path: Path) -> None:
    """Every metric block of an eval result, value and CI, one line a metric; then a table of
    each decision's subgroups."""
    log.info("%s (%s): %d images of %d patients, checkpoint %s, CIs resampling %ss", result["split"],
             result["task"], result["images"], result["patients"], result["checkpoint"], result["bootstrap"]["unit"])
    blocks = {"argmax": result[ARGMAX]} if ARGMAX in result else {}
    for name, r in binary_results(result).items():
        at_val = r[AT_VAL_THRESHOLD]
        blocks[f"{name} ({r['images']} images, {r['positives']} positive) at {at_val['threshold']:.3f}, "
               f"{origin(at_val['rule'])}"] = at_val
        blocks[f"{name} at 0.5"] = r[AT_HALF]
    for title, block in blocks.items():
        log.info("  %s:", title)
        for metric, v in block.items():
            if isinstance(v, dict):
                ci = v["ci95"]
                log.info("    %-24s %.3f%s", metric, v["value"], f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    for name, block in result.get("subgroups", {}).items():
        log.info("  %s by subgroup, at %.3f:", name, block["threshold"])
        for line in subgroup_table(block).splitlines():
            log.info("    %s", line)
    log.info("  -> %s", path)


SUBGROUP_COLUMNS = (("sensitivity", "sens"), ("specificity", "spec"), ("auc", "AUC"))


def subgroup_table(block: dict) -> str:
    """One decision's subgroups as a compact table: group, images, patients, positives, then
    sensitivity, specificity and AUC with their CIs where defined ("-" where not)."""
    from tabulate import tabulate

    def cell(v: Optional[dict]) -> str:
        if not v or v["value"] is None or v["value"] != v["value"]:  # absent or nan
            return "-"
        ci = v["ci95"]
        return f"{v['value']:.3f}" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")

    rows = [[f"{grouping} {group}", c["images"], c["patients"], c["positives"],
             *(cell(c.get(key)) for key, _ in SUBGROUP_COLUMNS)]
            for grouping, groups in block["by"].items() for group, c in groups.items()]
    return tabulate(rows, headers=["group", "images", "patients", "pos", *(h for _, h in SUBGROUP_COLUMNS)],
                    tablefmt="plain", disable_numparse=True)


def calibrate_checkpoint(checkpoint: Path, batch_size: int = 64, workers: int = 2) -> float:
    """Fit a checkpoint's temperature on its data set's val split (calibration.json beside it)."""
    model = load_trained_model(checkpoint)
    writable_folder(model.run_dir, "the temperature (calibration.json) is stored beside the checkpoint",
                    "copy the checkpoint's folder somewhere you can write and calibrate the copy")
    data_dir = Path(model.cfg.data.dir)
    val = predict_split([model], data_dir, read_manifest(data_dir), "val", batch_size, workers, 1)
    return fit_temperature_of(model, val.labels, val.raw[0])


def fit_temperature_of(model: TrainedModel, y_val: np.ndarray, probs_val_raw: np.ndarray) -> float:
    """Fit the checkpoint's temperature on val (probs_val_raw: its NxK class probabilities
    before any temperature; two classes: of p(class 1), K: of all K), store it beside it, use
    it from now on."""
    p_val = probs_val_raw[:, 1] if probs_val_raw.shape[1] == 2 else probs_val_raw
    temperature = fit_temperature(y_val, p_val)
    record = save_temperature(model.run_dir, temperature, y_val, p_val, str(model.checkpoint))
    model.temperature = temperature
    log.info("calibrate: temperature %.3f fitted on val (ECE %.3f -> %.3f, NLL %.3f -> %.3f) -> %s",
             temperature, record["val_before"]["ece"], record["val_after"]["ece"],
             record["val_before"]["nll"], record["val_after"]["nll"], model.run_dir / CALIBRATION_FILE)
    return temperature


def error_picks(y: np.ndarray, p: np.ndarray, threshold: float, n: int) -> dict[str, list[int]]:
    """The rows of a two-class model's explain grid: the n most confident false positives,
    false negatives, true positives and true negatives at `threshold` (p = p(class 1))."""
    by_p, by_q = np.argsort(-p, kind="stable"), np.argsort(p, kind="stable")
    return {"false positives": [int(i) for i in by_p if y[i] == 0 and p[i] >= threshold][:n],
            "false negatives": [int(i) for i in by_q if y[i] == 1 and p[i] < threshold][:n],
            "true positives": [int(i) for i in by_p if y[i] == 1 and p[i] >= threshold][:n],
            "true negatives": [int(i) for i in by_q if y[i] == 0 and p[i] < threshold][:n]}


def class_picks(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n: int) -> dict[str, list[int]]:
    """The rows of a K-class model's explain grid: per class, the n most confident wrong calls
    of it (images of another class it was the top class of), then its n most confident right ones."""
    top, order = probs.argmax(axis=1), np.argsort(-probs.max(axis=1), kind="stable")
    picks = {}
    for c, name in enumerate(classes):
        picks[f"called {name.lower()}, wrongly"] = [int(i) for i in order if top[i] == c and y[i] != c][:n]
        picks[f"called {name.lower()}, rightly"] = [int(i) for i in order if top[i] == c and y[i] == c][:n]
    return picks


def explain_errors(model: TrainedModel, records: TaskRecords, names: list[str], y: np.ndarray, p: np.ndarray,
                   picks: dict[str, list[int]], out: Path) -> None:
    """One grid, a row per pick (error_picks, class_picks), each image with the map of the class
    whose probability its caption gives: p(class 1) of a two-class model, the top class of more."""
    classes = model.classes
    wanted = {i for picked in picks.values() for i in picked}
    tensors, index = {}, 0
    for batch in make_eval_dataset(records, model.spec, 32, workers=1).create_tuple_iterator(
            num_epochs=1, output_numpy=True):
        for x in batch[0]:
            if index in wanted:
                tensors[index] = x
            index += 1

    def caption(i: int) -> str:
        if p.ndim == 1:
            return f"{names[i]}\np({classes[1].lower()}) {p[i]:.3f}"
        top = int(p[i].argmax())
        return f"{names[i]} ({classes[y[i]].lower()})\np({classes[top].lower()}) {p[i, top]:.3f}"

    rows = []
    for title, picked in picks.items():
        shown = None if p.ndim == 1 else [int(p[i].argmax()) for i in picked]  # (the top class with TTA too)
        cams = grad_cam(model.net, np.stack([tensors[i] for i in picked]), shown) if picked else []
        rows.append((title, [(tensors[i], cam, caption(i)) for i, cam in zip(picked, cams)]))
    save_figure(cam_grid(rows), out)
    log.info("explain: the most confident errors and right calls of each kind -> %s", out)


def output_place(models: Sequence[TrainedModel], out_dir: Optional[Path], split: str,
                 tta: int, rule: ThresholdRule = YOUDEN) -> tuple[Path, str]:
    """(folder, file tag) of an evaluation: out_dir if given, else the run folder of one
    checkpoint (an ensemble needs out_dir); tag = split, with _tta<K>, and with the threshold
    rule's parts that differ from the one the run trained with (so that another rule never
    replaces the run's own eval_<split>.json)."""
    if out_dir is not None:
        out = Path(out_dir)
    elif len(models) == 1:
        out = models[0].run_dir
    else:
        raise XrayError("an ensemble's results need a folder of their own; pass out_dir")
    other_rule = rule.tag(trained_with(models[0]), models[0].task)
    return out, split + (f"_tta{tta}" if tta > 1 else "") + (f"_{other_rule}" if other_rule else "")


def predictions_csv(names: Sequence[str], labels: np.ndarray, probs: np.ndarray,
                    classes: Sequence[str]) -> str:
    """file_name, label (class id), p_<class> per image, one column per class given (the
    positive class of a two-class task: p_pneumonia). The csv module quotes odd names."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "label", *(f"p_{c.lower()}" for c in classes)])
    writer.writerows([name, int(t), *(f"{q:.6f}" for q in qs)] for name, t, qs in zip(names, labels, probs))
    return buf.getvalue()


def summary(result: dict) -> dict:
    """The point values of an eval result, for metrics.json's `eval`: {at_val_threshold: {rule,
    threshold, metric: value, ...}, at_0.5: {threshold, ...}} for a two-class task, {argmax:
    {metric: value, ...}} for more classes."""
    return {key: {k: v["value"] if isinstance(v, dict) else v for k, v in result[key].items()
                  if k != "confusion_matrix"}
            for key in (AT_VAL_THRESHOLD, AT_HALF, ARGMAX) if key in result}


def evaluate_splits(checkpoint: Path, data_dir: Path, manifest: dict, cfg: DictConfig,
                    time_is_up: Callable[[], bool] = lambda: False) -> dict:
    """Evaluate the val-chosen checkpoint on each of train.eval_splits the data set has
    (eval_<split>.json etc. in the run folder); returns {split: summary(its result)}, or
    {split: {error: ..}}: the training result stands whatever happens here. Nothing here feeds
    back into training or checkpoint choice. Stops early when the job's time is up (the result
    is written before the scheduler kills it)."""
    out: dict = {}
    val_thresholds = None  # chosen on val once, for every split
    splits = sorted(cfg.train.eval_splits or [], key=lambda s: s != "val")
    for split in splits:
        if time_is_up():
            log.warning("eval: time is up, %s not evaluated", split)
            out[split] = {"error": "not evaluated: the job's time limit was near"}
            continue
        if not (manifest["splits"].get(split) or {}).get("file"):
            log.info("eval: %s has no %s split, skipped", data_dir, split)
            continue
        try:
            result = evaluate([checkpoint], split, data_dir, batch_size=cfg.batch_size,
                              bootstrap=cfg.train.eval_bootstrap, workers=cfg.data.workers,
                              val_thresholds=val_thresholds, threshold_rule=ThresholdRule.of(cfg.train),
                              bootstrap_unit=str(cfg.train.get("eval_bootstrap_unit", "patient")))
        except Exception as e:  # noqa: BLE001 - recorded; the trained model is still good
            log.error("eval: %s failed: %s", split, e)
            out[split] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            continue
        if split == "val":  # (a K-class task decides by argmax; a subtype model's read-offs have theirs)
            val_thresholds = chosen_thresholds(result)
        out[split] = summary(result)
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    check(cfg, EVALUATE)
    if not isinstance(cfg.get("card", False), bool):
        raise XrayError(f"card={cfg.card} must be true or false")
    checkpoints = resolve_checkpoints(cfg.ckpt, cfg.top_k)
    out_dir = cfg.get("out_dir")  # null: the run folder of one checkpoint, this command's folder for more
    if out_dir is None and len(checkpoints) > 1:
        out_dir = HydraConfig.get().runtime.output_dir
    setup_device(cfg.device_target, cfg.mode)
    evaluate(checkpoints, cfg.split, cfg.data_dir, cfg.batch_size, cfg.bootstrap, cfg.seed,
             cfg.workers, cfg.tta, out_dir=None if out_dir is None else Path(str(out_dir)),
             calibrate=cfg.calibrate, explain=cfg.explain, threshold_rule=ThresholdRule.of(cfg),
             bootstrap_unit=str(cfg.get("bootstrap_unit", "patient")), card=bool(cfg.get("card", False)))


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.evaluate import main as entrypoint

    entrypoint()
