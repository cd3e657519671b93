"""Errors that kdray reports to users, and how to tell them from kdray's bugs.

There is one way to fail. Everything a user can cause (a bad spec, a dataset row, a teacher
records file, a model that does not load, a cluster or disk that is not there, a bad HTTP
body) raises a :class:`KdrayError` whose message names the file, row, field or node and says
how to fix it. The CLI prints that message without a traceback and exits 2; the HTTP service
answers 4xx with it. Every other exception is a kdray bug: a traceback and exit 1, or a 500.

:func:`utf8_fault` and :func:`bad_char` say where a user's file holds bytes that are not UTF-8
or characters that are not text (lone surrogates, NUL), for the readers' messages.

:func:`user_error` finds the user's error behind an exception that crossed Ray (which keeps
only the text of an error raised on a worker) or came from the disk or the cluster.

This module imports nothing of kdray, so every package may raise these errors.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
import sys


class KdrayError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class SpecError(KdrayError):
    """A job spec failed validation. ``errors`` holds every problem as (field path, message)."""

    #: The service's 422 for a spec says this as its ``error`` (its other 422s are a query's).
    HTTP_ERROR = "invalid JobSpec"

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid job spec{where}: {len(self.errors)} error(s)"]
        lines += [f"  {path}: {msg}" for path, msg in self.errors]
        super().__init__("\n".join(lines))


class DataError(KdrayError):
    """A dataset could not be read, or some of its rows are unusable."""


class RecordsError(KdrayError):
    """A teacher-signal records file (``OUTPUT_DIR/records/teacher-<mode>.parquet``) is missing,
    unreadable, or was written for other data or settings."""


class ModelError(KdrayError):
    """A model or tokenizer does not load, or the teacher's and student's vocabularies differ."""


class ClusterError(KdrayError):
    """The Ray cluster, one of its nodes, or the storage a job writes to failed: unreachable,
    out of memory or disk, read-only. Running again once it is fixed can help."""


class SharedStorageError(ClusterError):
    """A node of the Ray cluster does not see the job's ``output_dir`` as the driver does (not
    mounted there, another filesystem, read-only), or did not answer the check in time."""


class ToyWorldError(ClusterError):
    """A node's toy world (``KDRAY_CACHE_DIR/toy``) is not the one the job's driver resolved:
    another build, or none (which the node would otherwise build, training other models)."""


class ConfigError(KdrayError):
    """kdray's own settings are wrong: a command's options (``kdray repro``, ``kdray serve``), the
    Ray Serve application's args."""


class JobCancelled(KdrayError):
    """A job the service submitted was cancelled before its driver started (``kdray run
    --store``): the driver exits without running it."""


class OutputDirInUse(KdrayError):
    """Another job owns the ``output_dir``: a ``kdray run`` holds its lock file
    (:mod:`kdray.pipeline.lock`), or the service has an active job writing there (HTTP 409).
    ``owner`` names it (a service job id, or the holding process)."""

    def __init__(self, message: str, owner: str = ""):
        super().__init__(message)
        self.owner = owner


def node() -> str:
    """Where this process runs, for messages that must say where something failed: the host's
    name, and inside Ray (a Ray worker, or a connected driver) the Ray node's id and IP address,
    ``host (Ray node 5f3a..., 10.0.0.7)``: on a cluster several nodes may share a host name."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # never imported here: a process without Ray names its host
    try:
        if ray is not None and ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{host} (Ray node {ctx.get_node_id()}, {ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - a message's detail; the host name is still true
        pass
    return host


def first_line(exc: BaseException, *, typed: bool = True) -> str:
    """``Type: first line of the message``: enough of a library's error for a one-line message;
    without ``typed``, the line alone (torch's out-of-memory error, whose first line says it all)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if typed else lines[0]


def last_error_line(exc: BaseException) -> str:
    """``Type: message`` of an error whose text may be a traceback (a Ray worker's error, which
    ends with its exception's line): that last line, else :func:`first_line`; a line over 200
    characters cut after its first sentence, or at 200."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[-1] if len(lines) > 1 else first_line(exc)
    if len(line) > 200:
        end = line.find(". ", 0, 200)
        line = line[:end + 1] if end > 0 else line[:200]
    return line


# -- where a user's file holds bytes or characters that are not text ------------------------

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


def utf8_fault(raw: bytes, exc: UnicodeDecodeError) -> str:
    """Where the first byte of ``raw`` that is not UTF-8 is, for a message: ``line L, column C
    (byte offset B): byte 0xE9 is not UTF-8``, plus a hint when ``raw`` is UTF-16 or cut short.

    ``exc`` is the error of ``raw.decode("utf-8")``; lines and columns count from 1 (columns in
    characters), the byte offset from 0 at the start of ``raw``."""
    start = exc.start
    line = raw.count(b"\n", 0, start) + 1
    line_start = raw.rfind(b"\n", 0, start) + 1
    column = len(raw[line_start:start].decode("utf-8", "replace")) + 1
    text = f"line {line}, column {column} (byte offset {start}): byte 0x{raw[start]:02X} is not UTF-8"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text += " (the file is UTF-16)"
    elif exc.reason == "unexpected end of data" and exc.end >= len(raw):
        text += " (the file ends inside a character: it may be cut short)"
    return text


def bad_char(text: str) -> tuple[int, str] | None:
    """The first character of ``text`` that is not usable text, as (0-based index, what it is),
    or None: a lone surrogate U+D800–U+DFFF (a ``\\uXXXX`` escape without its pair, or a
    byte that was not UTF-8 decoded with ``surrogateescape``) or a NUL (U+0000)."""
    m = _BAD_CHAR.search(text)
    if m is None:
        return None
    code = ord(m.group())
    if code == 0:
        return m.start(), "a NUL character (U+0000)"
    if 0xDC80 <= code <= 0xDCFF:  # what surrogateescape makes of a byte that is not UTF-8
        return m.start(), f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8 (or a lone surrogate U+{code:04X})"
    return m.start(), f"a lone surrogate U+{code:04X} (half of a UTF-16 pair: invalid unicode)"


# -- the user's error behind an exception ----------------------------------------------------

#: Disk errors a user fixes (space, quota, permissions, a read-only mount).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
#: Ray's errors for a worker, object or node the cluster lost (by class name: no Ray import).
RAY_LOST = {"OutOfMemoryError", "NodeDiedError", "ObjectLostError"}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REMOTE = re.compile(r"^kdray\.errors\.(\w+): (.*)$")
_RAY_NODE = re.compile(r"\bip=([\w.:-]+?)[,)]")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): (.*)$")
#: Where Ray's batch LLM processor starts its vLLM engine (``ray.llm``'s engine stage).
_ENGINE_STAGE = "vllm_engine_stage.py"


def user_error(exc: BaseException) -> KdrayError | None:
    """The user's error behind ``exc``, or None when ``exc`` is a kdray bug.

    Looks at ``exc`` and its causes (``raise ... from``, Ray's ``cause``, Ray Train's
    ``worker_failures`` and ``controller_failure``; not an exception raised while handling
    another, which may be a bug of its own) for, in this order:

    * a :class:`KdrayError` object;
    * in one of Ray's errors, the traceback text of a ``KdrayError`` raised on a Ray worker (Ray
      Data passes only the text on): rebuilt with its class and message, plus the node it was
      raised on; or of a vLLM engine of Ray's batch LLM processor that did not start (the
      model, its ``max_model_len`` or the node's memory): :class:`ModelError`;
    * a disk error (no space, quota, read-only, permission denied): :class:`ClusterError`
      naming the file and the node;
    * Ray's out-of-memory, lost-node and lost-object errors: :class:`ClusterError`.
    """
    chain = exception_chain(exc)
    for e in chain:
        if isinstance(e, KdrayError) and not _from_ray(e):  # Ray's copy of one is found by its cause
            return e
    for e in chain:
        remote = (_remote_error(str(e)) or _engine_start_error(str(e))) if _from_ray(e) else None
        if remote is not None:
            return remote
    for e in chain:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            where = f"{e.filename}" if e.filename else "a file"
            return ClusterError(
                f"cannot write or read {where} on node {node()}: {e.strerror}; free disk space, fix the "
                "permissions, or point output_dir (and KDRAY_CACHE_DIR) at a writable disk with room, "
                "then run the job again (it resumes)")
        if _from_ray(e) and any(cls.__name__ in RAY_LOST for cls in type(e).__mro__):
            return ClusterError(
                f"Ray lost a worker of this job ({first_line(e)}); most often a node ran out of memory "
                "or left the cluster: give the job more memory (fewer generation.replicas, a smaller "
                "generation.batch_size or training.micro_batch_size), check the nodes with `ray status`, "
                "then run the job again (it resumes)")
    return None


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, a ``KeyboardInterrupt`` (Ctrl-C, or the SIGTERM
    with which Ray Jobs stops a driver, :meth:`kdray.service.tracking.Tracker.attach`), or is
    the ``SystemExit`` of SIGTERM's number that the handler every ``ray.init()`` call in a main
    thread installs raises (``sys.exit(signum)``; Ray Data's and the LLM processor's calls
    install it again after kdray's). Python wraps an interrupt raised inside a class's
    ``__set_name__`` (the signal came during an import, e.g. of Ray Data's operator
    dataclasses) in a ``RuntimeError`` whose cause it is."""
    return any(isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code == signal.SIGTERM)
               for e in exception_chain(exc))


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it wraps, outermost first: ``raise ... from`` causes, Ray's
    ``cause``, Ray Train's ``worker_failures`` and ``controller_failure`` (not an exception raised
    while handling another)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out) or len(out) > 50:
            continue
        out.append(e)
        inner = [getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            inner += list(failures.values())
        todo += [i for i in inner if isinstance(i, BaseException)]
    return out


def _remote_error(text: str) -> KdrayError | None:
    """The last ``kdray.errors.X: message`` of a worker's traceback text, rebuilt."""
    lines = _ANSI.sub("", text).splitlines()
    hits = [i for i, line in enumerate(lines) if _REMOTE.match(line)]
    if not hits:
        return None
    start = hits[-1]
    name, first = _REMOTE.match(lines[start]).groups()  # type: ignore[union-attr]
    message = [first]
    rest = lines[start + 1:]
    while rest and rest[0].strip() and not rest[0].startswith(("The above exception", "During handling")):
        message.append(rest.pop(0))
    if any(line.startswith("During handling") for line in rest[:3]):
        return None  # another exception was raised while handling it: that one is a bug
    nodes = [m.group(1) for line in lines[:start] for m in _RAY_NODE.finditer(line)]
    text = "\n".join(message) + (f" (raised on the Ray worker at {nodes[-1]})" if nodes else "")
    cls = globals().get(name)
    if cls in (DataError, RecordsError, ModelError, ClusterError, SharedStorageError, ToyWorldError, ConfigError):
        return cls(text)
    return KdrayError(text)


def _engine_start_error(text: str) -> ModelError | None:
    """A vLLM engine of Ray's batch LLM processor that failed in its constructor, from the Ray
    worker's traceback text: the engine's own last error and the node, as a :class:`ModelError`."""
    lines = _ANSI.sub("", text).splitlines()
    if not any(_ENGINE_STAGE in line and "in __init__" in line for line in lines):
        return None
    hits = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not hits:
        return None
    name, first = _EXCEPTION_LINE.match(lines[hits[-1]]).groups()  # type: ignore[union-attr]
    detail = [first] + [line.strip() for line in lines[hits[-1] + 1:hits[-1] + 3] if line.startswith(" ")]
    said = " ".join(part for part in detail if part)
    said = said if len(said) <= 400 else said[:400] + "…"
    nodes = [m.group(1) for line in lines for m in _RAY_NODE.finditer(line)]
    where = f" on the Ray worker at {nodes[-1]}" if nodes else ""
    return ModelError(
        f"vLLM could not start a generation pool's model{where} ({name.rsplit('.', 1)[-1]}: {said}); check "
        "that vLLM supports its architecture, that its max_model_len fits the model and the node's GPU memory "
        "(lower it, or generation.batch_size), or use backend: hf")
