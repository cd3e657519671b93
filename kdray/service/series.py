"""A job's per-step curve of one ``train_step`` number, cut down to a fixed number of points.

A job that trained 100,000 steps has as many ``train_step`` events (about 710 bytes each in the
store): replaying them all to draw its loss curve sends tens of megabytes and decodes every
event. :func:`curve` reads them inside SQLite and returns, for each of ``points`` equal spans of
the steps, the step with the lowest and the step with the highest value: at most two points a
span, which is what a plot ``points`` pixels wide draws (a column's lowest and highest value).

Steps a restore redid are dropped first, as the report and the page drop them: an event for
step ``s`` replaces every earlier event for step ``s`` or later (the job went back to a
checkpoint and trained them again). An event is kept when its step is below the step of every
later event, which one window over the job's events (newest first) computes.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

#: ``train_step`` fields a curve may be asked of: a plain key (``loss``, ``lr``, ``kl``, ...),
#: so the JSON path built from it is that key and nothing else.
FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

_NUMBER = "IN ('integer', 'real')"
_CURVE_SQL = f"""
WITH steps AS (
    SELECT seq, json_extract(data, '$.step') AS step, json_extract(data, :path) AS value
    FROM events WHERE job_id = :job AND seq <= :head AND kind = 'train_step'),
numbered AS (
    SELECT step, value, MIN(step) OVER (ORDER BY seq DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS later
    FROM steps WHERE typeof(step) {_NUMBER}),
kept AS (
    SELECT step, value FROM numbered WHERE (later IS NULL OR step < later) AND typeof(value) {_NUMBER}),
span AS (
    SELECT MIN(step) AS first, MAX(step) AS last, COUNT(*) AS n FROM kept),
columns AS (
    SELECT step, value, CAST(ROUND(:points * (step - first) * 1.0 / MAX(last - first, 1)) AS INTEGER) AS c
    FROM kept, span)
SELECT step, MIN(value) AS value FROM columns GROUP BY c
UNION
SELECT step, MAX(value) AS value FROM columns GROUP BY c
ORDER BY step
"""


def curve(db: sqlite3.Connection, job_id: str, field: str, points: int) -> dict[str, Any]:
    """The curve of ``field`` over the training steps of ``job_id``, as of its last event now.

    Returns ``{"seq": S, "field": F, "points": [[step, value], ...]}``: ``seq`` is the last
    event read (a follower reads the events after it, ``GET /v1/jobs/{id}/events?after=S``);
    the points are sorted by step, at most two for each of ``points + 1`` spans (the steps with
    the lowest and highest value in it; SQLite's min/max aggregates take the other columns of
    the row they pick). Steps whose event lacks the field, or holds no number there, are left
    out. Cost: one pass over the job's events inside SQLite (about 0.4 s for 120,000 steps on
    a 2-core host), whatever ``points`` is.

    Raises:
        ValueError: ``field`` is not a plain key (:data:`FIELD`) or ``points`` is below 1.
    """
    if not FIELD.fullmatch(field):
        raise ValueError(f"field {field!r} is not a train_step key (letters, digits, underscores)")
    if points < 1:
        raise ValueError(f"points must be at least 1, not {points}")
    head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
    # Events are only ever appended (or all of a job's deleted), so the events up to ``head``
    # do not change between the two reads.
    rows = db.execute(_CURVE_SQL, {"path": "$." + field, "job": job_id, "head": head, "points": points}).fetchall()
    return {"seq": int(head), "field": field, "points": [[row[0], row[1]] for row in rows]}
