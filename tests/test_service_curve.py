"""``GET /v1/jobs/{id}/curve``: a job's per-step curve cut to at most two points per span,
computed in SQLite (kdray.service.series), checked against the page's own rule in Python."""

from __future__ import annotations

import json
import math
import random
import sqlite3

import pytest
from fastapi.testclient import TestClient

from kdray.service import series
from kdray.service.app import ServiceConfig, build_app
from kdray.service.store import JobStore


def _history(rnd: random.Random, n: int) -> list[dict]:
    """``n`` training steps with restores (a step going back), other events between them, and
    steps whose loss is missing, null or not a number."""
    events, step = [], 0
    while step < n:
        if rnd.random() < 0.05:
            events.append({"kind": "advance", "phase": "train", "n": 1})
            continue
        step += 1
        if rnd.random() < 3 / n:
            step = rnd.randint(1, step)  # restored from a checkpoint: steps from here are redone
        event = {"kind": "train_step", "step": step, "total_steps": n, "lr": rnd.random() * 1e-3}
        r = rnd.random()
        if r > 0.04:
            event["loss"] = rnd.random() * 3
        elif r > 0.02:
            event["loss"] = None
        elif r > 0.01:
            event["loss"] = "nan?"
        elif r > 0.005:
            event["loss"] = True  # not a number to the page either (typeof), though SQLite reads 1
        events.append(event)
    return events


def _expected(events: list[dict], field: str, points: int) -> list[list]:
    """The page's rule (a step replaces every kept step at or after it), then the first and
    last step and per span of the steps the lowest and the highest value; SQLite's ROUND
    rounds halves up."""
    kept: list[tuple[int, float]] = []
    for e in events:
        if e["kind"] != "train_step":
            continue
        while kept and kept[-1][0] >= e["step"]:
            kept.pop()
        value = e.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kept.append((e["step"], value))
    if not kept:
        return []
    first, last = kept[0][0], kept[-1][0]
    spans: dict[int, list[tuple[int, float]]] = {}
    for s, v in kept:
        spans.setdefault(math.floor(points * (s - first) / max(last - first, 1) + 0.5), []).append((s, v))
    out = {kept[0], kept[-1]}
    for members in spans.values():
        out.add(min(members, key=lambda p: p[1]))
        out.add(max(members, key=lambda p: p[1]))
    return [list(p) for p in sorted(out)]


def _append(store: JobStore, job_id: str, events: list[dict], seq: int) -> None:
    """The rows :meth:`JobStore.append_event` writes, in one transaction (not one per event)."""
    with sqlite3.connect(store.path) as db:
        db.executemany("INSERT INTO events (job_id, seq, time, kind, data) VALUES (?, ?, 0, ?, ?)",
                       ((job_id, seq + i, e["kind"], json.dumps({k: v for k, v in e.items() if k != "kind"}))
                        for i, e in enumerate(events, start=1)))


def test_the_curve_keeps_the_lowest_and_highest_step_of_each_span_after_restores(tmp_path):
    store = JobStore(tmp_path / "kdray.db")
    job, _ = store.create(name="a", spec={}, output_dir=str(tmp_path / "a"))
    other, _ = store.create(name="b", spec={}, output_dir=str(tmp_path / "b"))
    store.append_event(other["id"], {"kind": "train_step", "step": 1, "loss": 99.0})  # not job's
    empty = store.curve(job["id"])
    assert empty == {"seq": 0, "field": "loss", "points": []}
    rnd = random.Random(0)
    events: list[dict] = []
    checked = 0
    for n, points in ((1, 5), (7, 1), (60, 7), (400, 50), (3000, 100), (3000, 1000)):
        new = _history(rnd, n)
        _append(store, job["id"], new, seq=len(events))
        events += new  # each round continues the history: the first steps of a round restore
        got = store.curve(job["id"], "loss", points)
        assert got["seq"] == len(events) and got["field"] == "loss"
        assert got["points"] == _expected(events, "loss", points), (n, points)
        assert len(got["points"]) <= 2 * (points + 2)
        checked += len(got["points"])
    assert checked > 1000
    assert store.curve(job["id"], "lr", 10)["points"] == _expected(events, "lr", 10)
    with pytest.raises(series.UnknownField, match="^'absent' is not a number .* holds loss, lr$"):
        store.curve(job["id"], "absent", 10)
    for field, points in (("loss.x", 10), ("$.loss", 10), ("", 10), ("loss", 0), ("loss", 10_001)):
        with pytest.raises(ValueError, match="^field: .* is not a train_step key|^points: .* is not in 1..10000"):
            store.curve(job["id"], field, points)


def test_the_curve_holds_the_first_and_last_step_whatever_their_values(tmp_path):
    """A span's lowest and highest value need not be its first or last step: the curve's ends
    (where the page's axis and its latest step come from) are there all the same."""
    store = JobStore(tmp_path / "kdray.db")
    job, _ = store.create(name="a", spec={}, output_dir=str(tmp_path / "a"))
    losses = [5 - s / 100 for s in range(1, 100)] + [4.025]  # step 100: neither lowest nor highest of its span
    _append(store, job["id"], [{"kind": "train_step", "step": s, "loss": v} for s, v in enumerate(losses, 1)], 0)
    points = store.curve(job["id"], "loss", 10)["points"]
    assert points[0] == [1, 4.99] and points[-1] == [100, 4.025] and len(points) <= 24
    flat, _ = store.create(name="flat", spec={}, output_dir=str(tmp_path / "flat"))
    _append(store, flat["id"], [{"kind": "train_step", "step": s, "loss": 1.0} for s in range(1, 21)], 0)
    flat_points = store.curve(flat["id"], "loss", 2)["points"]
    assert flat_points[0] == [1, 1.0] and flat_points[-1] == [20, 1.0] and len(flat_points) <= 6


def test_the_curve_endpoint_and_the_events_after_it_make_the_whole_history(tmp_path):
    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="a", spec={}, output_dir=str(tmp_path / "runs" / "a"))
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.2), (2, 1.4)):  # a restore to step 2
        store.append_event(job["id"], {"kind": "train_step", "step": step, "loss": loss})
    with TestClient(build_app(config)) as client:
        url = f"/v1/jobs/{job['id']}/curve"
        res = client.get(url)
        assert res.status_code == 200
        assert res.json() == {"seq": 4, "field": "loss", "points": [[1, 2.0], [2, 1.4]]}
        store.append_event(job["id"], {"kind": "train_step", "step": 3, "loss": 1.1})
        after = client.get(f"/v1/jobs/{job['id']}/events", params={"after": res.json()["seq"]}).json()["events"]
        assert [(e["step"], e["loss"]) for e in after] == [(3, 1.1)]
        assert client.get(url, params={"points": 1}).json()["points"] == [[1, 2.0], [2, 1.4], [3, 1.1]]
        bad = client.get(url, params={"field": "loss') OR 1=1 --", "points": 0})
        assert bad.status_code == 422
        assert {e["field"] for e in bad.json()["errors"]} == {"field", "points"}
        assert client.get(url, params={"points": 10001}).status_code == 422
        # The driver's messages alone (the page's list), and a kind that is not one refused.
        store.append_event(job["id"], {"kind": "message", "text": "plan: 1 segment(s)"})
        events = f"/v1/jobs/{job['id']}/events"
        only = client.get(events, params={"kind": "message"}).json()["events"]
        assert [(e["kind"], e["text"]) for e in only] == [("message", "plan: 1 segment(s)")]
        assert client.get(events, params={"kind": "message", "after": only[0]["seq"]}).json() == {"events": []}
        for params in ({"kind": "x' OR 1=1"}, {"kind": "message", "stream": "true"}):
            res = client.get(events, params=params)
            assert res.status_code == 422 and res.json()["errors"][0]["field"] == "kind", res.text
        missing = client.get("/v1/jobs/0123456789ab/curve")
        assert missing.status_code == 404 and "no job" in missing.json()["error"]
        # A key the job's steps do not hold (a typo): 422 naming those they do; a job without
        # steps yet has an empty curve of any key.
        unknown = client.get(url, params={"field": "los"})
        assert unknown.status_code == 422 and unknown.json()["errors"] == [
            {"field": "field", "message": "'los' is not a number the job's training steps hold; its last step holds loss"}]
        fresh, _ = store.create(name="fresh", spec={}, output_dir=str(tmp_path / "runs" / "fresh"))
        assert client.get(f"/v1/jobs/{fresh['id']}/curve", params={"field": "los"}).json()["points"] == []
        store.append_event(job["id"], {"kind": "train_step", "step": 4, "loss": None, "lr": 1e-4})
        assert client.get(url, params={"field": "lr"}).json()["points"] == [[4, 1e-4]]
        assert client.get(url, params={"field": "kl"}).json()["errors"][0]["message"].endswith("holds loss, lr")


def test_bench_store_prints_the_curve_beside_the_events_and_the_reads_against_their_target():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "kdray.cli", "bench", "store", "--jobs", "2000", "--steps", "3000",
                          "--repeat", "1"], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "store: 2,000 ended jobs and one of 3,000 steps" in out
    assert "every event (pages of 1,000)" in out and "its curve (648 spans)" in out
    assert "x faster" in out and "x fewer bytes" in out
    for read in ("newest 100 (the page)", "100 in the middle", "100 of one state", "a submit's output-dir check",
                 "an expiry page (20)"):
        assert read in out
    assert "every read under 20 ms" in out and "host load (1-min average)" in out  # met or not: a benchmark's word
