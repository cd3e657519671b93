"""A copy of a job's driver log kept by the service (``STATE_DIR/jobs/ID/driver.log``).

Ray keeps a job's driver log in its session's logs folder on the head and hands it out while
its job table has the job. The service's local Ray, and so that table, goes with the service: a
service restarted after a crash, an upgrade or a reboot could no longer show the log of any job
it ran before, the failed ones included. The service's ``kdray run`` entrypoint therefore appends
everything its driver prints to a file beside the spec the service saved for it
(:func:`kdray.service.queue.spec_path`); ``GET /v1/jobs/{id}/logs`` reads Ray's log while Ray
has the job and this copy otherwise, and deleting the job removes both
(:mod:`kdray.service.retention`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

#: The copy's file name, in the job's folder of the service's state dir.
LOG_NAME = "driver.log"
#: The most of a copy ``GET /v1/jobs/{id}/logs`` hands out: its end (a job's log is a few KB to
#: a few MB; Ray's own is handed out whole).
MAX_LOG_BYTES = 8 << 20
#: The signals the copying process ignores: those Ray's stop sends (``RAY_JOB_STOP_SIGNAL``,
#: SIGTERM by default) and a closing terminal's.
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _ignore_stops() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def copy_output_to(path: Path) -> str | None:
    """From now until this process and the processes it starts have ended, append everything
    they write to the standard output and error to ``path`` too, as it is written. Returns None,
    or why there is no copy (the caller goes on without one): ``path``'s folder is gone (the
    job was deleted), or ``tee`` or ``setsid`` is missing or cannot start.

    ``tee -a`` (coreutils) reads both streams through one pipe and writes them on to this
    process's standard output (Ray's driver log) and to ``path``. ``setsid -f`` (util-linux)
    starts it as no descendant of this process, with the stop signals (:data:`_IGNORED`)
    ignored: Ray 2.60 stops a job by signalling the job's process and each of its descendants,
    SIGTERM then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (``job_supervisor.py``), and a
    ``tee`` among them would die before the driver's last lines passed through it, from Ray's
    log too. It ends when the last writer has gone.
    """
    if not path.parent.is_dir():  # deleted with its job: the driver will find no record
        return f"{path.parent} is gone"
    tools = [shutil.which("setsid"), shutil.which("tee")]
    if None in tools:
        return "it needs setsid (util-linux) and tee (coreutils) on PATH"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read, write = os.pipe()
    try:
        starter = subprocess.Popen([tools[0], "-f", tools[1], "-a", "--", str(path)], stdin=read, stdout=1, stderr=2,
                                   preexec_fn=_ignore_stops)
        starter.wait()  # setsid -f returns once tee runs on its own
        os.dup2(write, 1)
        os.dup2(write, 2)
    except OSError as exc:
        return f"tee could not start ({exc})"
    finally:
        os.close(read)
        os.close(write)
    return None


def kept_log(job_folder: Path) -> str | None:
    """The copy of a job's driver log in ``job_folder`` (``STATE_DIR/jobs/ID``), or None when
    there is none (its driver never started, or an older kdray ran it): its last
    :data:`MAX_LOG_BYTES`, after a line saying how much was left out."""
    try:
        with open(job_folder / LOG_NAME, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_LOG_BYTES:
                fh.seek(size - MAX_LOG_BYTES)
            text = fh.read(MAX_LOG_BYTES).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if size > MAX_LOG_BYTES:
        text = (f"[the first {size - MAX_LOG_BYTES:,} bytes of this log are left out; the whole log: "
                f"{job_folder / LOG_NAME} on the service's node]\n" + text.partition("\n")[2])
    return text
