"""Removing ended jobs from the service: ``DELETE /v1/jobs/{id}`` (``kdray delete``), and the
jobs ended more than ``keep_ended_days`` ago, which the reconciler removes in its rounds.

A service left running for weeks otherwise keeps every record and every progress event of
every job it ran: about 710 bytes per training step in the store (its ``events`` table), so a
100,000-step job adds some 70 MB, and Ray's job table keeps each job's info too. Deleting a
job removes what the service holds of it, in this order, so a delete cut short anywhere can
be done again:

1. Ray's record of the job (its info in Ray's job table: Ray's ``delete_job``), unless Ray no
   longer has it; a job Ray still runs is refused (409), whatever its record says;
2. the spec the service saved for its entrypoint and its copy of the driver's log
   (``STATE_DIR/jobs/ID``);
3. its record and all its events, in one transaction of the store (120,000 events took 0.36 s
   here; the jobs' drivers wait for it to append theirs, up to 30 s).

The job's output directory (its model, report, checkpoints, ``events.jsonl``) is the user's
and is never touched. SQLite reuses the deleted rows' pages for new ones, so the store's file
stops growing once deletions keep pace; it does not shrink (``VACUUM`` would rewrite it).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from kdray.service.common import RequestError
from kdray.service.config import ServiceConfig
from kdray.service.queue import spec_path
from kdray.service.ray_jobs import RayJobs, submission_id
from kdray.service.store import TERMINAL, JobStore

log = logging.getLogger("kdray.service")

#: The most expired jobs one round deletes (the next round goes on).
EXPIRE_BATCH = 20
#: Seconds between the reconciler's expiry rounds.
EXPIRE_EVERY_S = 60.0


def delete_job(config: ServiceConfig, store: JobStore, ray: RayJobs, rec: dict[str, Any]) -> None:
    """Remove the ended job ``rec`` (its store record) from Ray's job table and the service.

    Raises:
        RequestError: 409 when the job has not ended (cancel it first), or its record says it
            ended but Ray still runs it (a failure the service concluded while the driver
            lived, or a driver still exiting), or its state changed meanwhile.
        ClusterError: Ray's job API is unavailable: nothing was removed; retry later.
    """
    job_id, state = rec["id"], rec["state"]
    if state == "cancelling":
        raise RequestError(409, f"job {job_id} is being cancelled: delete it once it has stopped", state=state)
    if state not in TERMINAL:
        raise RequestError(409, f"job {job_id} has not ended ({state}): cancel it first (kdray cancel {job_id}), "
                                "then delete it", state=state)
    # A job cancelled while queued was never handed to Ray; one admitted may be there under its
    # submission id even when the submit's answer was lost.
    ray_id = rec.get("ray_job_id") or (submission_id(job_id) if rec.get("admitted") else None)
    if ray_id is not None:
        status = ray.status(ray_id)
        if status in ("PENDING", "RUNNING"):
            raise RequestError(409, f"job {job_id} is {state} here, but Ray still runs it (Ray job {ray_id} is "
                                    f"{status}): its driver is exiting, or alive after all and about to take its "
                                    "record back; delete it once Ray says it ended", state=state)
        if status is not None:
            ray.delete(ray_id)
    # The spec before the record: a delete cut short anywhere is done by repeating it.
    shutil.rmtree(spec_path(config, job_id).parent, ignore_errors=True)
    if not store.delete(job_id) and (now := store.get(job_id)) is not None:  # None: another delete won
        raise RequestError(409, f"job {job_id} is {now['state']} again (its driver took its record back) while "
                                "being deleted", state=now["state"])


def expire_ended(config: ServiceConfig, store: JobStore, ray: RayJobs, now: float | None = None) -> int:
    """Delete (:func:`delete_job`) up to :data:`EXPIRE_BATCH` jobs that ended more than
    ``config.keep_ended_days`` days before ``now``, the earliest ended first; returns how many.
    A job Ray still runs is left for a later round (and does not hold back the ones after it).

    Raises:
        ClusterError: Ray's job API is unavailable: the round ends; the reconciler logs it.
    """
    if config.keep_ended_days is None:
        return 0
    now = time.time() if now is None else now
    deleted, after = 0, None
    while deleted < EXPIRE_BATCH:
        page = store.ended_before(now - config.keep_ended_days * 86400.0, limit=EXPIRE_BATCH - deleted, after=after)
        if not page:
            break
        after = (page[-1]["finished"], page[-1]["id"])
        for rec in page:
            try:
                delete_job(config, store, ray, rec)
            except RequestError as exc:
                log.warning("job %s is past keep_ended_days but stays for now: %s", rec["id"], exc)
                continue
            deleted += 1
    if deleted:
        log.info("deleted %d job(s) that ended more than %g days ago (keep_ended_days)", deleted,
                 config.keep_ended_days)
    return deleted
