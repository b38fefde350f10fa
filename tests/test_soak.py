"""The soak test (jobs/soak.py): a real sweep on the local Slurm under seeded faults (slow,
slurm), and unit tests of its plan, its file checks and of docs/reliability.md, whose figures
must equal the committed soak.json of the run it shows."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.soak import (DOC, DOC_JSON, FAULTS, SPACE_MARGIN, BEGIN, END, disk_size, figure_rows, job_outcome,
                       leftovers, markdown_table, plan)

REPO = Path(__file__).resolve().parents[1]


def slurm_up() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


# ---------------------------------------------------------------- unit

@pytest.mark.unit
def test_the_plan_is_the_seeds():
    a, b = plan(7, 6, 3, 3), plan(7, 6, 3, 3)
    assert a == b
    assert sorted(f["kind"] for f in a["faults"].values()) == sorted(FAULTS)  # five different members
    assert any(plan(s, 6, 3, 3) != a for s in range(1, 5))
    for seed in range(50):
        for fault in plan(seed, 6, 3, 3)["faults"].values():
            if "epoch" in fault:  # mid-epoch: a step before the epoch's last; requeue before the last epoch
                assert 2 <= fault["epoch"] <= (2 if fault["kind"] == "requeue" else 3) and 1 <= fault["step"] <= 2
            if "after_epoch" in fault:  # (after the second-last, KillWait could let the run end)
                assert fault["after_epoch"] == 1
    assert "full-disk" not in {f["kind"] for f in plan(7, 6, 3, 3, disk=False)["faults"].values()}


@pytest.mark.unit
def test_the_small_disk_passes_the_up_front_check_but_not_the_peak():
    weights = 233_067_480  # best.ckpt of AlexNet at 72 px
    size = disk_size(weights)
    assert 4 * weights + SPACE_MARGIN < size < 5 * weights


@pytest.mark.unit
def test_leftovers_are_temp_files_and_locks(tmp_path):
    member = tmp_path / "0_seed=1"
    (member / "checkpoints").mkdir(parents=True)
    for name in ("metrics.json", "checkpoints/best.ckpt", ".hydra.accepted", "train.log"):
        (member / name).write_text("x")
    assert leftovers(tmp_path) == ([], [])
    for name in (".metrics.json.tmp-123", "checkpoints/.last.tmp.ckpt", "checkpoints/.best.tmp.tmp"):
        (member / name).write_text("x")
    (member / ".xray.lock").write_text("{}")
    (member / ".xray.lock.takeover").write_text("{}")
    (tmp_path / ".submitit").mkdir()
    (tmp_path / ".submitit" / ".x.tmp").write_text("submitit's own")
    temps, locks = leftovers(tmp_path)
    assert temps == ["0_seed=1/.metrics.json.tmp-123", "0_seed=1/checkpoints/.best.tmp.tmp",
                     "0_seed=1/checkpoints/.last.tmp.ckpt"]
    assert locks == ["0_seed=1/.xray.lock", "0_seed=1/.xray.lock.takeover"]


@pytest.mark.unit
def test_what_a_job_did_is_read_from_its_log():
    assert job_outcome("[..][xray.train][INFO] - /x already finished (status ok); not training") == "no-op"
    assert job_outcome("error: /x is in use: training by root, pid 1 on host vm") == "refused"
    assert job_outcome("[..][xray.train][INFO] - resume: /x after epoch 1 step 0\n[..] - done") == "trained"
    assert job_outcome("[..] - resume: /x after epoch 1\nerror: /x has 304 MB free") == "trained+failed"


@pytest.mark.unit
def test_the_reliability_page_shows_the_committed_run():
    """docs/reliability.md's figures are those of docs/reliability/soak.json (python -m jobs.soak
    --publish writes both): the page cannot drift from the run it describes."""
    soak = json.loads(DOC_JSON.read_text())
    page = DOC.read_text()
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    shown = page.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == markdown_table(soak).strip()
    f = soak["figures"]  # a whole run: every fault injected, every member accounted for
    assert f["faults_by_kind"] == {**{k: 1 for k in FAULTS}, "second-launch": 1}
    assert sum(f["after_faults"].values()) == f["members"] == len(soak["members"]) == len(soak["report"])
    assert soak["passed"] == all(soak["checks"].values())
    rows = dict(figure_rows(soak))
    assert rows["checks passed"] == f"{sum(soak['checks'].values())} of {len(soak['checks'])}"
    # what the prose says of the checks that failed in that run
    for check, passed in soak["checks"].items():
        assert passed or check in page, f"the page does not explain the failed check {check!r}"
    assert "<out>" in soak["command"] and str(REPO) not in json.dumps(soak) and "/tmp/" not in json.dumps(soak)


# ---------------------------------------------------------------- the real soak

@pytest.mark.slow
@pytest.mark.slurm
def test_a_sweep_survives_the_faults(tmp_path):
    """`python -m jobs.soak`: every check passes (see jobs/soak.py for what is checked); on
    failure, the driver's output, its soak.json checks and the launches' logs are shown."""
    if not slurm_up():
        if os.environ.get("XRAY_REQUIRE_SLURM") == "1":
            raise RuntimeError("XRAY_REQUIRE_SLURM=1 but no Slurm cluster answers: run jobs/slurm-up.sh")
        pytest.skip("no Slurm cluster (start one with jobs/slurm-up.sh)")
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, "-m", "jobs.soak", "--out", str(out), "--seed", "7"], cwd=REPO,
                          capture_output=True, text=True, timeout=30 * 60)
    result_file = out / "sweep" / "soak.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    failed = [check for check, ok in result.get("checks", {}).items() if not ok]
    found = {k: result[k] for k in ("temp_files", "locks", "files_changed", "files_lost") if result.get(k)}
    two = [e for e in result.get("events", []) if "TWO WRITERS" in e["event"]]
    logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in sorted(out.glob("*.log")))
    shown = (f"failed checks: {failed}\nfound: {found} {two}\n--- jobs.soak\n" + proc.stdout[-5000:]
             + proc.stderr[-3000:] + logs)
    assert proc.returncode == 0, shown
    assert result["passed"], shown
    f = result["figures"]
    assert f["members_failed"] == 1 and "overwrite=true" in next(iter(f["failed_reasons"].values()))
    assert f["files_lost"] == f["temp_files_left"] == f["locks_left"] == 0
    assert not any(out.joinpath("sweep").glob("*/.xray.lock"))
    print(proc.stdout[-2500:])
