"""The service's settings, and where it lets a job write."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kdray.errors import ConfigError


#: Jobs the service hands to Ray at once (``kdray serve --max-running-jobs``): every job's
#: driver runs on the head node, so this bounds what the head holds; later jobs wait queued.
DEFAULT_MAX_RUNNING_JOBS = 4
#: Seconds the service waits for Ray's job API (``kdray serve --ray-timeout``): to connect (at
#: most 10), and for each read of an answer; past it the call is a ClusterError (503).
DEFAULT_RAY_TIMEOUT_S = 30.0
#: Server-sent event streams open at once (``kdray serve --max-streams``): each costs the
#: replica a store read per second; the replica takes this many requests more besides them.
DEFAULT_MAX_STREAMS = 256


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str                 # the store (kdray.db) and each job's submitted spec
    output_root: str               # every job's output_dir must resolve inside it
    token: str | None = field(repr=False)  # bearer token for submit, cancel and delete (None: none accepted); never in a repr
    dashboard_url: str             # Ray's dashboard, where the Job Submission API lives
    auth_reads: bool = False       # reads need the token too
    max_running_jobs: int | None = DEFAULT_MAX_RUNNING_JOBS  # jobs handed to Ray at once; the rest queue (None: no limit)
    max_streams: int = DEFAULT_MAX_STREAMS  # event streams open at once; one more gets 429
    max_body_bytes: int = 1 << 20
    ray_timeout_s: float = DEFAULT_RAY_TIMEOUT_S  # a call of Ray's job API that gets no answer within it fails (503)
    python: str = sys.executable   # the interpreter that runs `kdray run` on the head node
    workdir: str = field(default_factory=os.getcwd)  # where jobs run (relative paths in specs are relative to it)
    keep_ended_days: float | None = None  # jobs ended longer ago are deleted (kdray.service.retention); None: kept
    # The GCS address (host:port) of the service's Ray, which every job's driver joins (set by
    # the replica as it starts: kdray.service.app.start_replica). Ray's job supervisor gives a
    # driver the address of whichever Ray it finds on the head (the last `ray start`'s, else any
    # GCS process on the host), which on a host with two Rays may be the other one.
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.max_running_jobs is not None and self.max_running_jobs < 1:
            raise ConfigError(f"max_running_jobs must be 1 or more (or unset for no limit); got {self.max_running_jobs}")
        if self.max_streams < 1:
            raise ConfigError(f"max_streams must be 1 or more; got {self.max_streams}")
        if self.keep_ended_days is not None and not 0 < self.keep_ended_days < float("inf"):
            raise ConfigError("keep_ended_days (kdray serve --keep-ended-days) must be a number of days above 0, or "
                              f"unset to keep every job; got {self.keep_ended_days:g}")
        if not 0 < self.ray_timeout_s < float("inf"):
            raise ConfigError(f"ray_timeout_s must be a number of seconds above 0; got {self.ray_timeout_s}")

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "kdray.db"


def confine_output_dir(output_dir: str, root: str) -> Path | None:
    """``output_dir`` resolved under ``root`` (relative paths are relative to it), or None
    when it escapes ``root`` (``..``, another absolute path, a symlink out)."""
    base = Path(root).resolve()
    raw = Path(output_dir).expanduser()
    path = (raw if raw.is_absolute() else base / raw).resolve()
    return path if path == base or base in path.parents else None


def read_token(token_file: str | None) -> str | None:
    """The bearer token: ``KDRAY_API_TOKEN`` or the first line of ``token_file``."""
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"cannot read the API token file {token_file}: {why}; give a readable file "
                              "whose first line is the token") from None
    else:
        token = os.environ.get("KDRAY_API_TOKEN", "").strip()
    return token or None
