"""The kdray HTTP service: a FastAPI app deployed on Ray Serve (``kdray serve``).

Every kdray job is a Ray job (Ray's Job Submission API) whose entrypoint is ``kdray run``:
Ray schedules, stops and keeps the logs of jobs; kdray does not. The running job writes its
progress and final state into the durable store (:mod:`kdray.service.store`); the service reads it.
A background thread reconciles records with Ray's view, so a job that died while nobody
watched (a killed process, a restarted cluster) shows its true state, and, with
``keep_ended_days``, removes jobs that ended longer ago (:mod:`kdray.service.retention`).

API under ``/v1`` (OpenAPI at ``/docs``): ``POST /jobs`` (JSON or YAML JobSpec,
``Idempotency-Key``), ``GET /jobs`` (filter, pages), ``GET /jobs/{id}``,
``GET /jobs/{id}/events`` (``?stream=true``: server-sent events), ``GET /jobs/{id}/logs``,
``POST /jobs/{id}/cancel``, ``DELETE /jobs/{id}``, and ``GET /healthz``. Submit, cancel and delete need the
bearer token; reads too with ``auth_reads``.

One router per resource (:mod:`.routes_jobs`, :mod:`.routes_report`, :mod:`.routes_events`,
:mod:`.routes_health`); they share the config, the store and Ray's job API through ``app.state`` and FastAPI
dependencies (:mod:`.common`). How a failure answers:

* anything a client sends wrong is a :class:`~kdray.errors.KdrayError`: a 4xx with the reason
  (422 with every field for a JobSpec), never a 500;
* Ray unavailable (:class:`~kdray.errors.ClusterError`): 503, since a retry can help;
* any other exception is a kdray bug: 500 saying so, and its traceback in the service's log.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdray.errors import ClusterError, ConfigError, KdrayError, SpecError
from kdray.service import routes_events, routes_health, routes_jobs, routes_report, routes_web
from kdray.service.common import RequestError, current_config, error_response, settle_config
from kdray.service.config import (DEFAULT_MAX_RUNNING_JOBS, DEFAULT_MAX_STREAMS, DEFAULT_RAY_TIMEOUT_S, ServiceConfig,
                                  confine_output_dir, read_token)
from kdray.service.queue import admit_queued
from kdray.service.routes_events import EventHub
from kdray.service.ray_jobs import RayJobs, submission_id
from kdray.service.retention import EXPIRE_EVERY_S, expire_ended
from kdray.service.store import JobStore

__all__ = ["ServiceConfig", "app_builder", "build_app", "confine_output_dir", "deployment", "read_token",
           "reconcile"]

RECONCILE_EVERY_S = 2.0
log = logging.getLogger("kdray.service")


def build_app(config: ServiceConfig) -> Any:
    """The FastAPI app (also usable without Serve, e.g. under uvicorn or a test client)."""
    # /docs and /redoc from the files fastapi-offline ships (under /static-offline-docs), not a CDN
    app = FastAPIOffline(title="kdray", version="1", description="Knowledge-distillation jobs on Ray.")
    app.state.config = config
    app.state.store = JobStore(config.db_path, lazy=True)  # opened where it is first used: the replica, on the head
    app.state.events = EventHub(app.state.store, config.max_streams)
    app.state.ray_jobs = RayJobs(config.dashboard_url, timeout_s=config.ray_timeout_s)
    app.state.reconcile = lambda: reconcile(app.state.store, app.state.ray_jobs)
    app.state.admit = lambda: admit_queued(current_config(app), app.state.store, app.state.ray_jobs)
    app.state.expire = _every(EXPIRE_EVERY_S, lambda: expire_ended(config, app.state.store, app.state.ray_jobs))
    _install_error_handlers(app)
    for module in (routes_health, routes_jobs, routes_report, routes_events, routes_web):
        app.include_router(module.router)
    return app


def _every(seconds: float, fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` for a loop that calls more often than it should run: a call runs it when
    ``seconds`` have passed since the last call that did (the first call does)."""
    last = [float("-inf")]

    def call() -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            fn()
    return call


def _install_error_handlers(app: FastAPI) -> None:
    """The user's errors answer 4xx (503: Ray unavailable); everything else is kdray's bug: 500."""

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Any:
        errors = [{"field": ".".join(str(x) for x in e["loc"][1:]) or str(e["loc"][0]), "message": e["msg"]}
                  for e in exc.errors()]
        return error_response(422, "invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(KdrayError)
    async def _user_error(request: Request, exc: KdrayError) -> Any:
        if isinstance(exc, RequestError):
            return error_response(exc.status, str(exc), **exc.extra)
        if isinstance(exc, SpecError):
            return error_response(422, SpecError.HTTP_ERROR, errors=[{"field": f, "message": m} for f, m in exc.errors])
        return error_response(503 if isinstance(exc, ClusterError) else 400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Any:
        log.error("kdray bug on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"kdray failed on this request: {type(exc).__name__}: {exc}. This is a bug in "
                                   "kdray, not in the request; the traceback is in the service's log")


#: Reconcile rounds in a row, and seconds since the first, in which Ray must not know a job
#: before the service records it as lost: one 404 is no evidence (a dashboard restarting
#: answers before it has loaded its job table).
LOST_AFTER_CHECKS, LOST_AFTER_S = 3, 30.0
#: How long a new record may wait for its submit before Ray's silence about it counts.
SUBMIT_GRACE_S = 60.0


def reconcile(store: JobStore, ray_jobs: RayJobs, now: float | None = None) -> None:
    """Bring unfinished records in line with Ray Jobs, on evidence only.

    A Ray job that ended without its record saying so (its driver killed) gets the state Ray
    reports. A job Ray does not know (404: its cluster restarted, or the submit never reached
    it) is failed only after :data:`LOST_AFTER_CHECKS` rounds in a row spanning
    :data:`LOST_AFTER_S`; a record without ``ray_job_id`` (the service died between recording
    and submitting) is looked up by its submission id
    (:func:`~kdray.service.ray_jobs.submission_id`) first. Such failures are the service's
    (``failed_by``): the job's driver, if it is alive after all, takes the record back (its next
    event or state). A cancelled job Ray runs is stopped again (the cancel may have come before
    Ray had it); one Ray does not know ends ``cancelled``.

    Raises:
        ClusterError: Ray's job API is unavailable (unreachable, 5xx): the round ends with no
            record changed; the caller logs it and tries again.
    """
    now = time.time() if now is None else now
    for rec in store.unfinished():
        ray_id = rec.get("ray_job_id") or submission_id(rec["id"])
        status = ray_jobs.status(ray_id)  # a ClusterError ends this round: no evidence either way
        if status is None:
            if not rec.get("ray_job_id") and now - (rec.get("admitted") or rec["created"]) < SUBMIT_GRACE_S:
                continue  # its submit may still be on its way
            marked = store.mark_missing(rec["id"], now)
            if marked is None:  # deleted since the round began
                continue
            checks, since = marked
            if checks < LOST_AFTER_CHECKS or now - since < LOST_AFTER_S:
                continue
            if rec["state"] == "cancelling":  # cancelled, and nothing of it runs
                store.update(rec["id"], state="cancelled")
                continue
            error = ("Ray no longer knows this job (its cluster restarted while it ran)" if rec.get("ray_job_id")
                     else f"the job was never handed to Ray (Ray has no job {ray_id})")
            store.update(rec["id"], state="failed", failed_by="service", error=error)
            continue
        if not rec.get("ray_job_id") or rec["lost_checks"]:  # found: by its submission id, or again
            store.update(rec["id"], ray_job_id=ray_id, lost_checks=0, lost_since=None)
        if rec["state"] == "cancelling" and status in ("PENDING", "RUNNING"):
            ray_jobs.stop(ray_id)  # cancelled before Ray had it (or its id was saved): stop it now
        elif status == "SUCCEEDED":
            store.update(rec["id"], state="succeeded")
        elif status == "STOPPED":
            store.update(rec["id"], state="cancelled")
        elif status == "FAILED" and (current := store.get(rec["id"])) is not None:  # None: deleted meanwhile
            # Ray's own word that the driver's process failed: final, as the driver's would be
            store.update(rec["id"], state="cancelled" if current["state"] == "cancelling" else "failed",
                         error=current.get("error") or f"the job's process failed; its log: kdray logs {rec['id']} "
                                                             f"(GET /v1/jobs/{rec['id']}/logs)")


#: Requests the replica takes at once besides its open event streams (each stream is one).
OTHER_REQUESTS = 100
#: Ray's resource of the head node; the replica asks for a sliver of it, so it runs on the head
#: (Ray's own state actors, e.g. Ray Train's, pin themselves the same way).
HEAD_RESOURCE = "node:__internal_head__"
#: How long a starting replica waits for the store's owner lock: a replica being replaced
#: gives it up as it stops.
OWNER_WAIT_S = 60.0


def own_store(config: ServiceConfig, wait_s: float = OWNER_WAIT_S) -> int:
    """Take the job store's owner lock, ``STATE_DIR/replica.lock``, for this process's life
    (the returned descriptor holds it): one replica serves a store (:mod:`kdray.pipeline.lock`).

    Raises:
        ConfigError: another process still holds it after ``wait_s`` seconds (a second replica,
            or a second service on the same state directory), naming the holder.
    """
    from kdray.pipeline.lock import LockHeld, acquire

    path = Path(config.state_dir) / "replica.lock"
    try:
        return acquire(path, wait_s=wait_s, role="kdray service replica")
    except LockHeld as held:
        raise ConfigError(
            f"the job store {config.db_path} already has a kdray service replica ({held.holder}); kdray runs one "
            "replica per store (num_replicas: 1; SQLite needs its users on one host): stop the other service, or "
            "give this one another state_dir") from None


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


#: The service's own log in its state dir (:func:`log_service_events`), and how it is rotated.
SERVICE_LOG, SERVICE_LOG_BYTES, SERVICE_LOG_BACKUPS = "service.log", 10 << 20, 3


def log_service_events(state_dir: str | Path | None) -> None:
    """Keep the service's own log (``kdray.service``: what it did of its own accord, such as
    the jobs it deleted past ``keep_ended_days``, its warnings, and a kdray bug's traceback)
    from INFO on in ``STATE_DIR/service.log`` (rotated at 10 MiB, 3 kept), which outlives
    the service's Ray sessions, and on the replica's standard error (its Ray worker log).
    Python showed only warnings without a handler, on that standard error alone, and nothing
    of a replica reaches ``kdray serve``'s console (its Ray runs with ``log_to_driver=False``).

    The file only with ``state_dir`` (the replica that owns the store: one writer; a file that
    cannot be opened is said on standard error and left out)."""
    from logging.handlers import RotatingFileHandler

    service = logging.getLogger("kdray.service")
    for handler in [h for h in service.handlers if getattr(h, "kdray_service", False)]:
        service.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s kdray service: %(message)s")
    handlers: list[logging.Handler] = [_Stderr()]
    if state_dir is not None:
        try:
            handlers.append(RotatingFileHandler(Path(state_dir) / SERVICE_LOG, maxBytes=SERVICE_LOG_BYTES,
                                                backupCount=SERVICE_LOG_BACKUPS, encoding="utf-8"))
        except OSError as exc:
            print(f"kdray service: no log file {Path(state_dir) / SERVICE_LOG}: {exc}", file=sys.stderr)
    for handler in handlers:
        handler.kdray_service = True  # type: ignore[attr-defined]
        handler.setFormatter(fmt)
        service.addHandler(handler)
    service.setLevel(logging.INFO)


def start_replica(app: Any, token_file: str | None = None, wait_s: float = OWNER_WAIT_S) -> int:
    """What the replica does as it starts, on the head: with ``token_file``, read the API token
    into the app's config; note its Ray's GCS address in the config, for the jobs' drivers
    (:attr:`ServiceConfig.ray_address`); open the store (create it, or add what an older kdray's
    lacks); take it (:func:`own_store`). Its log is shown from INFO on (:func:`log_service_events`).

    Raises:
        ConfigError: the store has another replica, or ``token_file`` is unreadable or empty.
    """
    log_service_events(None)  # stderr; the file once this replica owns the store
    config: ServiceConfig = app.state.config
    if token_file:
        token = read_token(token_file)
        if token is None:
            raise ConfigError(f"the API token file {token_file} is empty; its first line is the token")
        config = app.state.config = replace(config, token=token)
    import ray

    if config.ray_address is None and ray.is_initialized():
        config = app.state.config = replace(config, ray_address=ray.get_runtime_context().gcs_address)
    settle_config(config)  # for the copy of the app that Serve answers requests with, too
    app.state.store.open()  # created or brought up to date here, on the head
    owner = own_store(config, wait_s)
    log_service_events(config.state_dir)
    return owner


def deployment(config: ServiceConfig, token_file: str | None = None) -> Any:
    """The Ray Serve application: one replica on the head node (:data:`HEAD_RESOURCE`) with no
    CPU reservation (never starves jobs), taking as many requests at once as it keeps event
    streams, and :data:`OTHER_REQUESTS` more; it reads ``token_file`` when it starts
    (:func:`start_replica`), so only the head needs the file."""
    from ray import serve

    app = build_app(config)

    @serve.deployment(name="kdray", ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}},
                      max_ongoing_requests=config.max_streams + OTHER_REQUESTS)
    @serve.ingress(app)
    class KdrayService:
        def __init__(self) -> None:
            self._owner = start_replica(app, token_file)
            thread = threading.Thread(target=self._reconcile_forever, daemon=True)
            thread.start()

        def _reconcile_forever(self) -> None:
            while True:
                # records brought up to date, freed slots filled, then old ended jobs removed
                for what in ("reconcile", "admit", "expire"):
                    try:
                        getattr(app.state, what)()
                    except ClusterError as exc:  # Ray's job API is down for now; the next round may succeed
                        log.warning("%s: %s", what, exc)
                    except Exception:  # a kdray bug: logged, and reconciling goes on
                        log.exception("%s failed (a kdray bug)", what)
                time.sleep(RECONCILE_EVERY_S)

    return KdrayService.bind()


def _positive(key: str, value: Any, unit: str, none: bool = False) -> float | None:
    """A Serve application arg that must be a number of ``unit`` above 0 (or, with ``none``,
    the word none: None), or a :class:`ConfigError`."""
    text = str(value).strip()
    if none and text.lower() == "none":
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise ConfigError(f"kdray service arg {key} must be a number of {unit} above 0"
                          f"{', or none' if none else ''}; got {text!r}")
    return number


def _whole(key: str, value: Any, unit: str = "") -> int:
    """A Serve application arg that must be a whole number >= 1, or a :class:`ConfigError`."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"kdray service arg {key} must be a whole number {unit}>= 1; got {text!r}")
    return int(text)


def app_builder(args: dict[str, Any]) -> Any:
    """A Ray Serve application builder, for ``serve run kdray.service:app_builder key=value ...``
    or a KubeRay RayService (``serveConfigV2``: ``import_path: kdray.service:app_builder`` and
    ``args``). Keys: ``state_dir`` (required), ``output_root`` (default STATE_DIR/runs),
    ``dashboard_url`` (default http://127.0.0.1:8265, the head node's), ``auth_reads``
    ("true"/"false"), ``max_body_kb``, ``max_running_jobs`` (default
    :data:`~kdray.service.config.DEFAULT_MAX_RUNNING_JOBS`; ``none``: no limit), ``max_streams``
    (default :data:`~kdray.service.config.DEFAULT_MAX_STREAMS`), ``ray_timeout_s`` (default
    :data:`~kdray.service.config.DEFAULT_RAY_TIMEOUT_S`), ``keep_ended_days`` (default ``none``: every
    job is kept), ``workdir``, ``token_file``; the token otherwise
    comes from ``KDRAY_API_TOKEN``. Unknown keys are refused, so a typo cannot pass unseen."""
    known = {"state_dir", "output_root", "dashboard_url", "auth_reads", "max_body_kb", "workdir", "token_file",
             "max_running_jobs", "max_streams", "ray_timeout_s", "keep_ended_days"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown kdray service args {unknown}; known: {sorted(known)}")
    if not args.get("state_dir"):
        raise ConfigError("kdray service arg state_dir is required (where the job store lives)")
    # token_file is read by the replica, on the head (start_replica): this build task may run on
    # any node, where the file need not be.
    token_file = str(args["token_file"]) if args.get("token_file") else None
    token = None if token_file else read_token(None)
    if token is None and token_file is None:
        raise ConfigError("no API token: set KDRAY_API_TOKEN in the Serve runtime env, or pass token_file")
    state_dir = Path(str(args["state_dir"])).expanduser()
    output_root = Path(str(args.get("output_root") or state_dir / "runs")).expanduser()
    try:
        output_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"kdray service arg output_root: cannot create {output_root} ({exc.strerror}); give a "
                          "writable directory") from None
    flag = str(args.get("auth_reads", "false")).strip().lower()
    if flag not in ("true", "false"):
        raise ConfigError(f"kdray service arg auth_reads must be true or false; got {args['auth_reads']!r}")
    max_body_kb = _whole("max_body_kb", args.get("max_body_kb", 1024), "of KiB ")
    max_running = str(args.get("max_running_jobs", DEFAULT_MAX_RUNNING_JOBS)).strip().lower()
    if not (max_running.isdigit() and int(max_running) >= 1) and max_running != "none":
        raise ConfigError(f"kdray service arg max_running_jobs must be a whole number >= 1, or none for no limit; "
                          f"got {max_running!r}")
    config = ServiceConfig(
        state_dir=str(state_dir), output_root=str(output_root), token=token,
        dashboard_url=str(args.get("dashboard_url") or "http://127.0.0.1:8265"),
        auth_reads=flag == "true", max_body_bytes=max_body_kb * 1024,
        workdir=str(args.get("workdir") or os.getcwd()),
        max_running_jobs=None if max_running == "none" else int(max_running),
        max_streams=_whole("max_streams", args.get("max_streams", DEFAULT_MAX_STREAMS)),
        ray_timeout_s=_positive("ray_timeout_s", args.get("ray_timeout_s", DEFAULT_RAY_TIMEOUT_S), "seconds"),
        keep_ended_days=_positive("keep_ended_days", args.get("keep_ended_days", "none"), "days", none=True),
    )
    return deployment(config, token_file)
