"""A copy of a job's driver log kept by the service (``STATE_DIR/jobs/ID/driver.log``).

Ray keeps a job's driver log in its session's logs folder on the head and hands it out while
its job table has the job. The service's local Ray, and so that table, goes with the service: a
service restarted after a crash, an upgrade or a reboot could no longer show the log of any job
it ran before, the failed ones included. The service's ``kdray run`` entrypoint therefore appends
everything its driver prints to a file beside the spec the service saved for it
(:func:`kdray.service.queue.spec_path`); ``GET /v1/jobs/{id}/logs`` reads Ray's log while Ray
has the job and this copy once it has not, and deleting the job removes both
(:mod:`kdray.service.retention`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: The copy's file name, in the job's folder of the service's state dir.
LOG_NAME = "driver.log"


def copy_output_to(path: Path) -> None:
    """From now until this process and the processes it starts have ended, append everything
    they write to the standard output and error to ``path`` too, as it is written.

    A ``tee -a`` process (coreutils) reads both streams through one pipe and writes them on to
    this process's standard output (Ray's driver log) and to ``path``. It runs in its own
    session, so the signals Ray sends a stopped job's process group (SIGTERM, then SIGKILL)
    leave it to copy the driver's last lines; it ends when the last writer has gone. Nothing is
    lost from Ray's log by this: a write the driver made is in the pipe, and ``tee`` passes it on
    whatever becomes of the driver.

    Raises:
        OSError: ``path``'s folder cannot be made, or ``tee`` cannot be started.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read, write = os.pipe()
    try:
        subprocess.Popen(["tee", "-a", str(path)], stdin=read, stdout=1, stderr=2, start_new_session=True)
        os.dup2(write, 1)
        os.dup2(write, 2)
    finally:
        os.close(read)
        os.close(write)


def kept_log(job_folder: Path) -> str | None:
    """The copy of a job's driver log in ``job_folder`` (``STATE_DIR/jobs/ID``), or None when
    there is none (its driver never started, or an older kdray ran it)."""
    try:
        return (job_folder / LOG_NAME).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
