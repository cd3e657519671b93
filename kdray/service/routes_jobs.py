"""``/v1/jobs``: submit a JobSpec, list jobs, a job's status, its driver log, cancel it, delete it.

A body that is not a JobSpec is a :class:`~kdray.errors.SpecError` (422, every field's
problem); the other refusals are :class:`~kdray.service.common.RequestError` with their status.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from kdray.errors import ClusterError, OutputDirInUse, SpecError, utf8_fault
from kdray.pipeline.state import earlier_run_differences, spec_differences
from kdray.service.common import (RequestError, find_job, get_config, get_ray, get_store, read_access,
                                  status, summary, write_access)
from kdray.service.config import ServiceConfig, confine_output_dir
from kdray.service.driver_log import kept_log
from kdray.service.queue import admit_queued, spec_path
from kdray.service.ray_jobs import RayJobs, submission_id
from kdray.service.retention import delete_job
from kdray.service.store import STATES, TERMINAL, JobStore

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: How long a status read on the replica's event loop waits for a locked store before it
#: leaves the loop for a pool thread (:func:`job_status`).
INLINE_WAIT_S = 0.05


# -- submit ----------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> tuple[bytes, str]:
    """(the body, its content type), or a 415 / 413 refusal."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES + YAML_TYPES:
        raise RequestError(415, f"content type {ctype or '(none)'!r} is not accepted; send the JobSpec as "
                                "application/json or application/yaml")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body over the {limit}-byte limit")
    body = await request.body()
    if len(body) > limit:
        raise RequestError(413, f"request body over the {limit}-byte limit")
    return body, ctype


def parse_body(body: bytes, ctype: str, output_root: str, workdir: str | None = None) -> Any:
    """The JobSpec in a request body, its output_dir confined to ``output_root`` and its relative
    model and data paths taken from ``workdir`` (where its driver runs), or a
    :class:`SpecError` naming each problem (the body counts as the field ``(body)``)."""
    from kdray.spec import parse_spec, parse_spec_text

    try:
        text = body.decode("utf-8")
        spec = (parse_spec(json.loads(text), base_dir=workdir) if ctype in JSON_TYPES
                else parse_spec_text(text, base_dir=workdir))
    except UnicodeDecodeError as exc:
        raise SpecError([("(body)", f"the body is not UTF-8 text: {utf8_fault(body, exc)}")]) from None
    except RecursionError:
        raise SpecError([("(body)", "the body nests too deeply")]) from None
    except SpecError:
        raise
    except ValueError as exc:  # json.JSONDecodeError
        raise SpecError([("(body)", f"not valid JSON: {exc}")]) from None
    out = confine_output_dir(spec.output_dir, output_root)
    if out is None:
        raise SpecError([("output_dir", f"{spec.output_dir!r} is outside the service's output root "
                                        f"{output_root}; give a path relative to it")])
    return spec.model_copy(update={"output_dir": str(out)})


def _start(spec: Any, key: str | None, config: ServiceConfig, store: JobStore, ray: RayJobs) -> Any:
    """Record the job in the queue and, when a slot is free and no job waits before it, hand it
    to Ray (:func:`~kdray.service.queue.admit_queued`), or replay an idempotent retry. 201 with
    the job's status (``queued`` while it waits: the reconciler admits it within a round)."""
    from kdray.spec import dump_spec

    def save_spec(job_id: str) -> None:  # before the record exists for admission: its entrypoint reads it
        # After the store's checks (an idempotent retry, a job still writing there), before the
        # record is committed: what the job's driver would refuse at its start is refused here.
        earlier = earlier_run_differences(Path(spec.output_dir), spec.model_dump(mode="json"))
        if earlier:
            raise RequestError(409, f"output_dir {spec.output_dir} holds an earlier run of a job with a different "
                                    f"spec (differs in: {', '.join(earlier[:8])}{', ...' if len(earlier) > 8 else ''}), "
                                    "which the job would refuse to resume: give it another output_dir, or remove "
                                    "that one to start over", output_dir=spec.output_dir)
        path = spec_path(config, job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_spec(spec), encoding="utf-8")

    try:
        rec, created = store.create(name=spec.name, spec=spec.model_dump(mode="json"), output_dir=spec.output_dir,
                                    idempotency_key=key, on_create=save_spec)
    except OutputDirInUse as exc:
        raise RequestError(409, str(exc), owner=exc.owner) from None
    if not created:
        differing = spec_differences(rec["spec"], spec.model_dump(mode="json"))
        if differing:  # a new submission under an old key: it would silently not run
            raise RequestError(422, f"Idempotency-Key {key!r} was used by job {rec['id']} for another JobSpec "
                                    f"(differs in: {', '.join(differing[:8])}{', ...' if len(differing) > 8 else ''}); "
                                    "a key stands for one submission: give this one a new key", id=rec["id"])
        return JSONResponse(job_status_of(store, rec), status_code=200, headers={"Idempotent-Replayed": "true"})
    try:
        admit_queued(config, store, ray, only=rec["id"])  # if it is next in line; else the reconciler's round
    except ClusterError as exc:  # Ray is down: the record says why; a new submit can succeed
        raise RequestError(503, f"{exc} (job {rec['id']} is recorded as failed; submit again"
                                f"{' with a new Idempotency-Key' if key else ''})", id=rec["id"]) from None
    return JSONResponse(job_status_of(store, store.get(rec["id"])), status_code=201)


def job_status_of(store: JobStore, rec: dict[str, Any]) -> dict[str, Any]:
    """:func:`~kdray.service.common.status` with, for a queued job, its place in the queue (one
    more read for queued jobs only: a status read is what every page and client polls)."""
    position = store.queue_position(rec["id"]) if rec["state"] == "queued" else None
    return {**status(rec), "queue_position": position}


@router.post("", status_code=201, summary="Submit a JobSpec (JSON or YAML)", dependencies=[Depends(write_access)])
async def submit(request: Request, config: ServiceConfig = Depends(get_config), store: JobStore = Depends(get_store),
                 ray: RayJobs = Depends(get_ray)) -> Any:
    body, ctype = await _read_body(request, config.max_body_bytes)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 200:
        raise RequestError(422, "Idempotency-Key must be 1 to 200 characters")
    # Off the event loop: validation reads the spec's files, the store and Ray's job API block.
    spec = await run_in_threadpool(parse_body, body, ctype, config.output_root, config.workdir)
    return await run_in_threadpool(_start, spec, key, config, store, ray)


# -- read ------------------------------------------------------------------------------------
@router.get("", summary="List jobs, newest first", dependencies=[Depends(read_access)])
def list_jobs(state: str | None = None, limit: int = 50, offset: int = 0,
              store: JobStore = Depends(get_store)) -> Any:
    errors = []
    if state is not None and state not in STATES:
        errors.append({"field": "state", "message": f"one of {', '.join(STATES)}"})
    if not 1 <= limit <= 500:
        errors.append({"field": "limit", "message": "between 1 and 500"})
    if offset < 0:
        errors.append({"field": "offset", "message": "0 or more"})
    if errors:
        raise RequestError(422, "invalid query", errors=errors)
    records, total = store.list(state=state, limit=limit, offset=offset)
    return {"jobs": [summary(r) for r in records], "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", summary="A job's state, phase, progress and latest metrics",
            dependencies=[Depends(read_access)])
async def job_status(job_id: str, store: JobStore = Depends(get_store)) -> Any:
    # On the event loop, not the thread pool: the read of one row takes well under a
    # millisecond, and on a busy head the hop to a pool thread and back was most of a status
    # read's time (docs/service.md, "Latency"). A store locked past INLINE_WAIT_S is read again
    # from a pool thread, so the loop never waits on it; so is a queued job's place in line.
    try:
        rec = find_job(store, job_id, wait_s=INLINE_WAIT_S)
    except sqlite3.OperationalError:
        rec = await run_in_threadpool(find_job, store, job_id)
    if rec["state"] == "queued":
        return await run_in_threadpool(job_status_of, store, rec)
    return job_status_of(store, rec)


@router.get("/{job_id}/logs", summary="The job's driver log (from Ray Jobs, or the service's copy)",
            dependencies=[Depends(read_access)])
def logs(job_id: str, store: JobStore = Depends(get_store), ray: RayJobs = Depends(get_ray),
         config: ServiceConfig = Depends(get_config)) -> Any:
    """Ray's log of the job's driver while Ray has the job, else the copy the service kept
    (:mod:`kdray.service.driver_log`), also while Ray cannot be asked; a 404 when neither is
    there, a 503 when Ray cannot be asked and there is no copy."""
    rec = find_job(store, job_id)
    kept = lambda: kept_log(spec_path(config, job_id).parent)  # noqa: E731
    if not rec.get("ray_job_id"):  # not handed to Ray, or the service stopped before it noted Ray's id
        return PlainTextResponse(kept() or "")
    try:
        text = ray.logs(rec["ray_job_id"])
    except ClusterError:
        if (text := kept()) is None:
            raise  # a 503
    if text is None and (text := kept()) is None:
        raise RequestError(404, f"Ray no longer has the log of job {job_id} (its cluster restarted since it ran), "
                                "and the service kept no copy of it (an older kdray ran it)")
    return PlainTextResponse(text)


# -- cancel ----------------------------------------------------------------------------------
@router.post("/{job_id}/cancel", status_code=202, summary="Stop a job", dependencies=[Depends(write_access)])
def cancel(job_id: str, store: JobStore = Depends(get_store), ray: RayJobs = Depends(get_ray)) -> Any:
    rec = find_job(store, job_id)
    if rec["state"] in TERMINAL:
        raise RequestError(409, f"job {job_id} already ended ({rec['state']})", state=rec["state"])
    if store.cancel_queued(job_id):  # still waiting, never handed to Ray: nothing of it runs
        return job_status_of(store, store.get(job_id))
    store.update(job_id, state="cancelling")
    # A record without its Ray id yet (a submit in flight): stop it by its submission id; if Ray
    # does not have it yet, the reconciler stops it once it does.
    if ray.stop(rec.get("ray_job_id") or submission_id(job_id)) is None and rec.get("ray_job_id"):
        store.update(job_id, state="cancelled")  # Ray no longer has it: nothing runs
    return job_status_of(store, store.get(job_id))


# -- delete ----------------------------------------------------------------------------------
@router.delete("/{job_id}", summary="Remove an ended job from the service (its output directory stays)",
               dependencies=[Depends(write_access)])
def delete(job_id: str, config: ServiceConfig = Depends(get_config), store: JobStore = Depends(get_store),
           ray: RayJobs = Depends(get_ray)) -> Any:
    rec = find_job(store, job_id)
    delete_job(config, store, ray, rec)  # 409 unless it ended; 503 while Ray is unavailable
    # ran: whether its driver ever started, so wrote to output_dir (which may be another job's)
    return {"id": job_id, "deleted": True, "output_dir": rec["output_dir"], "ran": rec.get("started") is not None}
