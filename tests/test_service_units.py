"""The service app without Ray: the server-sent event stream, the Serve application
builder's arguments, and reconciling records with Ray's view (the HTTP surface is tested
against a real `kdray serve` in test_service.py; its error answers in test_errors.py)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from kdray.errors import ConfigError
from kdray.service.app import ServiceConfig, app_builder, build_app
from kdray.service.store import JobStore


def test_event_stream_replays_history_then_ends_with_the_final_state(tmp_path):
    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="a", spec={}, output_dir="/o")
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
    assert (tmp_path / "runs").is_dir() and (tmp_path / "kdray.db").exists()
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
    """RayJobs as reconcile sees it: a status per Ray job id (None: Ray no longer knows it)."""

    def __init__(self, statuses, down=False):
        self.statuses, self.down = statuses, down

    def status(self, ray_id):
        from kdray.errors import ClusterError

        if self.down:
            raise ClusterError("Ray's job API is unavailable")
        return self.statuses.get(ray_id)


def test_reconcile_takes_rays_word_and_waits_while_ray_is_down(tmp_path):
    from kdray.errors import ClusterError
    from kdray.service.app import reconcile

    store = JobStore(tmp_path / "kdray.db")
    ids = {}
    for name, ray_id in (("done", "r1"), ("lost", "r2"), ("stopped", "r3"), ("running", "r4")):
        job, _ = store.create(name=name, spec={}, output_dir="/o")
        store.update(job["id"], state="running", ray_job_id=ray_id)
        ids[name] = job["id"]
    with pytest.raises(ClusterError):  # Ray down: nothing is marked failed for it
        reconcile(store, _FakeRay({}, down=True))
    assert {store.get(i)["state"] for i in ids.values()} == {"running"}
    reconcile(store, _FakeRay({"r1": "SUCCEEDED", "r3": "STOPPED", "r4": "RUNNING"}))
    states = {name: store.get(i)["state"] for name, i in ids.items()}
    assert states == {"done": "succeeded", "lost": "failed", "stopped": "cancelled", "running": "running"}
    assert "no longer knows this job" in store.get(ids["lost"])["error"]
