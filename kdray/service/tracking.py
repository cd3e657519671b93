"""A job the service submitted follows its record: ``kdray run SPEC --store DB --job-id ID``
appends its progress events to the job store and sets the record's state (running, then
succeeded, failed with the user's message, or cancelled). Its word overrides a failure the
service concluded without it (Ray's job API did not know the job for a while)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator

from kdray.errors import ConfigError, JobCancelled, SpecError, interrupted, user_error


class Tracker:
    """The record of job ``job_id`` in the store at ``store_path``; without a store (a job run
    by hand) every method does nothing."""

    def __init__(self, store_path: str | None, job_id: str | None):
        if store_path and not job_id:
            raise SpecError([("--job-id", "required with --store")])
        self.job_id = job_id
        self.store = None
        if store_path:
            from pathlib import Path

            from kdray.service.store import JobStore

            # The service made the store and the record before submitting: a driver that finds
            # neither runs for a service that cannot see it (another state directory, a store on
            # another node); it refuses rather than creating an empty database of its own.
            if not Path(store_path).is_file():
                raise ConfigError(f"--store {store_path}: no job store there; kdray serve passes the store it "
                                  "created (run the job without --store to run it by hand)")
            self.store = JobStore(store_path)
            rec = self.store.get(job_id)
            if rec is None:
                raise ConfigError(f"--job-id {job_id}: the job store {store_path} has no such job; kdray serve "
                                  "passes the id of the record it created (run the job without --store to run it "
                                  "by hand)")
            # Cancelled before this driver started: Ray answers a stop of a job it still has
            # PENDING but may start its entrypoint all the same (ray-project/ray#58353), and
            # the record's terminal state would hide a job training on.
            if rec["state"] in ("cancelling", "cancelled"):
                self.store.update(job_id, state="cancelled", driver=True)
                raise JobCancelled(f"job {job_id} was cancelled before its driver started; it does not run")

    def attach(self, reporter: Any) -> None:
        """The run starts: its events go to the record, which says running. Ray Jobs stops a
        job with SIGTERM: it unwinds like Ctrl-C, so the record says so."""
        if self.store is None:
            return
        store, job_id = self.store, self.job_id
        reporter.sinks.append(lambda event: store.append_event(job_id, event))
        store.update(job_id, state="running", driver=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    @contextmanager
    def following(self) -> Iterator["Tracker"]:
        """Around the whole run: the record ends succeeded, cancelled (stopped while
        cancelling), or failed with the user's error message (or the bug's). An interrupt that
        Python wrapped in another error (:func:`kdray.errors.interrupted`) is one, raised again
        as ``KeyboardInterrupt``."""
        try:
            yield self
        except (KeyboardInterrupt, SystemExit) as exc:
            if interrupted(exc):  # not another exit
                self._interrupted()
            raise
        except Exception as exc:
            if interrupted(exc):
                self._interrupted()
                raise KeyboardInterrupt from exc
            if self.store is not None:
                user = user_error(exc)
                error = str(user) if user is not None else f"kdray bug: {type(exc).__name__}: {exc}"
                self.store.update(self.job_id, state="failed", error=error, driver=True)
            raise
        if self.store is not None:
            self.store.update(self.job_id, state="succeeded", driver=True)

    def _interrupted(self) -> None:
        if self.store is not None:
            cancelled = (self.store.get(self.job_id) or {}).get("state") == "cancelling"
            self.store.update(self.job_id, state="cancelled" if cancelled else "failed",
                              error=None if cancelled else "interrupted", driver=True)
