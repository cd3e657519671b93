"""Is ``output_dir`` one storage for every node of the Ray cluster? Checked before any work.

On a cluster the trainers write checkpoints and the exported student under ``output_dir``,
the generation pool's actors write the committed datasets there, and the driver reads them
all back; so every node must mount the same storage at the same path. Nothing else notices
a node that does not: Ray Train only fails when a worker first persists a checkpoint, after
the whole generation and a training segment, and again on each of ``training.max_failures``
restarts (forever with -1). :func:`check_shared_storage` finds it in seconds instead.

The driver writes a marker file holding a random token under ``output_dir``; one task per
alive node, pinned there (hard node affinity) and reserving no CPU (so a busy node, or a head
that offers none, still runs it), reads the marker, compares the token and writes a reply
file next to it, which the driver then reads. Every alive node is checked, the head included:
Ray may place any task or actor of the job (zero-CPU ones too) on any node, and the job has no
say in which. Nodes that join later (an autoscaler's) are not checked.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kdray.errors import SharedStorageError, first_line

#: Prefix of the marker file (``<prefix><token>``) and its replies (``.<node id>`` appended).
MARKER_PREFIX = ".kdray-storage-check-"
#: How long the driver waits for every node's answer, in seconds.
TIMEOUT_S = 60.0
#: How long a marker or reply that is not there yet is looked for again, in seconds: an NFS
#: client may cache "no such file" for a directory it listed shortly before.
SETTLE_S = 5.0


@dataclass(frozen=True)
class NodeSeen:
    """A node that passed the check: its Ray node id, IP address and host name."""

    node_id: str
    ip: str
    hostname: str


def check_shared_storage(out: Path, *, timeout_s: float = TIMEOUT_S, settle_s: float = SETTLE_S) -> list[NodeSeen]:
    """Check that every alive node of the connected Ray cluster reads and writes ``out`` (the
    job's output directory, which must exist) as this driver does; Ray must be initialized.

    Costs one tiny task per node (on one machine: one task, well under a second once Ray's
    workers are up). The marker and the replies are removed afterwards, whatever the outcome.

    Returns:
        The nodes checked, one :class:`NodeSeen` each.

    Raises:
        SharedStorageError: a node cannot read the marker (``out`` is not mounted there, or is
            another filesystem), cannot write next to it (read-only), wrote a reply the driver
            does not see, failed the task, or did not run it within ``timeout_s`` seconds. The
            message names each such node (id, IP, host), ``out`` and the fix: mount the same
            shared filesystem at the same path on every node, or set ``output_dir`` to such a
            path.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = Path(out)
    token = secrets.token_hex(16)
    marker = out / f"{MARKER_PREFIX}{token}"
    marker.write_text(token, encoding="utf-8")
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        visit = ray.remote(num_cpus=0, max_retries=0)(_visit)
        refs = {
            visit.options(name="kdray-storage-check",
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote(str(marker), token, settle_s): node_id
            for node_id in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort: the error below names the node anyway
                pass
        problems: list[str] = []
        seen: list[NodeSeen] = []
        replies: dict[str, NodeSeen] = {}
        for ref in ready:
            node_id = refs[ref]
            try:
                answer = ray.get(ref)
            except Exception as exc:  # the task failed on the node, or the node went away
                if node_id not in _alive():
                    continue  # it left the cluster: nothing of the job can run there
                problems.append(f"{_where(nodes[node_id])} failed the check ({first_line(exc)})")
                continue
            node = NodeSeen(node_id, nodes[node_id].get("NodeManagerAddress", "?"), answer["hostname"])
            if answer["problem"]:
                problems.append(f"{_where(nodes[node_id], node.hostname)} {answer['problem']}")
            else:
                replies[answer["reply"]] = node
        for reply, node in replies.items():
            try:
                back = _read(Path(reply), settle_s)
            except OSError as exc:
                back = f"({exc.strerror})"
            if back == token:
                seen.append(node)
            else:
                problems.append(f"{_where(nodes[node.node_id], node.hostname)} wrote {Path(reply).name} next to "
                                "it, which this driver does not find there: that node writes to other storage at that path")
        for ref in pending:
            problems.append(f"{_where(nodes[refs[ref]])} did not run the check within {timeout_s:.0f} s (is it "
                            "overloaded, or leaving the cluster? see `ray status`)")
    finally:
        for path in out.glob(f"{marker.name}*"):
            path.unlink(missing_ok=True)
    if problems:
        raise SharedStorageError(_message(out, marker.name, problems))
    return seen


def _visit(marker: str, token: str, settle_s: float) -> dict[str, str | None]:
    """On one node: read the marker, compare its token, write the reply next to it. Returns the
    node's host name, the reply's path and what went wrong (None when nothing did)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    found = {"hostname": socket.gethostname(), "reply": None, "problem": None}
    try:
        text = _read(Path(marker), settle_s)
    except OSError as exc:
        found["problem"] = f"cannot read the marker there ({exc.strerror})"
        return found
    if text is None:
        found["problem"] = "does not see the marker: output_dir is not mounted there, or is another filesystem"
    elif text != token:
        found["problem"] = "sees another file at the marker's path: output_dir is another filesystem there"
    else:
        reply = f"{marker}.{node_id}"
        try:
            Path(reply).write_text(token, encoding="utf-8")
        except OSError as exc:
            found["problem"] = f"sees the marker but cannot write next to it ({exc.strerror}): output_dir is read-only there"
        else:
            found["reply"] = reply
    return found


def _read(path: Path, settle_s: float) -> str | None:
    """The text of ``path``, or None if it is still missing after ``settle_s`` seconds of
    looking again (other OS errors are raised)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                return None
            try:
                os.listdir(path.parent)  # makes an NFS client look the directory up afresh
            except OSError:
                pass
            time.sleep(0.25)


def _alive() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _where(node: dict, hostname: str | None = None) -> str:
    ip = node.get("NodeManagerAddress", "?")
    host = f", host {hostname}" if hostname else ""
    head = ", the head node" if "node:__internal_head__" in node.get("Resources", {}) else ""
    return f"node {node['NodeID']} ({ip}{host}{head})"


def _message(out: Path, marker: str, problems: list[str]) -> str:
    import ray

    here = f"node {ray.get_runtime_context().get_node_id()} ({socket.gethostname()})"
    lines = [f"output_dir {out} is not the same storage on every node of the Ray cluster: this driver, on "
             f"{here}, wrote the marker {marker} there, and"]
    lines += [f"  {p}" for p in problems]
    lines.append("The trainers and the generation pool write under output_dir and the driver reads it back, so "
                 "every node must see it: mount the same shared filesystem at the same path on every node (e.g. "
                 "/shared, see cluster/README.md), or set output_dir to a path on storage every node mounts.")
    return "\n".join(lines)
