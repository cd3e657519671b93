"""The kdray CLI client against the service app on a real HTTP server (no Ray): what a user
sees of a job with a long history."""

from __future__ import annotations

from kdray.service.app import ServiceConfig, build_app
from kdray.service.store import JobStore
from tests.http_app import serving
from tests.test_e2e import kdray


def test_watch_replays_every_event_of_a_long_history_before_it_exits(tmp_path):
    """An ended job with 2,500 events (2.5 pages of the events API): `kdray watch` shows them
    all, not the first page, and exits with the job's state."""
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="long", spec={}, output_dir=str(tmp_path / "runs" / "long"))
    store.update(job["id"], state="running", driver=True)
    for i in range(2500):
        store.append_event(job["id"], {"kind": "message", "text": f"line {i}"})
    store.update(job["id"], state="succeeded")
    with serving(build_app(config)) as url:  # the CLI in its own process, as a user runs it
        res = kdray("watch", job["id"], "--server", url, "--token", "t", "--interval", "0.1", cwd=tmp_path)
    shown = [line for line in res.stderr.splitlines() if line.startswith("line ")]
    assert res.returncode == 0 and f"{job['id']}: succeeded" in res.stdout, res.stderr[-2000:]
    assert f"report: {url}/v1/jobs/{job['id']}/report.md (the web page: {url}/)" in res.stderr  # where to look next
    assert shown == [f"line {i}" for i in range(2500)], (len(shown), shown[-1:])


def test_watch_waits_out_a_restart_of_the_service(tmp_path):
    """The service goes away while a job runs (a restart) and comes back on its port, answering
    404 a while (Ray Serve before the app is deployed: "Path '...' not found"): `kdray watch`
    says it is trying again, picks up the events stored meanwhile, and ends with the job."""
    import os
    import subprocess
    import sys
    import time

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from kdray.bench.service import free_port
    from tests.test_e2e import REPO

    async def not_deployed(request):
        return PlainTextResponse(f"Path '{request.url.path}' not found. Ping http://.../-/routes for available routes.",
                                 status_code=404)

    serve_starting = Starlette(routes=[Route("/{path:path}", not_deployed)])
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="restarted", spec={}, output_dir=str(tmp_path / "runs" / "restarted"))
    store.update(job["id"], state="running", driver=True)
    store.append_event(job["id"], {"kind": "message", "text": "before the restart"})
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with serving(build_app(config), port) as url:
        watch = subprocess.Popen([sys.executable, "-m", "kdray.cli", "watch", job["id"], "--server", url, "--token", "t",
                                  "--interval", "0.2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(3)
    try:
        time.sleep(3)  # the service is down: watch keeps trying
        assert watch.poll() is None
        with serving(serve_starting, port):
            time.sleep(3)  # Serve is up, the app is not yet
        assert watch.poll() is None
        store.append_event(job["id"], {"kind": "message", "text": "while it was down"})
        store.update(job["id"], state="succeeded")
        with serving(build_app(config), port):
            out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0 and f"{job['id']}: succeeded" in out, err[-2000:]
    assert "cannot reach the kdray service" in err and "trying again for up to 300 s" in err
    assert "the service answers again" in err
    assert [line for line in err.splitlines() if line.endswith(("the restart", "was down"))] == [
        "before the restart", "while it was down"]


def test_the_report_of_a_job_with_a_long_step_history_is_served(tmp_path):
    """report.json of a 15,000-step job (about 10 MB, most of it the per-step history): its
    evaluation table, timings and student path are served, written in either key order (the
    job writes the history last now; an older kdray wrote it in the middle)."""
    import json
    import time

    from fastapi.testclient import TestClient

    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    out = tmp_path / "runs" / "long"
    out.mkdir(parents=True)
    job, _ = store.create(name="long", spec={}, output_dir=str(out))
    store.update(job["id"], state="running", driver=True)
    store.update(job["id"], state="succeeded")
    parts = ("step_s", "cpu_s", "data_wait_s", "sampling_s", "forward_s", "backward_s", "optimizer_s", "report_s",
             "weight_sync_s", "grad_norm", "peak_rss_mb", "pad_fraction", "tokens_per_s", "kd", "lr", "kd_ratio")
    steps = [{"step": k, "epoch": 0, "round": 0, "total_steps": 15_000, "loss": 1.0 / k,
              **{name: 0.123456789 * k for name in parts}} for k in range(1, 15_001)]  # as a step's metrics
    head = {"name": "long", "status": "succeeded", "started": time.time(), "finished": time.time(),
            "timings_s": {"train": 9.5}, "rows": {"train": 64}}
    tail = {"evaluation": {"teacher": {"rougeL": 0.9}}, "judge": None, "student_dir": str(out / "student"),
            "plan": [], "spec": {"name": "long"}}
    with TestClient(build_app(config)) as client:
        for order in ({**head, **tail, "train_metrics": steps}, {**head, "train_metrics": steps, **tail}):
            (out / "report.json").write_text(json.dumps(order, indent=2))
            assert (out / "report.json").stat().st_size > 9 << 20  # over the 8 MiB report.md may take
            res = client.get(f"/v1/jobs/{job['id']}/report")
            assert res.status_code == 200, res.text
            expected = {k: v for k, v in {**head, **tail}.items() if k != "spec"}
            assert res.json() == {**expected, "paired_differences": None}  # a key of today's reports
        # Python writes a NaN (a step's grad_norm) as NaN, which is not JSON: a small report
        # with one in the middle is read whole.
        nan = [{"step": 1, "loss": 1.0, "grad_norm": float("nan")}]
        (out / "report.json").write_text(json.dumps({**head, "train_metrics": nan, **tail}, indent=2))
        assert "NaN" in (out / "report.json").read_text()
        assert client.get(f"/v1/jobs/{job['id']}/report").json()["evaluation"] == tail["evaluation"]
        (out / "report.json").write_text(json.dumps({**head, "train_metrics": nan + steps, **tail}, indent=2))
        res = client.get(f"/v1/jobs/{job['id']}/report")  # an older kdray's, too long to read whole
        assert res.status_code == 413 and f"{out / 'report.json'} is over 8 MiB and holds a NaN" in res.json()["error"]
        # Its steps last (as the last kdray to write them did), the read stops before them, though
        # the report lacks a newer key (paired_differences): their NaN is never reached.
        (out / "report.json").write_text(json.dumps({**head, **tail, "train_metrics": nan + steps}, indent=2))
        assert client.get(f"/v1/jobs/{job['id']}/report").json()["evaluation"] == tail["evaluation"]
        # A report of today's kdray: its paired differences are in the answer.
        paired = {"student_after - student_before": {"rougeL": 0.1, "rougeL_stderr": 0.02, "n": 400}}
        (out / "report.json").write_text(json.dumps({**head, "evaluation": tail["evaluation"],
                                                     "paired_differences": paired, **tail}, indent=2))
        assert client.get(f"/v1/jobs/{job['id']}/report").json()["paired_differences"] == paired


def test_list_pages_through_the_jobs_newest_first(tmp_path, monkeypatch):
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    ids = [store.create(name=f"job-{k}", spec={}, output_dir=str(tmp_path / "runs" / str(k)))[0]["id"]
           for k in range(7)]
    store.update(ids[2], state="failed")
    with serving(build_app(config)) as url:
        pages = [kdray("list", "--server", url, "--limit", "3", "--offset", str(offset), cwd=tmp_path)
                 for offset in (0, 3, 6, 9)]
        failed = kdray("list", "--server", url, "--state", "failed", cwd=tmp_path)
        none = kdray("list", "--server", url, "--state", "cancelled", cwd=tmp_path)
        logs = [kdray("logs", ids[k], "--server", url, cwd=tmp_path) for k in (0, 2)]
        bad = kdray("list", "--server", url, "--offset", "-1", cwd=tmp_path)
        monkeypatch.delenv("KDRAY_API_TOKEN", raising=False)
        (tmp_path / "spec.yaml").write_text("name: x\n")
        anonymous = kdray("submit", "spec.yaml", "--server", url, cwd=tmp_path)
    assert all(res.returncode == 0 for res in pages), [res.stderr for res in pages]
    titles = [" ".join(res.stdout.split("\n", 1)[0].split()) for res in pages]
    assert titles == ["kdray jobs (1-3 of 7, newest first)", "kdray jobs (4-6 of 7, newest first)",
                      "kdray jobs (7-7 of 7, newest first)", "kdray jobs (none here of 7, newest first)"]
    listed = [[i for i in ids if i in res.stdout] for res in pages]
    assert [sorted(ids.index(i) for i in page) for page in listed] == [[4, 5, 6], [1, 2, 3], [0], []]
    assert failed.returncode == 0 and "1-1 of 1 failed" in failed.stdout and ids[2] in failed.stdout
    assert bad.returncode == 2 and "invalid query" in bad.stderr and "offset: 0 or more" in bad.stderr, bad.stderr
    assert "job spec" not in bad.stderr and "Traceback" not in bad.stderr
    assert none.returncode == 0 and none.stdout.strip() == f"no cancelled kdray jobs on {url}", none.stdout
    # Jobs Ray never ran have no driver log: `kdray logs` says why rather than print nothing.
    assert [res.returncode for res in logs] == [0, 0] and not logs[0].stdout
    assert f"{ids[0]}: no driver log (queued: it has not started on Ray yet)" in logs[0].stderr, logs[0].stderr
    assert f"{ids[2]}: no driver log (failed: " in logs[1].stderr, logs[1].stderr
    # No token given at all: said so (it used to say the service refused the token).
    assert anonymous.returncode == 2 and "needs a token for this and none was given" in anonymous.stderr, anonymous.stderr
