"""The durable job store: job records and their progress events in SQLite.

One database file in the service's state directory (``STATE_DIR/kdray.db``). The running job
(``kdray run ... --store DB --job-id ID``) appends its progress events and final state; the
service reads them. SQLite in WAL mode lets one writer and many readers work at once, and
every write is one transaction, so a killed writer never leaves a half record: killing and
restarting the service loses nothing.

A new record is ``queued``: the queue is the records in that state, oldest first
(:meth:`JobStore.admit` moves those that fit under the service's ``max_running_jobs`` to
``pending`` as the service hands them to Ray: :mod:`kdray.service.queue`). One record not yet
ended owns its ``output_dir`` (:meth:`JobStore.create` refuses another).

A record's progress columns (phase, step, metrics, ...) are folded from its events as they
are appended, so a status read is one row lookup, however long the history.

Who may end a record: a terminal state is final, except a failure the service decided without
the driver's word (``failed_by = 'service'``: Ray lost the job, or the submit seemed to fail),
which the job's own driver overrides when it turns out to be alive (:meth:`JobStore.update`
with ``driver=True``). The reconciler's evidence that Ray lost a job (``lost_checks``,
``lost_since``) lives in the record, so it survives a service restart.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from kdray.errors import OutputDirInUse
from kdray.pipeline.progress import finite
from kdray.service import series
from kdray.service.progress import TERMINAL, fold, progress

STATES = ("queued", "pending", "running", "cancelling", "succeeded", "failed", "cancelled")
#: States of a job that holds a slot of ``max_running_jobs``: handed to Ray and not ended.
ADMITTED = ("pending", "running", "cancelling")
_ENDED_SQL = ", ".join(f"'{state}'" for state in TERMINAL)  # for ``state IN (...)``
_ACTIVE_SQL = ", ".join(f"'{state}'" for state in STATES if state not in TERMINAL)  # IN, not NOT IN: the index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    ray_job_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    phase TEXT,
    phase_detail TEXT,
    phase_done INTEGER NOT NULL DEFAULT 0,
    phase_total INTEGER,
    phase_started REAL,
    round INTEGER,
    step INTEGER,
    total_steps INTEGER,
    first_step INTEGER,
    first_step_time REAL,
    metrics TEXT,
    failed_by TEXT,
    lost_checks INTEGER NOT NULL DEFAULT 0,
    lost_since REAL,
    admitted REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created DESC, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished, id);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


#: Columns added since the first store (name, SQL declaration), added to an older file on open.
_ADDED_COLUMNS = (("failed_by", "TEXT"), ("lost_checks", "INTEGER NOT NULL DEFAULT 0"), ("lost_since", "REAL"),
                  ("admitted", "REAL"))


def _overlap(a: str, b: str) -> bool:
    """Whether two resolved output directories are one, or one holds the other."""
    pa, pb = Path(a), Path(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


class JobStore:
    """Job records and events in one SQLite file; safe to share between processes."""

    def __init__(self, path: str | Path, *, lazy: bool = False):
        """The store in the file ``path``, created (with its directory) or brought up to date
        now, or with ``lazy`` on first use: the service's app is built where Ray Serve builds
        it, which may be any node, and its store is first used by the replica, on the head."""
        self.path = Path(path)
        self._ready = False
        if not lazy:
            self.open()

    def open(self) -> None:
        """Create the file and its tables, or add what an older kdray's store lacks; idempotent."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # stored in the file: set once, not per connection
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")  # two processes opening an older store: one adds the columns
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, decl in _ADDED_COLUMNS:  # a store an older kdray made: the columns it lacks
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            db.execute("COMMIT")
        finally:
            db.close()
        self._ready = True

    def _connect(self, wait_s: float = 30.0) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=wait_s, isolation_level=None)  # waits up to wait_s on a lock
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _db(self, wait_s: float = 30.0) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            self.open()
        db = self._connect(wait_s)
        try:
            yield db
        finally:
            db.close()

    # -- records -------------------------------------------------------------------------
    def create(self, *, name: str, spec: dict[str, Any], output_dir: str, idempotency_key: str | None = None,
               on_create: Callable[[str], None] | None = None) -> tuple[dict[str, Any], bool]:
        """A new ``queued`` record (:meth:`admit` hands it to Ray when a slot is free), or the
        one an earlier request with ``idempotency_key`` created: (record, created?).
        ``on_create(job_id)`` runs before the record is committed (the service saves the spec
        its entrypoint reads there): if it raises, there is no record, and no admission can
        see the record before it has run.

        Raises:
            OutputDirInUse: a job not yet ended writes to ``output_dir``, or to a directory
                inside it or around it (``owner``: its id). Checked in the same transaction as
                the insert, so two submits at once cannot both pass.
        """
        now = time.time()
        job_id = uuid.uuid4().hex[:12]
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            if idempotency_key is not None:
                row = db.execute("SELECT id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    db.execute("COMMIT")
                    return self.get(row["id"]), False
            active = db.execute(f"SELECT id, state, output_dir FROM jobs WHERE state IN ({_ACTIVE_SQL}) "
                                "ORDER BY created").fetchall()
            for other in active:
                if _overlap(output_dir, other["output_dir"]):
                    db.execute("ROLLBACK")
                    raise OutputDirInUse(
                        f"output_dir {output_dir} is in use by job {other['id']} ({other['state']}"
                        f"{', in ' + other['output_dir'] if other['output_dir'] != output_dir else ''}); "
                        "two jobs in one output directory would overwrite each other's state and checkpoints: "
                        "wait for it to end, cancel it, or give this job another output_dir", owner=other["id"])
            db.execute(
                "INSERT INTO jobs (id, name, state, spec, output_dir, idempotency_key, created, updated) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, name, json.dumps(spec), output_dir, idempotency_key, now, now),
            )
            try:
                if on_create is not None:
                    on_create(job_id)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return self.get(job_id), True

    def admit(self, max_running: int | None, only: str | None = None) -> dict[str, Any] | None:
        """The next queued job (the oldest), moved to ``pending`` with ``admitted`` set, in one
        transaction, when fewer than ``max_running`` jobs (None: no limit) are in :data:`ADMITTED`
        states; else None. With ``only``, that job alone, and only when it is the next. The caller
        hands it to Ray before admitting another, so ``admitted`` is when its submit began."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'cancelling')"
                                 ).fetchone()[0]
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created, id LIMIT 1").fetchone()
            if row is None or (max_running is not None and running >= max_running) or (only and row["id"] != only):
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state = 'pending', admitted = ?, updated = ? WHERE id = ?",
                       (now, now, row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    def requeue(self, job_id: str) -> bool:
        """Put an admitted job whose submit Ray refused for now back in the queue (it keeps its
        place: the queue is ordered by creation; ``admitted`` stays, saying a submit was tried,
        which may have reached Ray after all). False when it has moved on meanwhile (cancelled,
        or its driver already started)."""
        with self._db() as db:
            cur = db.execute("UPDATE jobs SET state = 'queued', updated = ? WHERE id = ? AND state = 'pending'",
                             (time.time(), job_id))
        return cur.rowcount > 0

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that waits in the queue and was never handed to Ray: nothing of it can
        run. False otherwise (admitted meanwhile, or requeued after a submit that may have
        reached Ray: it is stopped through Ray instead)."""
        now = time.time()
        with self._db() as db:
            cur = db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, updated = ? "
                             "WHERE id = ? AND state = 'queued' AND admitted IS NULL", (now, now, job_id))
        return cur.rowcount > 0

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next queued job to start, and so on; None when the job is not queued."""
        with self._db() as db:
            row = db.execute("SELECT created, id, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "queued":
                return None
            ahead = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (created < ? OR "
                               "(created = ? AND id < ?))", (row["created"], row["created"], job_id)).fetchone()[0]
        return int(ahead) + 1

    def get(self, job_id: str, *, wait_s: float = 30.0) -> dict[str, Any] | None:
        """The record of ``job_id``, or None. Raises :class:`sqlite3.OperationalError` when the
        file stays locked for ``wait_s`` seconds (a WAL being recovered; readers otherwise never
        wait for the writer)."""
        with self._db(wait_s) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self, *, state: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Newest first: (records on this page, total matching)."""
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        with self._db() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
                              [*args, limit, offset]).fetchall()
        return [_record(r) for r in rows], total

    def update(self, job_id: str, *, driver: bool = False, **fields: Any) -> None:
        """Set columns of a record (``state``, ``error``, ``ray_job_id``, ...). A terminal state
        is final: later writes of another state are ignored (a late 'running' from a dying
        process must not resurrect a cancelled job), except that the job's own driver
        (``driver=True``) overrides a failure the service decided (``failed_by = 'service'``):
        its word is evidence, the service's a conclusion. A driver's write clears
        ``failed_by`` and the reconciler's count of rounds Ray did not know the job, and its
        ``succeeded`` or ``running`` clears the service's error. A ``running`` never replaces
        ``cancelling`` (a driver starting after its job was cancelled is being stopped)."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}; one of {STATES}")
        now = time.time()
        if fields.get("state") in TERMINAL:
            fields.setdefault("finished", now)
        if fields.get("state") == "running":
            fields.setdefault("started", now)
            fields.setdefault("finished", None)
        guard = ""
        if "state" in fields:
            guard = f" AND (state NOT IN ({_ENDED_SQL})"
            guard += " OR (state = 'failed' AND failed_by = 'service'))" if driver else ")"
            if fields["state"] == "running":
                guard += " AND state != 'cancelling'"
            if driver:
                fields.setdefault("failed_by", None)
                fields.update(lost_checks=0, lost_since=None)
                if fields["state"] in ("running", "succeeded"):
                    fields.setdefault("error", None)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {cols}, updated = ? WHERE id = ?{guard}",
                       [*fields.values(), now, job_id])

    def unfinished(self, limit: int = 500) -> list[dict[str, Any]]:
        """Records handed to Ray and not ended (:data:`ADMITTED`), oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state IN ('pending', 'running', 'cancelling') "
                              "ORDER BY created, id LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def mark_missing(self, job_id: str, now: float) -> tuple[int, float] | None:
        """One more reconcile round in which Ray did not know the job: (rounds in a row, since
        when), or None when the record is gone (deleted since the round began)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE jobs SET lost_checks = lost_checks + 1, lost_since = COALESCE(lost_since, ?) "
                       "WHERE id = ?", (now, job_id))
            row = db.execute("SELECT lost_checks, lost_since FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute("COMMIT")
        return None if row is None else (int(row["lost_checks"]), float(row["lost_since"]))

    def delete(self, job_id: str) -> bool:
        """Remove an ended job's record and all its events, in one transaction. False, and
        nothing removed, when there is no such record or it has not ended (its state changed
        meanwhile: a failure the service concluded, taken back by the job's driver)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({_ENDED_SQL})", (job_id,))
            if cur.rowcount:
                db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("COMMIT")
        return cur.rowcount > 0

    def ended_before(self, t: float, limit: int = 100, after: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Records of jobs that ended before ``t`` (seconds since the epoch), the earliest ended
        first, at most ``limit``; with ``after`` (the last page's last ``(finished, id)``), the
        page after it."""
        f, i = after or (float("-inf"), "")
        with self._db() as db:
            # In (finished, id) order from the cursor on (the index): not every ended job's row per page.
            rows = db.execute(f"SELECT * FROM jobs INDEXED BY jobs_finished WHERE (finished, id) > (?, ?) "
                              f"AND finished < ? AND state IN ({_ENDED_SQL}) ORDER BY finished, id LIMIT ?",
                              (f, i, t, limit)).fetchall()
        return [_record(r) for r in rows]

    # -- events --------------------------------------------------------------------------
    def append_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Append one progress event (the job's driver writes them) and fold it into the record's
        progress columns. The event is the driver's word that the job runs: a failure the service
        concluded (``failed_by = 'service'``) gives way to ``running``."""
        kind = str(event.get("kind", "message"))
        t = float(event.get("time", time.time()))
        data = finite({k: v for k, v in event.items() if k not in ("kind", "time")})
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            # no event for a record deleted meanwhile: nothing would ever list or remove it
            cur = db.execute("INSERT INTO events (job_id, seq, time, kind, data) SELECT ?, ?, ?, ?, ? "
                             "WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)",
                             (job_id, seq, t, kind, json.dumps(data), job_id))
            if not cur.rowcount:
                db.execute("COMMIT")
                return
            changes = fold(kind, data, t)
            if changes:
                sets = ", ".join(f"{col} = {expr}" for col, expr, _ in changes)
                args = [value for _, expr, value in changes if "?" in expr]
                db.execute(f"UPDATE jobs SET {sets}, updated = ? WHERE id = ?", [*args, t, job_id])
            db.execute("UPDATE jobs SET state = 'running', failed_by = NULL, error = NULL, finished = NULL, "
                       "lost_checks = 0, lost_since = NULL WHERE id = ? AND state = 'failed' AND failed_by = 'service'",
                       (job_id,))
            db.execute("COMMIT")

    def heads(self, job_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """(last event's seq, state) of each of ``job_ids`` that exists, in one read: what an
        event stream needs to know whether to read more (:mod:`kdray.service.routes_events`)."""
        if not job_ids:
            return {}
        marks = ", ".join("?" * len(job_ids))
        with self._db() as db:
            rows = db.execute(f"SELECT j.id, j.state, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = j.id) "
                              f"AS seq FROM jobs j WHERE j.id IN ({marks})", list(job_ids)).fetchall()
        return {r["id"]: (int(r["seq"]), r["state"]) for r in rows}

    def events(self, job_id: str, *, after: int = 0, limit: int = 1000,
               kind: str | None = None) -> list[dict[str, Any]]:
        """The job's events after ``after``, at most ``limit``; of one ``kind`` only, if given."""
        where = "" if kind is None else " AND kind = ?"
        with self._db() as db:
            rows = db.execute(f"SELECT seq, time, kind, data FROM events WHERE job_id = ? AND seq > ?{where} "
                              "ORDER BY seq LIMIT ?", (job_id, after, *([kind] if kind else []), limit)).fetchall()
        return [{"seq": r["seq"], "time": r["time"], "kind": r["kind"], **json.loads(r["data"])} for r in rows]

    def curve(self, job_id: str, field: str = "loss", points: int = 1000) -> dict[str, Any]:
        """The ``train_step`` curve of ``field``, cut to about ``points`` spans:
        :func:`kdray.service.series.curve` (its return value and errors)."""
        with self._db() as db:
            return series.curve(db, job_id, field, points)


def _record(row: sqlite3.Row) -> dict[str, Any]:
    rec = dict(row)
    rec["spec"] = json.loads(rec["spec"])
    rec["metrics"] = json.loads(rec["metrics"]) if rec["metrics"] else None
    rec.update(progress(rec))
    return rec
