"""Why a pool replica died: what a job says once Ray has restarted one as often as the spec
allows (``generation.max_replica_restarts``).

Ray Data tells the driver only that an actor died (``ActorDiedError``: its class, process id
and node). The cause is in the actor's log on that node: Ray's batch LLM processor ends its
engine stage's process on a fatal vLLM error after vLLM logged the error, so
:func:`replica_death_error` reads the end of that log when it is on the driver's node and
quotes the first error vLLM logged there (``RuntimeError: Unsupported CPU attention
configuration: head_dim=16 …``, ``torch.OutOfMemoryError: CUDA out of memory …``); for a
replica on another node it names the log and the ``ray logs`` command that prints it.
:func:`quiet_replica_deaths` keeps Ray Data's tracebacks of that death off the console (its
log file keeps them): the job's own message says what happened.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from kdray.errors import ModelError, exception_chain

#: Ray Data's class name of a pool's actors: ``MapWorker(MapBatches(<the callable class>))``.
_POOL_ACTOR = re.compile(r"class_name: MapWorker\(MapBatches\((\w+)\)\)")
#: The callable class of the vLLM engine stage of Ray's batch LLM processor.
ENGINE_UDF = "vLLMEngineStageUDF"
_FIELD = {name: re.compile(rf"\b{name}: ([\w.:-]+)") for name in ("pid", "ip")}
#: A line of vLLM's log holding an exception (``(EngineCore pid=…) ERROR … [core.py:…] X: …``).
_LOGGED_ERROR = re.compile(r"\bERROR\b.*?\] ((?:\w+\.)*\w*(?:Error|Exception)): (.+)$")
#: An error vLLM logs after the cause, saying only that the engine is gone.
_AFTERMATH = ("EngineDeadError", "EngineGenerateError")
#: The end of a replica's log that is searched (vLLM's logs of a long run are large).
LOG_TAIL_BYTES = 1 << 20
#: The longest quote of a logged error.
QUOTE_CHARS = 400


def replica_death_error(exc: BaseException, restarts: int, logs_dir: Path | None,
                        node_ip: str | None) -> ModelError | None:
    """The user's error behind ``exc`` when a pool replica died for good, else None.

    Args:
        exc: what a stage raised (its causes are searched, :func:`kdray.errors.exception_chain`).
        restarts: ``generation.max_replica_restarts``, as the job ran.
        logs_dir: the Ray session's ``logs`` directory on the driver's node, or None.
        node_ip: the driver node's IP address: a replica on that node has its log in ``logs_dir``.

    Returns:
        A :class:`ModelError` naming the pool's kind (a vLLM engine or kdray's class), the node,
        the cause vLLM logged where it can be read, the log, and the fixes.
    """
    for e in exception_chain(exc):
        actor = _pool_actor(e)
        if actor is None:
            continue
        text = str(e)
        found = {name: (m.group(1) if (m := pattern.search(text)) else None) for name, pattern in _FIELD.items()}
        udf = actor.group(1)
        what = "a vLLM engine of a generation pool" if udf == ENGINE_UDF else f"a pool replica ({udf})"
        ip, pid = found["ip"] or "an unknown node", found["pid"]
        local = bool(logs_dir and pid and ip == node_ip)
        logs = sorted(logs_dir.glob(f"worker-*-{pid}.*")) if local and logs_dir else []
        found_in = next(((log, cause) for log in logs if (cause := logged_error(log))), None)
        said = f": {found_in[1]}" if found_in else ""
        if found_in:
            where = f"its log: {found_in[0]}"
        elif logs:
            where = f"its logs: {logs_dir}/worker-*-{pid}.out and .err"
        else:
            where = (f"its log on {ip}: `ray logs actor --pid {pid} --node-ip {ip}` (--err for stderr), or "
                     f"worker-*-{pid}.out in the Ray session's logs directory there")
        after = ("and generation.max_replica_restarts is 0" if restarts == 0 else
                 f"after Ray restarted it {restarts} time(s), as generation.max_replica_restarts allows")
        return ModelError(
            f"{what} died on node {ip} {after}{said} ({where}). vLLM ends an engine on a fatal "
            "error: too little GPU memory (lower max_model_len, generation.batch_size or "
            "gpu_memory_utilization), a CUDA or NCCL fault, a model it cannot run (backend: hf runs any); "
            "a crash or a lost node ends any replica. Fix the cause, or raise "
            "generation.max_replica_restarts where nodes come and go, then run the job again (it resumes)")
    return None


def _pool_actor(exc: BaseException) -> re.Match[str] | None:
    """Where ``exc`` is Ray's error for a pool actor that died (``ActorDiedError``), the match
    of its class name (:data:`_POOL_ACTOR`), else None."""
    return _POOL_ACTOR.search(str(exc)) if type(exc).__name__ == "ActorDiedError" else None


class _HideReplicaDeaths(logging.Filter):
    """A console handler's filter dropping Ray Data's records about a pool actor's death: the
    error they log, or the one being handled while they are logged (Ray Data's "Exception
    occurred in Ray Data or Ray Core internal code ... open an issue" comes that way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or not any(_pool_actor(e) for e in exception_chain(exc))


def quiet_replica_deaths() -> None:
    """Keep Ray Data's tracebacks of a pool actor's death off the console: a filter on the
    ``ray.data`` logger's stream handlers; its log file (a plain handler) keeps every record.
    The job then says why the replica died (:func:`replica_death_error`) in a few lines, where Ray Data
    printed about a hundred, ending in a request to report a Ray bug. Once per process."""
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _HideReplicaDeaths) for f in handler.filters):
            handler.addFilter(_HideReplicaDeaths())


def logged_error(log: Path) -> str | None:
    """The first exception vLLM logged in the end of ``log`` (:data:`LOG_TAIL_BYTES`) that is
    not one saying the engine is gone (:data:`_AFTERMATH`), as ``Name: message``; None when
    there is none or the file cannot be read."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - LOG_TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = _LOGGED_ERROR.search(line)
        if m and not m.group(1).endswith(_AFTERMATH):
            said = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
            return said if len(said) <= QUOTE_CHARS else said[:QUOTE_CHARS] + "…"
    return None
