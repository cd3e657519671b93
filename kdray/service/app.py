"""The kdray HTTP service: a FastAPI app deployed on Ray Serve (``kdray serve``).

Every kdray job is a Ray job (Ray's Job Submission API) whose entrypoint is ``kdray run``:
Ray schedules, stops and keeps the logs of jobs; kdray does not. The running job writes its
progress and final state into the durable store (:mod:`kdray.service.store`); the service reads it.
A background thread reconciles records with Ray's view, so a job that died while nobody
watched (a killed process, a restarted cluster) shows its true state.

API under ``/v1`` (OpenAPI at ``/docs``): ``POST /jobs`` (JSON or YAML JobSpec,
``Idempotency-Key``), ``GET /jobs`` (filter, pages), ``GET /jobs/{id}``,
``GET /jobs/{id}/events`` (``?stream=true``: server-sent events), ``GET /jobs/{id}/logs``, ``POST /jobs/{id}/cancel``, and
``GET /healthz``. Submit and cancel need the bearer token; reads too with ``auth_reads``.
Anything a client sends gets a 4xx with the reason, never a 500.
"""

from __future__ import annotations

import hmac
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdray.service.store import STATES, TERMINAL, JobStore

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
RECONCILE_EVERY_S = 2.0


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str                 # the store (kdray.db) and each job's submitted spec
    output_root: str               # every job's output_dir must resolve inside it
    token: str | None              # bearer token for submit and cancel (None: no token accepted)
    dashboard_url: str             # Ray's dashboard, where the Job Submission API lives
    auth_reads: bool = False       # reads need the token too
    max_body_bytes: int = 1 << 20
    python: str = sys.executable   # the interpreter that runs `kdray run` on the head node
    workdir: str = field(default_factory=os.getcwd)  # where jobs run (relative paths in specs are relative to it)

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "kdray.db"


def _error(status: int, message: str, **extra: Any) -> Any:
    return JSONResponse({"error": message, **extra}, status_code=status)


def confine_output_dir(output_dir: str, root: str) -> Path | None:
    """``output_dir`` resolved under ``root`` (relative paths are relative to it), or None
    when it escapes ``root`` (``..``, another absolute path, a symlink out)."""
    base = Path(root).resolve()
    raw = Path(output_dir).expanduser()
    path = (raw if raw.is_absolute() else base / raw).resolve()
    return path if path == base or base in path.parents else None


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "state", "phase", "phase_detail", "round", "step", "total_steps", "percent",
            "eta_s", "created", "started", "finished", "updated", "error", "output_dir", "ray_job_id")
    return {k: rec.get(k) for k in keys}


def _status(rec: dict[str, Any]) -> dict[str, Any]:
    return {**_summary(rec), "phase_done": rec.get("phase_done"), "phase_total": rec.get("phase_total"),
            "metrics": rec.get("metrics"), "spec": rec.get("spec")}


def build_app(config: ServiceConfig) -> Any:
    """The FastAPI app (also usable without Serve, e.g. under uvicorn or a test client)."""
    store = JobStore(config.db_path)
    app = FastAPI(title="kdray", version="1", description="Knowledge-distillation jobs on Ray.")
    app.state.store = store
    app.state.jobs_client = None

    def jobs_client() -> Any:
        if app.state.jobs_client is None:
            from ray.job_submission import JobSubmissionClient

            app.state.jobs_client = JobSubmissionClient(config.dashboard_url)
        return app.state.jobs_client

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Any:
        errors = [{"field": ".".join(str(x) for x in e["loc"][1:]) or str(e["loc"][0]), "message": e["msg"]}
                  for e in exc.errors()]
        return _error(422, "invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Any:  # kdray's bug, not the client's
        return _error(503, f"the service failed on this request: {type(exc).__name__}: {exc}")

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return (config.token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode(), config.token.encode()))

    def need_token(request: Request, *, write: bool) -> Any:
        if (write or config.auth_reads) and not authorized(request):
            return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
                               "(the token kdray serve was started with)")
        return None

    def lookup(request: Request, job_id: str, *, write: bool) -> tuple[dict[str, Any] | None, Any]:
        """(the job's record, None), or (None, the 401/404 response to send instead)."""
        denied = need_token(request, write=write)
        if denied:
            return None, denied
        rec = store.get(job_id) if len(job_id) <= 64 else None
        return (rec, None) if rec is not None else (None, _error(404, f"no job {job_id!r}"))

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "jobs": store.list(limit=1)[1]}

    @app.post("/v1/jobs", status_code=201, tags=["jobs"], summary="Submit a JobSpec (JSON or YAML)")
    async def submit(request: Request) -> Any:
        denied = need_token(request, write=True)
        if denied:
            return denied
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES + YAML_TYPES:
            return _error(415, f"content type {ctype or '(none)'!r} is not accepted; send the JobSpec as "
                               "application/json or application/yaml")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_body_bytes:
            return _error(413, f"request body over the {config.max_body_bytes}-byte limit")
        body = await request.body()
        if len(body) > config.max_body_bytes:
            return _error(413, f"request body over the {config.max_body_bytes}-byte limit")
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 200:
            return _error(422, "Idempotency-Key must be 1 to 200 characters")
        return _submit(body, ctype, key)

    def _submit(body: bytes, ctype: str, key: str | None) -> Any:
        from kdray.errors import SpecError
        from kdray.spec import dump_spec, parse_spec, parse_spec_text

        try:
            text = body.decode("utf-8")
            spec = (parse_spec(json.loads(text)) if ctype in JSON_TYPES else parse_spec_text(text))
        except UnicodeDecodeError:
            return _error(422, "the body is not UTF-8 text")
        except ValueError as exc:  # json.JSONDecodeError
            return _error(422, "invalid JobSpec", errors=[{"field": "(body)", "message": f"not valid JSON: {exc}"}])
        except SpecError as exc:
            return _error(422, "invalid JobSpec", errors=[{"field": f, "message": m} for f, m in exc.errors])
        except RecursionError:
            return _error(422, "the body nests too deeply")
        out = confine_output_dir(spec.output_dir, config.output_root)
        if out is None:
            return _error(422, "invalid JobSpec", errors=[{
                "field": "output_dir",
                "message": f"{spec.output_dir!r} is outside the service's output root {config.output_root}; "
                           "give a path relative to it"}])
        spec = spec.model_copy(update={"output_dir": str(out)})
        rec, created = store.create(name=spec.name, spec=spec.model_dump(mode="json"), output_dir=str(out),
                                    idempotency_key=key)
        if not created:
            return JSONResponse(_status(rec), status_code=200, headers={"Idempotent-Replayed": "true"})
        job_dir = Path(config.state_dir) / "jobs" / rec["id"]
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_path = job_dir / "spec.yaml"
        spec_path.write_text(dump_spec(spec), encoding="utf-8")
        # In the service's working directory: relative data paths mean what validation saw.
        entrypoint = (f"cd {shlex.quote(config.workdir)} && {shlex.quote(config.python)} -m kdray.cli run "
                      f"{shlex.quote(str(spec_path))} --store {shlex.quote(str(config.db_path))} --job-id {rec['id']}")
        try:
            ray_id = jobs_client().submit_job(entrypoint=entrypoint, submission_id=f"kdray-{rec['id']}")
        except Exception as exc:  # Ray is down or refused: the record says why
            store.update(rec["id"], state="failed", error=f"Ray did not accept the job: {exc}")
            return _error(503, f"Ray did not accept the job: {exc}", id=rec["id"])
        store.update(rec["id"], ray_job_id=ray_id)
        return JSONResponse(_status(store.get(rec["id"])), status_code=201)

    @app.get("/v1/jobs", tags=["jobs"], summary="List jobs, newest first")
    def list_jobs(request: Request, state: str | None = None, limit: int = 50, offset: int = 0) -> Any:
        denied = need_token(request, write=False)
        if denied:
            return denied
        errors = []
        if state is not None and state not in STATES:
            errors.append({"field": "state", "message": f"one of {', '.join(STATES)}"})
        if not 1 <= limit <= 500:
            errors.append({"field": "limit", "message": "between 1 and 500"})
        if offset < 0:
            errors.append({"field": "offset", "message": "0 or more"})
        if errors:
            return _error(422, "invalid query", errors=errors)
        records, total = store.list(state=state, limit=limit, offset=offset)
        return {"jobs": [_summary(r) for r in records], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state, phase, progress and latest metrics")
    def status(request: Request, job_id: str) -> Any:
        rec, refused = lookup(request, job_id, write=False)
        return refused or _status(rec)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"],
             summary="A job's progress history (JSON page, or a server-sent event stream with stream=true)")
    def events(request: Request, job_id: str, after: int = 0, limit: int = 1000, stream: bool = False) -> Any:
        _, refused = lookup(request, job_id, write=False)
        if refused:
            return refused
        if after < 0 or not 1 <= limit <= 10000:
            return _error(422, "invalid query", errors=[{"field": "after/limit", "message": "after >= 0, 1 <= limit <= 10000"}])
        if stream:  # EventSource clients resume with Last-Event-ID
            last = request.headers.get("last-event-id", "")
            start = int(last) if last.isdigit() else after
            return StreamingResponse(_event_stream(store, job_id, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return {"events": store.events(job_id, after=after, limit=limit)}

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], summary="The job's driver log (from Ray Jobs)")
    def logs(request: Request, job_id: str) -> Any:
        rec, refused = lookup(request, job_id, write=False)
        if refused:
            return refused
        if not rec.get("ray_job_id"):
            return PlainTextResponse("")
        try:
            return PlainTextResponse(jobs_client().get_job_logs(rec["ray_job_id"]))
        except Exception as exc:
            return _error(503, f"Ray has no logs for this job now: {exc}")

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, tags=["jobs"], summary="Stop a job")
    def cancel(request: Request, job_id: str) -> Any:
        rec, refused = lookup(request, job_id, write=True)
        if refused:
            return refused
        if rec["state"] in TERMINAL:
            return _error(409, f"job {job_id} already ended ({rec['state']})", state=rec["state"])
        store.update(job_id, state="cancelling")
        if rec.get("ray_job_id"):
            try:
                jobs_client().stop_job(rec["ray_job_id"])
            except Exception as exc:
                return _error(503, f"Ray could not stop the job: {exc}")
        return _status(store.get(job_id))

    app.state.reconcile = lambda: reconcile(store, jobs_client)
    return app


def _event_stream(store: JobStore, job_id: str, after: int, poll_s: float = 0.5) -> Any:
    """Server-sent events: every event after ``after`` as it is stored (``id`` = its seq,
    ``event`` = its kind), then one ``end`` event with the final state once the job ended."""
    seen = after
    while True:
        batch = store.events(job_id, after=seen, limit=500)
        for event in batch:
            seen = event["seq"]
            yield f"id: {seen}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
        if not batch:
            rec = store.get(job_id)
            if rec is None or rec["state"] in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'state': rec['state'] if rec else None})}\n\n"
                return
            time.sleep(poll_s)


def reconcile(store: JobStore, jobs_client: Any) -> None:
    """Bring unfinished records in line with Ray Jobs: a Ray job that ended without its record
    saying so (killed, cluster restarted) gets the state Ray knows."""
    for state in ("pending", "running", "cancelling"):
        records, _ = store.list(state=state, limit=500)
        for rec in records:
            ray_id = rec.get("ray_job_id")
            if not ray_id:
                if time.time() - rec["created"] > 60:
                    store.update(rec["id"], state="failed", error="the job was never handed to Ray")
                continue
            try:
                status = str(jobs_client().get_job_status(ray_id)).rsplit(".", 1)[-1]
            except Exception:
                store.update(rec["id"], state="failed",
                             error="Ray no longer knows this job (its cluster restarted while it ran)")
                continue
            if status == "SUCCEEDED":
                store.update(rec["id"], state="succeeded")
            elif status == "STOPPED":
                store.update(rec["id"], state="cancelled")
            elif status == "FAILED":
                current = store.get(rec["id"])
                store.update(rec["id"], state="cancelled" if current["state"] == "cancelling" else "failed",
                             error=current.get("error") or "the job's process failed; see GET /v1/jobs/{id}/logs")


def deployment(config: ServiceConfig) -> Any:
    """The Ray Serve application: one replica with no CPU reservation (never starves jobs)."""
    from ray import serve

    app = build_app(config)

    @serve.deployment(name="kdray", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
    @serve.ingress(app)
    class KdrayService:
        def __init__(self) -> None:
            thread = threading.Thread(target=self._reconcile_forever, daemon=True)
            thread.start()

        def _reconcile_forever(self) -> None:
            while True:
                try:
                    app.state.reconcile()
                except Exception as exc:  # keep reconciling; the next round may succeed
                    print(f"kdray: reconcile failed: {exc}", file=sys.stderr)
                time.sleep(RECONCILE_EVERY_S)

    return KdrayService.bind()


def read_token(token_file: str | None) -> str | None:
    """The bearer token: ``KDRAY_API_TOKEN`` or the first line of ``token_file``."""
    if token_file:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    else:
        token = os.environ.get("KDRAY_API_TOKEN", "").strip()
    return token or None


def app_builder(args: dict[str, Any]) -> Any:
    """A Ray Serve application builder, for ``serve run kdray.service:app_builder key=value ...``
    or a KubeRay RayService (``serveConfigV2``: ``import_path: kdray.service:app_builder`` and
    ``args``). Keys: ``state_dir`` (required), ``output_root`` (default STATE_DIR/runs),
    ``dashboard_url`` (default http://127.0.0.1:8265, the head node's), ``auth_reads``
    ("true"/"false"), ``max_body_kb``, ``workdir``, ``token_file``; the token otherwise
    comes from ``KDRAY_API_TOKEN``. Unknown keys are refused, so a typo cannot pass unseen."""
    known = {"state_dir", "output_root", "dashboard_url", "auth_reads", "max_body_kb", "workdir", "token_file"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown kdray service args {unknown}; known: {sorted(known)}")
    if not args.get("state_dir"):
        raise ValueError("kdray service arg state_dir is required (where the job store lives)")
    token = read_token(args.get("token_file"))
    if token is None:
        raise ValueError("no API token: set KDRAY_API_TOKEN in the Serve runtime env, or pass token_file")
    state_dir = Path(str(args["state_dir"])).expanduser()
    output_root = Path(str(args.get("output_root") or state_dir / "runs")).expanduser()
    output_root.mkdir(parents=True, exist_ok=True)
    flag = str(args.get("auth_reads", "false")).strip().lower()
    if flag not in ("true", "false"):
        raise ValueError(f"kdray service arg auth_reads must be true or false; got {args['auth_reads']!r}")
    config = ServiceConfig(
        state_dir=str(state_dir), output_root=str(output_root), token=token,
        dashboard_url=str(args.get("dashboard_url") or "http://127.0.0.1:8265"),
        auth_reads=flag == "true", max_body_bytes=int(args.get("max_body_kb", 1024)) * 1024,
        workdir=str(args.get("workdir") or os.getcwd()),
    )
    return deployment(config)
