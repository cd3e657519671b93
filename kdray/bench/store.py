"""Benchmark: the service's job store at the size a service reaches after weeks of jobs.

It fills a temporary store (``STATE_DIR/kdray.db``, the schema :class:`JobStore` makes) with
``--jobs`` ended jobs and one job of ``--steps`` training steps (events shaped as a real job's,
about 700 bytes each, with a restore halfway), then measures, each the median of ``--repeat``:

* **what the page reads of a long job**, side by side: its history as the page read it before
  (every event, ``GET /v1/jobs/{id}/events`` pages of 1,000) against its curve
  (``GET /v1/jobs/{id}/curve``, one request), seconds and bytes, through the app in process
  (FastAPI's TestClient: no network, no Ray);
* **the reads a service makes every few seconds**, at ``--jobs`` records: the page's newest 100,
  a page in the middle, one state's, a submit's output-dir check, and the expiry's page of
  jobs ended before a time. Target: each under :data:`TARGET_MS`.

Usage: ``kdray bench store [--jobs 100000] [--steps 120000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

#: Most milliseconds a job-table read may take at ``--jobs`` records.
TARGET_MS = 20.0
#: A step's metrics as a job reports them (the names in a job's ``train_metrics.jsonl``).
_STEP_FIELDS = ("step_s", "cpu_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s", "report_s", "grad_norm",
                "peak_rss_mb", "pad_fraction", "tokens_per_s", "kd", "lr", "kd_ratio")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray bench store", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000, help="ended jobs in the store (default 100,000)")
    p.add_argument("--steps", type=int, default=120_000, help="training steps of the long job (default 120,000)")
    p.add_argument("--points", type=int, default=648, help="the curve's spans: the page's plot width (default 648)")
    p.add_argument("--repeat", type=int, default=5, help="measurements of each read; the median is shown (default 5)")
    p.add_argument("--check", action="store_true", help="exit 1 when a read misses its target")
    return p


def _fill(db_path: Path, jobs: int, steps: int) -> str:
    """The ended jobs and the long job's events, written straight into the store's tables (one
    transaction, not one per event); returns the long job's id."""
    from kdray.service.store import JobStore

    store = JobStore(db_path)
    long_job, _ = store.create(name="long", spec={}, output_dir="/bench/long")
    store.update(long_job["id"], state="running", driver=True)
    rng = random.Random(0)
    now = time.time()
    spec = json.dumps({"name": "job", "training": {"lr": 1e-4, "epochs": 1}, "data": {"path": "/data/x" * 20}})
    steps_kept = list(range(1, steps // 2 + 1)) + list(range(steps // 2 - steps // 10, steps + 1))  # a restore
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO jobs (id, name, state, spec, output_dir, created, updated, started, finished) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((uuid.uuid4().hex[:12], f"job-{k}", rng.choice(("succeeded", "failed", "cancelled")), spec,
              f"/bench/{k}", now - 1e6 + 10 * k, now, now - 1e6 + 10 * k, now - 1e6 + 10 * k + 5)
             for k in range(jobs)))
        db.executemany(
            "INSERT INTO events (job_id, seq, time, kind, data) VALUES (?, ?, ?, 'train_step', ?)",
            ((long_job["id"], seq, now + seq, json.dumps({
                "step": step, "total_steps": steps, "epoch": 0, "round": 0, "loss": 2.0 / (1 + step / 1000),
                **{name: rng.random() for name in _STEP_FIELDS}}))
             for seq, step in enumerate(steps_kept, start=1)))
    return long_job["id"]


def _median_s(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(median seconds of ``repeat`` calls of ``fn``, its last result)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(argv: list[str] | None = None) -> int:
    from fastapi.testclient import TestClient

    from kdray.service.app import ServiceConfig, build_app
    from kdray.service.store import JobStore

    args = _parser().parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kdray-bench-store-") as tmp:
        config = ServiceConfig(state_dir=tmp, output_root=str(Path(tmp) / "runs"), token="t",
                               dashboard_url="http://127.0.0.1:1")
        t = time.perf_counter()
        job_id = _fill(Path(config.db_path), args.jobs, args.steps)
        print(f"store: {args.jobs:,} ended jobs and one of {args.steps:,} steps "
              f"({Path(config.db_path).stat().st_size / 2**20:.0f} MiB; filled in {time.perf_counter() - t:.0f} s)")

        with TestClient(build_app(config)) as client:
            def replay() -> int:
                after, size = 0, 0
                while True:
                    res = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000})
                    size += len(res.content)
                    events = res.json()["events"]
                    if not events:
                        return size
                    after = events[-1]["seq"]

            def curve() -> int:
                return len(client.get(f"/v1/jobs/{job_id}/curve", params={"points": args.points}).content)

            replay_s, replay_bytes = _median_s(replay, args.repeat)
            curve_s, curve_bytes = _median_s(curve, args.repeat)
        print(f"\nthe page's history of the {args.steps:,}-step job (median of {args.repeat}):")
        print(f"  every event (pages of 1,000)  {replay_s:8.2f} s  {replay_bytes / 2**20:8.1f} MiB")
        print(f"  its curve ({args.points} spans)     {curve_s:8.2f} s  {curve_bytes / 2**10:8.1f} KiB")
        print(f"  curve vs events: {replay_s / curve_s:.0f}x faster, {replay_bytes / curve_bytes:.0f}x fewer bytes")

        store = JobStore(config.db_path)
        made = iter(range(10**9))
        reads = {
            "newest 100 (the page)": lambda: store.list(limit=100),
            "100 in the middle": lambda: store.list(limit=100, offset=args.jobs // 2),
            "100 of one state": lambda: store.list(state="failed", limit=100),
            "a submit's output-dir check": lambda: store.create(name="b", spec={}, output_dir=f"/bench/new-{next(made)}"),
            "an expiry page (20)": lambda: store.ended_before(time.time() - 5e5, limit=20),
        }
        print(f"\njob-table reads at {args.jobs:,} records (median of {args.repeat}; target < {TARGET_MS:g} ms):")
        worst = 0.0
        for name, fn in reads.items():
            seconds, _ = _median_s(fn, args.repeat)
            worst = max(worst, seconds * 1000)
            print(f"  {name:<30} {seconds * 1000:8.1f} ms")
        print(f"targets: [{'met' if worst < TARGET_MS else 'MISSED'}] every read under {TARGET_MS:g} ms "
              f"(worst {worst:.1f} ms)")
    print(f"host load (1-min average): {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 1 if args.check and worst >= TARGET_MS else 0
