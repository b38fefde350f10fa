"""xray.card: the model card of a trained model -- its numbers (PPV/NPV at a prevalence, subgroups
of any nesting), a card from an old run's files, one from a run trained now (its recipe's caveats,
a Grad-CAM gallery computed when evaluate drew none), and both pages (a card and a sweep's
report.html) rendered in a real headless Chromium."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from xray.card import SECTIONS, at_prevalence, ppv_npv, subgroup_tables, write_model_card
from xray.hparams import read_eval

OLD_RUN = Path(__file__).parent / "data" / "old_run"  # real files of commit b93b4ef (see its README.md)
CHROMIUM = Path("/usr/bin/chromium")
IMG = re.compile(r"<img\b[^>]*>", re.I)


def images_of(page: str) -> list[str]:
    """The src of every <img> of an HTML page."""
    return [re.search(r'\ssrc="([^"]*)"', tag).group(1) if re.search(r'\ssrc="([^"]*)"', tag) else ""
            for tag in IMG.findall(page)]


def assert_self_contained(page: str) -> None:
    """Every image is an embedded PNG that decodes; nothing is loaded from elsewhere."""
    sources = images_of(page)
    assert sources, "no figure at all"
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'<(script|link|iframe)\b', page, re.I)


@pytest.mark.unit
def test_ppv_and_npv_at_a_prevalence():
    # 90 % sensitive, 80 % specific, 10 % prevalence: 9 true positives per 18 false ones in 100
    ppv, npv = ppv_npv(0.9, 0.8, 0.10)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18)) and npv == pytest.approx(0.72 / (0.72 + 0.01))
    assert ppv_npv(1.0, 0.0, 0.5) == (0.5, None)  # nobody called negative: NPV undefined
    block = {"sensitivity": {"value": 0.9, "ci95": [0.8, 0.95]}, "specificity": {"value": 0.8, "ci95": [0.7, 0.9]}}
    p, n = at_prevalence(block, 0.10)
    assert p["value"] == pytest.approx(ppv) and p["ci95"] == pytest.approx(
        [ppv_npv(0.8, 0.7, 0.1)[0], ppv_npv(0.95, 0.9, 0.1)[0]])
    assert n["ci95"][0] < n["value"] < n["ci95"][1]
    assert at_prevalence({"sensitivity": {"value": None}}, 0.1)[0]["value"] is None


@pytest.mark.unit
def test_subgroups_become_tables_whatever_their_nesting():
    metric = lambda v: {"value": v, "ci95": [v - 0.1, v + 0.1]}  # noqa: E731
    today = {"binary": {"threshold": 0.42, "rule": "youden", "by": {
        "subtype": {"normal": {"images": 10, "specificity": metric(0.8), "confusion_matrix": [[8, 2], [0, 0]]},
                    "virus": {"images": 3, "sensitivity": metric(0.6)}},
        "family": {"IM-": {"images": 7, "specificity": metric(0.9)}}}}}
    [table] = subgroup_tables(today)
    assert table.caption == "binary: threshold 0.420, rule youden"
    assert table.columns == ["by", "group", "images", "specificity", "sensitivity", "confusion_matrix"]
    assert table.rows[0] == ["subtype", "normal", "10", "0.800 (0.700-0.900)", "-", "[[8,2],[0,0]]"]
    assert [row[:2] for row in table.rows] == [["subtype", "normal"], ["subtype", "virus"], ["family", "IM-"]]
    # a flat shape and a list shape are tables too
    [flat] = subgroup_tables({"family": {"IM-": {"n": 3, "auc": metric(0.7)}, "person": {"n": 4}}})
    assert flat.columns == ["group", "n", "auc"] and len(flat.rows) == 2
    [listed] = subgroup_tables([{"name": "aspect", "groups": [{"name": "<1.1", "n": 1}, {"name": ">=1.5", "n": 2}]}])
    assert [row[0] for row in listed.rows] == ["<1.1", ">=1.5"]
    assert subgroup_tables(None) == [] and subgroup_tables("nothing") == []


@pytest.mark.unit
def test_a_card_from_an_old_runs_files(tmp_path):
    """An old run (keys of before the rename, no config.yaml, no checkpoint left, CIs over
    images): the card is still whole, says what it lacks and warns about its image CIs."""
    folder = tmp_path / "binary"
    shutil.copytree(OLD_RUN / "binary", folder)
    results = {"val": read_eval(folder / "eval_val.json"), "test": read_eval(folder / "eval_test.json")}
    md, page = write_model_card(folder, [Path("/gone/checkpoints/best.ckpt")], results, gallery=False)
    assert (md.name, page.name) == ("model_card.md", "model_card.html")
    text = page.read_text()
    assert_self_contained(text)
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert "CIs resample images, not patients" in text
    assert "No Grad-CAM gallery" in text and "no data-set fingerprint" in text
    # the test half's own prevalence (10 of 20) and the stated 10 %
    assert "stated: 10%" in text and "test&#x27;s own: 50%" in text
    markdown = md.read_text()
    assert "## Subgroups" in markdown and "## Caveats" in markdown and "data:image" not in markdown


@pytest.mark.unit
def test_a_card_needs_a_result(tmp_path):
    from xray.errors import XrayError
    with pytest.raises(XrayError, match="at least one evaluation result"):
        write_model_card(tmp_path, [], {})


def test_a_card_of_a_run_trained_now(trained_run, tmp_path):
    """Today's results: subgroups, the data set's fingerprint, calibration, provenance, the
    recipe's own caveats, and a Grad-CAM gallery computed (evaluate drew none at the run's end)."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("*.ckpt", "model_card.*", "cam_errors_*"))
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "best.ckpt").symlink_to(trained_run / "checkpoints" / "best.ckpt")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["caveats"] = ["recipe chosen by looking at the test split"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = {s: read_eval(run / f"eval_{s}.json") for s in ("val", "test")}
    out = tmp_path / "card"
    md, page = write_model_card(run, [run / "checkpoints" / "best.ckpt"], results, out_dir=out)
    text = page.read_text()
    assert_self_contained(text)
    caveats = re.search(r'<section id="caveats">(.*?)</section>', text, re.S).group(1)
    assert "<li>recipe chosen by looking at the test split</li>" in caveats  # the recipe's own, listed
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["provenance"]["git"]["commit"][:12] in text
    assert results["test"]["data"]["manifest_sha256"] in text  # the fingerprint
    assert "NORMAL2-IM-" in text and "aspect_ratio" in text  # the subgroup table
    assert "Grad-CAM of the most confident errors" in text and (out / "cam_errors_test.png").is_file()
    assert not (trained_run / "cam_errors_test.png").exists()  # drawn into the card's folder only
    # the markdown links evaluate's figures from where it is
    assert f"]({Path('..') / 'run' / 'roc_test.png'})" in md.read_text()


# -- a real browser ------------------------------------------------------------------------------

def chromium(url: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", *args, url],
                          capture_output=True, text=True, timeout=180)


def render(page: Path, tmp: Path) -> tuple[Path, str]:
    """(a 1200 x 3000 screenshot, the DOM after loading) of a page in headless Chromium."""
    shot = tmp / f"{page.stem}.png"
    proc = chromium(page.resolve().as_uri(), f"--screenshot={shot}", "--window-size=1200,3000", tmp=tmp)
    assert shot.is_file(), proc.stderr[-2000:]
    keep = os.environ.get("XRAY_SCREENSHOTS")  # (make card-check: to look at them)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    dom = chromium(page.resolve().as_uri(), "--dump-dom", tmp=tmp)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return shot, dom.stdout


def assert_not_blank(shot: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200)
    dark = (pixels < 128).mean()  # text, lines and figures on a white page
    assert pixels.std() > 20 and 0.005 < dark < 0.5, (pixels.std(), dark)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (Debian: apt-get install -y chromium)")
def test_the_card_and_the_sweep_page_render_in_chromium(trained_run, tmp_path):
    """model_card.html and report.html, opened as files in headless Chromium: something is drawn,
    every section is there, and every image is embedded (a data: PNG the browser decoded)."""
    from xray.report import report

    sweep = tmp_path / "sweep"
    for i, seed in enumerate((42, 7)):
        member = sweep / f"{i}_seed={seed}"
        shutil.copytree(trained_run, member, ignore=shutil.ignore_patterns("*.ckpt", "model_card.*"))
        (member / ".hydra").mkdir()
        shutil.copy(member / "config.yaml", member / ".hydra" / "config.yaml")
        metrics = json.loads((member / "metrics.json").read_text())
        metrics["hparams"]["seed"] = seed
        (member / "metrics.json").write_text(json.dumps(metrics))
    report(sweep, best_root=None)
    results = {s: read_eval(trained_run / f"eval_{s}.json") for s in ("val", "test")}
    _, card = write_model_card(trained_run, [trained_run / "checkpoints" / "best.ckpt"], results,
                               out_dir=tmp_path / "card")
    for page, sections in ((card, list(SECTIONS)), (sweep / "report.html", ["summary", "configurations", "members",
                                                                            "figures"])):
        shot, dom = render(page, tmp_path)
        assert_not_blank(shot)
        for section in sections:
            assert f'id="{section}"' in dom, (page, section)
        assert_self_contained(dom)
    # the sweep page links each member's card, and the link leads to a file
    dom = render(sweep / "report.html", tmp_path)[1]
    links = re.findall(r'href="(cards/[^"]+)"', dom)
    assert len(links) == 2 and all((sweep / unquote(link)).is_file() for link in links)
