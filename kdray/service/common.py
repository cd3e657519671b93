"""What the service's routers share: the refusal every 4xx is, the JSON a job record becomes,
and FastAPI dependencies for the shared state (``app.state``) and the bearer token."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from kdray.errors import KdrayError
from kdray.service.config import ServiceConfig
from kdray.service.ray_jobs import RayJobs
from kdray.service.store import JobStore

#: The longest job id the service looks up (ids are 12 hex digits).
MAX_JOB_ID = 64


class RequestError(KdrayError):
    """A request the service refuses: the HTTP status, the message, and extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    """``{"error": message, **extra}``; an extra ``retry_after`` (seconds) is also sent as the
    ``Retry-After`` header (a 429)."""
    headers = {"Retry-After": str(extra["retry_after"])} if "retry_after" in extra else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "state", "phase", "phase_detail", "round", "step", "total_steps", "percent",
            "eta_s", "created", "started", "finished", "updated", "error", "output_dir", "ray_job_id")
    return {k: rec.get(k) for k in keys}


def status(rec: dict[str, Any]) -> dict[str, Any]:
    return {**summary(rec), "phase_done": rec.get("phase_done"), "phase_total": rec.get("phase_total"),
            "metrics": rec.get("metrics"), "spec": rec.get("spec")}


# -- dependencies: the shared state ----------------------------------------------------------
#: The config each replica settled as it started (:func:`kdray.service.app.start_replica`: the
#: token read from its file on the head, its Ray's GCS address), by state_dir. Serve answers
#: requests with a copy of the app taken when the deployment was defined (``serve.ingress``
#: pickles it, Ray 2.60), not the app object the replica's ``__init__`` sees: what the replica
#: sets on one never reaches the other, and this process-wide record reaches both.
_SETTLED: dict[str, ServiceConfig] = {}


def settle_config(config: ServiceConfig) -> None:
    """Record ``config`` as what every copy of its app in this process answers with."""
    _SETTLED[config.state_dir] = config


def current_config(app: Any) -> ServiceConfig:
    """``app``'s config as its replica settled it (:func:`settle_config`), else as it was built."""
    config: ServiceConfig = app.state.config
    return _SETTLED.get(config.state_dir, config)


async def get_config(request: Request) -> ServiceConfig:
    return current_config(request.app)


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_ray(request: Request) -> RayJobs:
    return request.app.state.ray_jobs


# -- dependencies: the bearer token ----------------------------------------------------------
def _authorized(request: Request, token: str | None) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return (token is not None and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token.encode()))


def _need_token(request: Request, *, write: bool) -> None:
    config = current_config(request.app)
    if (write or config.auth_reads) and not _authorized(request, config.token):
        raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
                                "(the token kdray serve was started with)")


async def read_access(request: Request) -> None:
    """Reads need the token only with ``auth_reads``."""
    _need_token(request, write=False)


async def write_access(request: Request) -> None:
    """Submit and cancel always need the token."""
    _need_token(request, write=True)


def find_job(store: JobStore, job_id: str, wait_s: float = 30.0) -> dict[str, Any]:
    """The job's record, or a 404 (called in the handler's thread: the store blocks, up to
    ``wait_s`` on a locked file: :meth:`~kdray.service.store.JobStore.get`)."""
    rec = store.get(job_id, wait_s=wait_s) if len(job_id) <= MAX_JOB_ID else None
    if rec is None:
        raise RequestError(404, f"no job {job_id!r}")
    return rec
