"""xray.files: a folder written whole or not at all, and the temp folders of dead writers cleaned up."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

from xray.files import atomic_dir, remove_stale_temps


@pytest.mark.unit
def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    target = tmp_path / "data"
    stale = tmp_path / f".data.tmp-{host}-{dead.pid}"
    live = tmp_path / f".data.tmp-{host}-{os.getpid()}"
    elsewhere = tmp_path / f".data.tmp-othernode-{dead.pid}"
    for folder in (stale, live, elsewhere):
        (folder / "x").mkdir(parents=True)
    assert remove_stale_temps(target) == [stale]
    assert live.exists() and elsewhere.exists() and not stale.exists()
    shutil.rmtree(live)
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
    assert (target / "f").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        ".data.tmp-othernode-%d" % dead.pid, "data"]
