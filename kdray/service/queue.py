"""The service's queue: jobs wait as ``queued`` until one of ``max_running_jobs`` slots is free,
then are handed to Ray, oldest first.

Every driver of a kdray job runs on the head node (Ray Jobs starts entrypoints there), so the
number of jobs handed to Ray at once is what bounds the head's memory; Ray's own scheduler
then shares the workers between them. The queue is the store's ``queued`` records (it
survives a restart of the service); :meth:`~kdray.service.store.JobStore.admit` moves the next
ones to ``pending`` atomically, so a submit request and the reconciler admitting at the same
moment never hand one job to Ray twice.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from kdray.errors import ClusterError
from kdray.service.config import ServiceConfig
from kdray.service.driver_log import LOG_NAME
from kdray.service.ray_jobs import RayJobs, submission_id
from kdray.service.store import JobStore

log = logging.getLogger("kdray.service")


def spec_path(config: ServiceConfig, job_id: str) -> Path:
    """Where the service saves job ``job_id``'s spec at submit: ``STATE_DIR/jobs/ID/spec.yaml``."""
    return Path(config.state_dir) / "jobs" / job_id / "spec.yaml"


def entrypoint(config: ServiceConfig, job_id: str) -> str:
    """The shell command Ray Jobs runs for job ``job_id``: ``kdray run`` of the spec the service
    saved, in the service's working directory (relative data paths mean what validation saw),
    following the job's record in the store, on the service's own Ray (``config.ray_address``,
    when known), keeping a copy of its log beside the spec (:mod:`kdray.service.driver_log`)."""
    address = f" --address {shlex.quote(config.ray_address)}" if config.ray_address else ""
    spec = spec_path(config, job_id)
    return (f"cd {shlex.quote(config.workdir)} && {shlex.quote(config.python)} -m kdray.cli run "
            f"{shlex.quote(str(spec))} --store {shlex.quote(str(config.db_path))} --job-id {job_id}"
            f" --log-file {shlex.quote(str(spec.parent / LOG_NAME))}{address}")


def admit_queued(config: ServiceConfig, store: JobStore, ray: RayJobs, *, only: str | None = None) -> None:
    """Hand queued jobs to Ray while slots are free (``config.max_running_jobs``), oldest first,
    one at a time, each under its submission id (:func:`~kdray.service.ray_jobs.submission_id`).

    A job Ray refuses for now (unavailable, after the submit's own retries) goes back to the
    queue, keeping its place, and the round ends: the reconciler tries again on its next one.
    With ``only`` (a submit request waiting on that job), that job alone and only if it is next
    in line; a refusal then records it as failed (the service's conclusion, which its driver
    takes back if it starts after all) and the :class:`ClusterError` goes to the request (a 503).
    Any other error puts the job back in the queue and goes on up (a kdray bug).
    """
    while (rec := store.admit(config.max_running_jobs, only=only)) is not None:
        try:
            ray_id = ray.submit(entrypoint(config, rec["id"]), submission_id=submission_id(rec["id"]))
        except ClusterError as exc:
            if only is not None:
                store.update(rec["id"], state="failed", failed_by="service", error=str(exc))
                raise
            if store.requeue(rec["id"]):
                log.warning("job %s stays queued: %s", rec["id"], exc)
            return
        except BaseException:
            store.requeue(rec["id"])
            raise
        store.update(rec["id"], ray_job_id=ray_id)
        if only is not None:
            return
