"""One driver per output directory (kdray.pipeline.lock): a second `kdray run` into a directory
another one writes is refused before it touches anything there, and a killed holder leaves
no stale lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdray.errors import OutputDirInUse
from kdray.pipeline.lock import LOCK_NAME, output_lock

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from pathlib import Path
from kdray.pipeline.lock import output_lock
with output_lock(Path(sys.argv[1]), job_id="abc123"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_output_dir_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirInUse) as err, output_lock(tmp_path):
            pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "service job abc123" in message and str(tmp_path) in message
        assert "another output_dir" in message
    finally:
        holder.kill()  # as a crash would: no clean-up of its own
        holder.wait()
    with output_lock(tmp_path):  # the kernel dropped the dead holder's lock
        pass
    assert (tmp_path / LOCK_NAME).is_file()  # kept: removing it would let two processes lock two files


def test_kdray_run_into_a_directory_another_run_holds_exits_2_and_writes_nothing(tmp_path, toy_world):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    out = tmp_path / "out"
    out.mkdir()
    spec.update(name="second", output_dir=str(out))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    holder = _holder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        res = subprocess.run([sys.executable, "-m", "kdray.cli", "run", str(tmp_path / "job.yaml"), "--restart"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert res.returncode == 2, res.stdout + res.stderr
        assert "in use by another kdray run" in res.stderr and f"pid {holder.pid}" in res.stderr
        assert "Traceback" not in res.stderr
        assert sorted(p.name for p in out.iterdir()) == before  # no events.jsonl, nothing restarted
    finally:
        holder.kill()
        holder.wait()


def test_an_output_dir_that_cannot_hold_the_lock_is_a_clear_error(tmp_path):
    from kdray.errors import ClusterError

    (tmp_path / LOCK_NAME).mkdir()  # stands in for storage that refuses the file (read-only, no locks)
    with pytest.raises(ClusterError, match="cannot take its lock file"), output_lock(tmp_path):
        pass
