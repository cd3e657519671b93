"""Exclusive locks on files that the kernel releases with their process: one driver per output
directory, one service replica per job store.

``kdray run`` holds ``OUTPUT_DIR/.kdray-run.lock`` for the whole run (:func:`output_lock`): two
drivers writing one output directory would share ``state/``, ``events.jsonl`` and ``student/``,
and one's ``--restart`` would delete the other's checkpoints. The service's replica holds
``STATE_DIR/replica.lock`` for its life (:mod:`kdray.service.app`).

Each is a POSIX record lock (``fcntl.lockf``) on the file: the kernel drops it when its process
ends, however it ends (a killed holder leaves no stale lock behind), and NFS (v3 through NLM,
v4 natively) and Lustre mounted with ``-o flock`` carry such locks between the nodes that share
the directory (NFS with ``nolock`` and Lustre with ``localflock`` keep them per node). The file
also says who holds it, for the error the next process gets; it is never deleted (a process
waiting on the old file while a new one is created would hold a lock nobody else sees).
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
from typing import Any, Iterator

from kdray.errors import ClusterError, OutputDirInUse

LOCK_NAME = ".kdray-run.lock"


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` says who (pid, host, since when)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in the file (best effort)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        job = f", service job {info['job_id']}" if info.get("job_id") else ""
        return f"pid {info['pid']} on {info['host']} since {since}{job}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(path: Path, *, wait_s: float = 0.0, **info: Any) -> int:
    """The open file descriptor of ``path`` (created if need be) holding its exclusive lock;
    closing it releases the lock. ``info`` is written into the file beside the holder's pid,
    host and start time.

    Raises:
        LockHeld: another process still holds it after ``wait_s`` seconds.
        OSError: the file cannot be created or locked for another reason (a read-only
            directory; a filesystem without lock support answers ENOLCK).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):  # held by another process
                    raise
                if time.monotonic() >= deadline:
                    raise LockHeld(_holder(fd)) from None
                time.sleep(0.5)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def output_lock(out: Path, job_id: str | None = None) -> Iterator[None]:
    """Hold the lock of the output directory ``out`` (which must exist) until the block ends.

    Raises:
        OutputDirInUse: another process holds it (its pid, host and start are in the message).
        ClusterError: the lock file cannot be created or locked (read-only storage, or no
            record locks there).
    """
    try:
        fd = acquire(Path(out) / LOCK_NAME, job_id=job_id, argv=sys.argv[:4])
    except OSError as exc:  # read-only, or a filesystem without record locks (ENOLCK, ENOSYS, EOPNOTSUPP)
        raise ClusterError(
            f"output_dir {out}: cannot take its lock file {LOCK_NAME} ({exc.strerror}); give an output_dir on "
            "writable storage with POSIX record locks (NFS with locking, Lustre mounted with -o flock)") from None
    except LockHeld as held:
        raise OutputDirInUse(
            f"output_dir {out} is in use by another kdray run ({held.holder}); two jobs in one output "
            "directory would overwrite each other's state and checkpoints: wait for it to end or stop it, "
            "or give this job another output_dir", owner=held.holder) from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
