"""A Ray cluster of four nodes on one machine, for tests of what only a real cluster gets wrong.

:class:`LocalCluster` starts a head node with no CPUs for tasks (as KubeRay's head) and three
worker nodes of one CPU each, each with ``ray start --block`` in its own process group, its own
``--temp-dir``, a small object store, its own ports and a custom resource naming it (``node_a``,
``node_b``, ``node_c``). One CPU a node is one training slot, as one GPU would be: Ray Train's
default placement (PACK) cannot put two training workers on one node, so a job's two workers
train across nodes (gloo over TCP), and the third node's CPU is left for the reads that stream
the data to them (:func:`kdray.stages.train.check_ingest_cpus`).
Every worker node runs in its own mount namespace (``unshare --mount --propagation private``,
which needs root): the paths listed for it are covered there by an empty tmpfs, so that node,
its raylet and every Ray worker process it starts see an empty directory where the others see
the shared one. That is what a node without the shared mount looks like, which
``ray.cluster_utils.Cluster`` (all nodes share one filesystem) cannot show.

:meth:`LocalCluster.kill_node` kills one worker node's whole session at once (its raylet, its
object store and every Ray worker on it: a machine lost, as a reclaimed spot instance is) and
:meth:`LocalCluster.add_node` starts a replacement that offers the same resources.

:meth:`LocalCluster.stop` kills the processes of the sessions it started, one per node (never
``ray stop``, which would stop every Ray on the machine), and returns any process still in
them or naming the cluster's temp dir on its command line: :func:`cluster_fixture` fails the
module when there is one. A worker node's tmpfs goes with the last process of its namespace.

Tests that use it are marked ``multinode``; start one cluster per test module (10–20 s on two
busy cores) with :func:`cluster_fixture`.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Each worker node's name, which is also the custom resource it offers (one unit).
WORKERS = ("node_a", "node_b", "node_c")
#: Logical CPUs of each worker node: one training worker's slot.
WORKER_CPUS = 1
#: Object store of each node: small, three nodes share the machine's /dev/shm.
OBJECT_STORE_BYTES = 200 * 1024**2
#: TCP ports the cluster may take: above the usual services, below the kernel's ephemeral range.
PORT_RANGE = (20000, 32000)
#: Ports of one node's worker processes.
WORKER_PORTS = 40


def ray_command() -> str:
    """The ``ray`` executable next to this Python (the test environment's), or on PATH."""
    import sys

    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (not root, no ``unshare``), or None."""
    if os.geteuid() != 0:
        return "multinode tests need root: each worker node runs in its own mount namespace (unshare --mount)"
    if shutil.which("unshare") is None:
        return "multinode tests need unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount fails here ({probe.stderr.strip()}); multinode tests need mount namespaces"
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Ports:
    """Free TCP ports from :data:`PORT_RANGE`, starting at a random place, never twice."""

    def __init__(self) -> None:
        self.next = random.randrange(*PORT_RANGE)
        self.taken: set[int] = set()

    def block(self, n: int) -> int:
        """The first of ``n`` consecutive free ports."""
        for _ in range(PORT_RANGE[1] - PORT_RANGE[0]):
            start = self.next
            if start + n > PORT_RANGE[1]:
                start = self.next = PORT_RANGE[0]
            self.next = start + n
            span = range(start, start + n)
            if not self.taken.intersection(span) and all(_port_free(p) for p in span):
                self.taken.update(span)
                return start
        raise RuntimeError(f"no {n} consecutive free ports in {PORT_RANGE}")

    def one(self) -> int:
        return self.block(1)


@dataclass
class Node:
    name: str
    temp_dir: Path
    private: list[Path] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    killed: bool = False  # by kill_node: its exit is expected


class LocalCluster:
    """A head and three worker nodes on this machine; see the module's docstring.

    Args:
        root: a new, empty directory of the cluster's own (temp dirs, logs); keep it short:
            Unix socket paths under it must fit in 107 bytes.
        private: for a worker node's name, the directories covered by an empty tmpfs on that
            node only (they must exist).
        env: extra environment of every node (``PYTHONPATH`` reaches their Ray workers).
    """

    def __init__(self, root: Path, private: Mapping[str, Sequence[Path]] | None = None,
                 env: Mapping[str, str] | None = None):
        self.root = Path(root)
        self.private = {name: [Path(p) for p in paths] for name, paths in (private or {}).items()}
        unknown = set(self.private) - set(WORKERS)
        if unknown:
            raise ValueError(f"private paths for unknown nodes {sorted(unknown)}; nodes are {WORKERS}")
        # One auth mode for this process's drivers and every node: Ray 2.60 caches the mode in a
        # process, and a driver whose mode differs from the nodes' loses its own objects
        # (OwnerDiedError) or is refused ("Missing authorization header"). A local ray.init()
        # turns token auth on (RAY_AUTH_MODE=token in os.environ) unless the mode is set, so the
        # cluster takes the mode already set, else token, as that local Ray would.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        self.env = {**os.environ, **(env or {})}
        self.ray = ray_command()
        self.ports = Ports()
        self.nodes: list[Node] = []
        self.address = ""

    # -- starting ------------------------------------------------------------------------------

    def _common_args(self, node: Node, num_cpus: int, resources: dict[str, float]) -> list[str]:
        node.temp_dir.mkdir(parents=True)
        workers = self.ports.block(WORKER_PORTS)
        return [
            self.ray, "start", "--block", "--disable-usage-stats", "--log-style=record",
            "--node-ip-address=127.0.0.1", f"--temp-dir={node.temp_dir}",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--node-manager-port={self.ports.one()}", f"--object-manager-port={self.ports.one()}",
            f"--metrics-export-port={self.ports.one()}", f"--runtime-env-agent-port={self.ports.one()}",
            f"--dashboard-agent-listen-port={self.ports.one()}",
            f"--dashboard-agent-grpc-port={self.ports.one()}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + WORKER_PORTS - 1}",
        ]

    def _spawn(self, node: Node, args: list[str], namespace: bool) -> None:
        if namespace:  # its own mount namespace, the private paths covered in it only
            mounts = "".join(f"mount -t tmpfs -o size=16m kdray-private {shlex.quote(str(p))}; "
                             for p in node.private)
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                    f'{mounts}exec "$@"', "sh", *args]
        log = open(self.root / f"{node.name}.log", "wb")
        # A session of its own (its id: the node's pid), whose processes stop() kills.
        node.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 120) -> str:
        """Start the nodes, connect this process to the cluster as a Ray driver (``ray.init``)
        and wait until all three nodes are alive; returns the GCS address.

        Raises:
            RuntimeError: a node exited or the cluster was not whole within ``timeout`` s
                (the nodes' logs are in ``root/<node>.log``); the nodes started are stopped.
        """
        import ray

        if ray.is_initialized():  # another fixture's Ray: shutting it down would break its tests
            raise RuntimeError("this process is already a Ray driver; the cluster must connect it")
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        if self.env["RAY_AUTH_MODE"].lower() == "token":  # every node reads ~/.ray/auth_token
            subprocess.run([self.ray, "get-auth-token", "--generate"], env=self.env, check=True,
                           capture_output=True)
        gcs = self.ports.one()
        head = Node("head", self.root / "h")
        self.nodes.append(head)
        args = self._common_args(head, 0, {"head": 1})
        args += ["--head", f"--port={gcs}", "--include-dashboard=false", f"--dashboard-port={self.ports.one()}",
                 f"--ray-client-server-port={self.ports.one()}"]
        self._spawn(head, args, namespace=False)
        self.address = f"127.0.0.1:{gcs}"
        while not _accepts(gcs):
            self._check_alive(deadline)
            time.sleep(0.2)
        for name in WORKERS:
            self._spawn_worker(name, self.root / name[-1])
        import ray

        ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        while len(self.alive_nodes()) < len(self.nodes):  # (no node killed yet)
            self._check_alive(deadline)
            time.sleep(0.2)
        return self.address

    def _spawn_worker(self, name: str, temp_dir: Path) -> Node:
        node = Node(name, temp_dir, self.private.get(name, []))
        self.nodes.append(node)
        self._spawn(node, self._common_args(node, WORKER_CPUS, {name: 1}) + [f"--address={self.address}"],
                    namespace=True)
        return node

    def kill_node(self, name: str) -> str:
        """Kill the alive worker node ``name`` as a lost machine: SIGKILL to every process of its
        session at once, with no drain and no notice to the GCS (which finds the node dead by
        its health checks). Returns the Ray node id it had."""
        node_id = self.node_id(name)
        self.reclaim(name)
        return node_id

    def reclaim(self, name: str) -> None:
        """End the worker node ``name`` as a cloud ends a preempted instance at its deadline:
        every process of its session, whether or not Ray has already stopped its raylet (a node
        drained for a preemption stops once its work is gone)."""
        (node,) = [n for n in self.nodes if n.name == name and not n.killed]
        node.killed = True
        _kill_sessions({node.proc.pid})
        node.proc.wait()

    def add_node(self, name: str) -> None:
        """Start a worker node offering what the worker node ``name`` offers (its CPU, its
        custom resource, its private paths), with a temp dir of its own, as an autoscaler
        replaces a lost machine; it joins in seconds (:meth:`node_id` finds it once alive)."""
        if name not in WORKERS:
            raise ValueError(f"unknown worker node {name!r}; nodes are {WORKERS}")
        count = sum(n.name == name for n in self.nodes)
        self._spawn_worker(name, self.root / f"{name[-1]}{count}")

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose session the process ``pid`` is in (a Ray worker process
        belongs to the node whose raylet started it), or None."""
        sessions = {node.proc.pid: node.name for node in self.nodes if node.proc is not None}
        try:
            return sessions.get(os.getsid(pid))
        except ProcessLookupError:
            return None

    def _check_alive(self, deadline: float) -> None:
        for node in self.nodes:
            if node.proc is not None and not node.killed and node.proc.poll() is not None:
                log = (self.root / f"{node.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"Ray node {node.name} exited with {node.proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster at {self.address} did not start in time; logs in {self.root}")

    def alive_nodes(self) -> list[dict]:
        """``ray.nodes()`` that are alive, seen by this process's driver."""
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def node_id(self, name: str) -> str:
        """The Ray node id of the node called ``name`` (``head`` or one of :data:`WORKERS`)."""
        found = [n["NodeID"] for n in self.alive_nodes() if name in n["Resources"]]
        if len(found) != 1:
            raise LookupError(f"{len(found)} alive nodes offer the resource {name!r}")
        return found[0]

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Disconnect this process's driver and kill every process of the sessions of the nodes
        this object started (a node's Ray workers have process groups of their own, in its
        session), until none is left. Returns the processes (``pid command``) that were still
        in those sessions or named ``root`` after that, each killed.

        SIGKILL at once: on SIGTERM a node drains for up to 30 s (its raylet ~10 s), and a test
        cluster has nothing worth a graceful end; its files go with ``root``."""
        import ray

        ray.shutdown()
        sessions = {node.proc.pid for node in self.nodes if node.proc is not None}
        _kill_sessions(sessions)
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait()
        left = {pid: cmd for pid, cmd in processes_naming(str(self.root))}
        left.update({pid: _cmdline(pid) for pid in session_members(sessions)})
        for pid in left:
            _kill(pid, signal.SIGKILL)
        return [f"{pid} {cmd[:160]}" for pid, cmd in sorted(left.items())]


def _kill_sessions(sessions: set[int], timeout: float = 10) -> None:
    """SIGKILL every process of ``sessions`` until none is left (a dying node may still fork),
    for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (members := session_members(sessions)) and time.monotonic() < deadline:
        for pid in members:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_members(sessions: set[int]) -> list[int]:
    """Live processes (zombies aside) whose session id is in ``sessions``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) in sessions:
            out.append(int(entry.name))
    return out


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_naming(text: str) -> list[tuple[int, str]]:
    """Processes whose command line contains ``text`` (this one excluded)."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid()]
    return [(pid, cmd) for pid in pids if text in (cmd := _cmdline(pid))]


def cluster_fixture(private: Mapping[str, Sequence[Path]] | None = None) -> Iterator[LocalCluster]:
    """Body of a module-scoped fixture: skip when the machine cannot run it, start the cluster,
    yield it, stop it and fail if any of its processes is left. ``private`` as in
    :class:`LocalCluster`; its directories are created."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="kdmn-", dir="/tmp"))  # short: Unix socket paths
    for paths in (private or {}).values():
        for p in paths:
            Path(p).mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root, private, env={"PYTHONPATH": _pythonpath()})
    cluster.start()
    try:
        yield cluster
    finally:
        left = cluster.stop()
        if not left:
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster were left running (now killed): {left}"


def _pythonpath() -> str:
    """This checkout first, so the nodes' workers import the kdray under test."""
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))
