"""Predict single images (or every image in a folder) with a trained checkpoint.

    python -m xray.predict ckpt=<run>/checkpoints/best.ckpt image=some.jpeg [plot=true] [tta=4]
    python -m xray.predict ckpt=outputs/best/<sweep> top_k=3 image=<folder>      # an ensemble

Prints `file  label  p(<class>)...`: p of the positive class of a two-class task (p(pneumonia)),
every class's p of a K-class one, each model's through its temperature if it was calibrated
(calibration.json beside its checkpoint). A two-class model's label, and a subtype model's
`screen` (PNEUMONIA or NORMAL from p(pneumonia) = 1 - p(normal)), are read at `threshold`: by
default (`val`) the one the checkpoint's own val evaluation chose (eval_val.json beside it, the
threshold every reported figure is read at), else 0.5, with a warning saying why. plot=true saves
<image name>.png (the X-ray titled with its prediction) into out_dir, by default this command's
output folder.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import hydra
import numpy as np
from PIL import Image
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tabulate import tabulate

from xray import CONF_DIR
from xray.calibration import class_probabilities
from xray.checks import PREDICT, check
from xray.checkpoint import TrainedModel, load_trained_model, resolve_checkpoints
from xray.device import setup_device
from xray.errors import XrayError, one_line_errors
from xray.explain import cam_figure, grad_cam
from xray.hparams import AT_VAL_THRESHOLD, binary_results, read_eval
from xray.plots import prediction_figure, save_figure
from xray.preprocess import MAX_PIXELS, load_image, model_input

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}


def writable_folder(folder: Path, why: str = "", remedy: str = "pass out_dir=<a folder you can write>") -> Path:
    """`folder`, created if need be, once a file could be made in it; else one line naming it
    (a read-only mount, a published model's folder, no permission) and out_dir=. Checked before
    any work, so a read-only place costs nothing but this line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".xray-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise XrayError(f"cannot write into {folder} ({reason})" + (f": {why}" if why else "")
                        + f"; {remedy}") from None
    return folder


def list_images(path: Path) -> list[Path]:
    """A file, or the image files directly inside a folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise XrayError(f"image={path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    raise XrayError(f"image={path} does not exist; pass an image file or a folder of images")


def screened(models: Sequence[TrainedModel]) -> bool:
    """Whether the models are subtype models, read as pneumonia vs normal (p = 1 - p(normal))."""
    return models[0].task == "subtype"


class Threshold(NamedTuple):
    value: float
    where: str  # where it comes from: said after the table
    fallback: bool  # 0.5 for want of a val evaluation of exactly these models: said as a warning


def same_checkpoint(recorded: str, checkpoint: Path, folder: Path) -> bool:
    """Whether an evaluation's recorded checkpoint path is `checkpoint`: the same file while the
    recorded path exists, else (the folder moved, or was written under a temporary name, as
    xray.report's best folders are) the same path below `folder`, e.g. checkpoints/best.ckpt."""
    recorded_path = Path(recorded)
    if recorded_path.exists():
        return checkpoint.exists() and recorded_path.samefile(checkpoint)
    try:
        tail = len(checkpoint.resolve().relative_to(folder.resolve()).parts)
    except ValueError:
        tail = 1
    return recorded_path.parts[-tail:] == checkpoint.parts[-tail:]


def val_threshold(models: Sequence[TrainedModel], tta: int = 1,
                  folder: Optional[Path] = None) -> tuple[Optional[float], str]:
    """(the threshold the val evaluation of exactly these models chose for their decision --
    a two-class task's own, a subtype model's pneumonia vs normal --, where it comes from), or
    (None, why there is none). It is read from eval_val.json (eval_val_tta<K>.json) in `folder`:
    by default one model's run folder (an ensemble needs its best folder), which holds the one
    evaluation made with the rule the run trained with; it must be of these checkpoints, on the
    run's data set, through their temperatures."""
    from xray.evaluate import origin, trained_with  # (xray.evaluate imports this module)

    model = models[0]
    if folder is None:
        if len(models) > 1:
            return None, "a list of checkpoints has no val evaluation of its own"
        folder = model.run_dir
    path = folder / ("eval_val.json" if tta == 1 else f"eval_val_tta{tta}.json")
    rule = trained_with(model)
    evaluate = " ".join([f"python -m xray.evaluate ckpt={folder if len(models) > 1 else model.checkpoint}",
                         *([f"top_k={len(models)} out_dir={folder}"] if len(models) > 1 else []), "split=val",
                         *([f"tta={tta}"] if tta > 1 else []), f"threshold_rule={rule.name}",
                         f"target_sensitivity={rule.target_sensitivity:g}"])
    if not path.is_file():
        return None, f"{path} does not exist (`{evaluate}` writes it)"
    result = read_eval(path)
    recorded = result.get("checkpoint")
    recorded = [str(c) for c in recorded] if isinstance(recorded, list) else [str(recorded)]
    if len(recorded) != len(models) or not all(same_checkpoint(r, m.checkpoint, folder)
                                               for r, m in zip(recorded, models)):
        what = f"an ensemble of {len(recorded)}" if len(recorded) > 1 else recorded[0]
        return None, f"{path} evaluated {what}, not {'these models' if len(models) > 1 else model.checkpoint}"
    data_dir = Path(str(model.cfg.data.dir))
    if Path(str(result.get("data_dir"))).resolve() != data_dir.resolve():
        return None, f"{path} was evaluated on {result.get('data_dir')}, not on the run's {data_dir} (`{evaluate}`)"
    temperatures = [m.temperature for m in models] if len(models) > 1 else model.temperature
    if (result.get("calibration") or {}).get("temperature") != temperatures:
        return None, f"{path} was read through another temperature than calibration.json's (`{evaluate}`)"
    name = "pneumonia_vs_normal" if model.task == "subtype" else model.task
    block = binary_results(result).get(name)
    if block is None:
        return None, f"{path} holds no {name} decision (`{evaluate}`)"
    at = block[AT_VAL_THRESHOLD]
    chosen = origin(at["rule"]) if at.get("rule") else "a rule not recorded, on val"
    return float(at["threshold"]), f"{chosen}, from {path}"


def decision_threshold(models: Sequence[TrainedModel], threshold, tta: int = 1,
                       folder: Optional[Path] = None) -> Threshold:
    """predict's `threshold`: a number as given; `val` the one the val evaluation of exactly
    these models chose (val_threshold), else 0.5 and a warning (never silently: the figures a
    run reports are read at its val threshold)."""
    if threshold != "val":
        return Threshold(float(threshold), f"threshold {float(threshold):.4f}, as given", False)
    value, where = val_threshold(models, tta, folder)
    if value is None:
        return Threshold(0.5, f"threshold 0.5, not one chosen on val: {where}; or pass threshold=<p>", True)
    return Threshold(value, f"threshold {value:.4f} ({where})", False)


def shown_classes(models: Sequence[TrainedModel]) -> tuple[str, ...]:
    """The probability columns: the positive class of a two-class task (pneumonia, or bacterial),
    every class of a K-class one."""
    classes = models[0].classes
    if any(m.classes != classes for m in models):
        raise XrayError("an ensemble's members must share one task; "
                        f"these tell apart {sorted({' / '.join(m.classes) for m in models})}")
    return classes[1:] if len(classes) == 2 else classes


def predict_images(models: Sequence[TrainedModel], paths: list[Path], threshold: float = 0.5,
                   plot_dir: Optional[Path] = None, batch_size: int = 32, tta: int = 1,
                   max_pixels: int = MAX_PIXELS, explain_dir: Optional[Path] = None) -> list[dict]:
    """[{file, label, p_<class>...}] per readable image (the models' mean probability, each
    model through its own preprocessing), in the order of `paths`: a two-class model gives
    p of its positive class (p_pneumonia) and the label at `threshold`, a K-class model every
    class's p and the top class; a subtype model also `screen`, PNEUMONIA when p_pneumonia =
    1 - p(normal) >= `threshold`, else NORMAL (0.5 here; the command's default is the threshold
    val chose, decision_threshold). Unreadable images get label 'error' and the reason.
    plot_dir: <name>.png, the image titled with its prediction; explain_dir: <name>_cam.png,
    its Grad-CAM map."""
    classes, shown = models[0].classes, shown_classes(models)
    screen = screened(models)
    screen_keys = ["screen", "p_pneumonia"] if screen else []
    results: dict[Path, dict] = {}
    for start in range(0, len(paths), batch_size):
        loaded, ok = [], []  # per image: {short_side: image}
        for path in paths[start:start + batch_size]:
            try:
                images = {s: load_image(path, s, max_pixels)
                          for s in sorted({m.spec.short_side for m in models})}
            except Exception as e:  # noqa: BLE001 - report and go on with the other images
                results[path] = {"file": str(path), "label": "error", **{k: None for k in screen_keys},
                                 **{f"p_{c.lower()}": None for c in shown},
                                 "error": f"{type(e).__name__}: {e}".splitlines()[0]}
                continue
            loaded.append(images)
            ok.append(path)
        if not ok:
            continue
        batches = [np.stack([model_input(images[m.spec.short_side], m.spec, tta) for images in loaded])
                   for m in models]
        # each member through its own temperature (any number of classes), then their mean
        probs = np.mean([class_probabilities(m, b) for m, b in zip(models, batches)], axis=0)
        for path, images, q in zip(ok, loaded, probs):
            top = int(q[1] >= threshold) if len(classes) == 2 else int(q.argmax())
            pneumonia = {"screen": "PNEUMONIA" if 1 - q[0] >= threshold else "NORMAL",
                         "p_pneumonia": float(1 - q[0])} if screen else {}
            results[path] = {"file": str(path), "label": classes[top], **pneumonia,
                             **{f"p_{c.lower()}": float(q[classes.index(c)]) for c in shown}}
            title = f"{path.name}\n{classes[top]}  p({classes[top].lower()}) = {q[top]:.3f}" + (
                f"\nscreen {pneumonia['screen']}: p(pneumonia) = {pneumonia['p_pneumonia']:.3f}" if screen else "")
            if plot_dir is not None:
                image = images[models[0].spec.short_side]
                save_figure(prediction_figure(image, title), plot_dir / f"{path.stem}.png")
            if explain_dir is not None:
                tensor, cam = explain_image(models, images, None if len(classes) == 2 else top)
                save_figure(cam_figure(tensor, cam, title), explain_dir / f"{path.stem}_cam.png")
    return [results[path] for path in paths]


def explain_image(models: Sequence[TrainedModel], images: dict,
                  cls: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(the first model's input, the Grad-CAM map of class `cls`, by default the positive
    class of a two-class model); for an ensemble the mean of its members' maps, each resized
    to the first one's input."""
    size = models[0].spec.image_size
    cams = []
    for m in models:
        x = model_input(images[m.spec.short_side], m.spec)[None]
        cam = grad_cam(m.net, x, None if cls is None else [cls])[0]
        if cam.shape != (size, size):
            cam = np.asarray(Image.fromarray(cam, "F").resize((size, size), Image.Resampling.BILINEAR))
        cams.append(cam)
    return model_input(images[models[0].spec.short_side], models[0].spec), np.mean(cams, axis=0)


def format_results(results: list[dict]) -> str:
    """The table: file, label, a subtype model's screen, one p(<class>) column per probability
    the results carry, and why an image could not be read, if one could not."""
    columns = [k for k in (results[0] if results else {}) if k not in ("file", "label", "error")]
    errors = any("error" in r for r in results)

    def cell(value) -> str:
        return "-" if value is None else value if isinstance(value, str) else f"{value:.4f}"

    rows = [[r["file"], r["label"], *(cell(r[k]) for k in columns),
             *([r.get("error", "")] if errors else [])] for r in results]
    headers = ["file", "label", *(f"p({k[2:]})" if k.startswith("p_") else k for k in columns),
               *(["error"] if errors else [])]
    # disable_numparse: the cells are formatted already; tabulate would turn "1.0000" into "1"
    return tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
@one_line_errors
def main(cfg: DictConfig) -> None:
    check(cfg, PREDICT)
    if cfg.image is None:
        raise XrayError("set image=<file or folder> (and ckpt=<run>/checkpoints/best.ckpt)")
    checkpoints = resolve_checkpoints(cfg.ckpt, cfg.top_k)
    setup_device(cfg.device_target, cfg.mode)
    models = [load_trained_model(c) for c in checkpoints]
    out = Path(str(cfg.get("out_dir") or HydraConfig.get().runtime.output_dir))
    if cfg.plot or cfg.explain:
        writable_folder(out, "plot=true and explain=true write their images there")
    best_folder = Path(str(cfg.ckpt)) if isinstance(cfg.ckpt, str) and Path(cfg.ckpt).is_dir() else None
    threshold = decision_threshold(models, cfg.threshold, cfg.tta, best_folder if len(models) > 1 else None)
    results = predict_images(models, list_images(Path(cfg.image)), threshold.value,
                             out if cfg.plot else None, tta=cfg.tta, max_pixels=cfg.max_pixels,
                             explain_dir=out if cfg.explain else None)
    print(format_results(results), flush=True)
    (log.warning if threshold.fallback else log.info)(threshold.where)  # after the table: scripts read its first line
    failed = [r for r in results if r["label"] == "error"]
    if failed:
        raise XrayError(f"{len(failed)} of {len(results)} images could not be read "
                        f"(first: {failed[0]['file']}: {failed[0]['error']})")
    if cfg.plot or cfg.explain:
        log.info("plots: %s", out)


if __name__ == "__main__":
    # call the module imported under its real name: submitit then pickles the task by
    # reference, and MindSpore's jit can read the source of what it compiles
    from xray.predict import main as entrypoint

    entrypoint()
