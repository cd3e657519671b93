"""One driver per output directory: ``kdray run`` holds ``OUTPUT_DIR/.kdray-run.lock`` for the
whole run.

Two drivers writing one output directory would share ``state/``, ``events.jsonl`` and
``student/``, and one's ``--restart`` would delete the other's checkpoints. The lock is a POSIX
record lock (``fcntl.lockf``) on the file: the kernel drops it when its process ends, however
it ends (a killed driver leaves no stale lock behind), and NFS (v3 through NLM, v4 natively)
and Lustre carry such locks between the nodes that share the directory. The file also says
who holds it, for the error the next driver gets; it is never deleted (a process waiting on
the old file while a new one is created would hold a lock nobody else sees).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdray.errors import OutputDirInUse

LOCK_NAME = ".kdray-run.lock"


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in the file (best effort)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        job = f", service job {info['job_id']}" if info.get("job_id") else ""
        return f"pid {info['pid']} on {info['host']} since {since}{job}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def output_lock(out: Path, job_id: str | None = None) -> Iterator[None]:
    """Hold the lock of the output directory ``out`` (which must exist) until the block ends.

    Raises:
        OutputDirInUse: another process holds it (its pid, host and start are in the message).
        OSError: the lock file cannot be created or locked for another reason (a read-only
            directory; a filesystem without lock support answers ENOLCK).
    """
    path = Path(out) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # held by another process
                raise
            holder = _holder(fd)
            raise OutputDirInUse(
                f"output_dir {out} is in use by another kdray run ({holder}); two jobs in one output "
                "directory would overwrite each other's state and checkpoints: wait for it to end or stop it, "
                "or give this job another output_dir", owner=holder) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "job_id": job_id, "argv": sys.argv[:4]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
