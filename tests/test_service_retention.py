"""Removing ended jobs: the store's delete, ``DELETE /v1/jobs/{id}`` and ``keep_ended_days``
against Ray's job API as :class:`tests.test_service_units._FakeRay` answers it (the route
against a real ``kdray serve`` and its Ray: test_service.py)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from kdray.errors import ConfigError
from kdray.service.app import ServiceConfig, app_builder, build_app
from kdray.service.queue import spec_path
from kdray.service.retention import EXPIRE_BATCH, expire_ended
from kdray.service.store import JobStore
from tests.http_app import serving
from tests.test_service_units import _FakeRay

DAY = 86400.0


def _config(tmp_path, **kw) -> ServiceConfig:
    return ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                         dashboard_url="http://127.0.0.1:1", **kw)


def _job(config, store, name, state, finished=None, ray_id=None, events=3):
    """A record in ``state`` with its saved spec and ``events`` events, handed to Ray as
    ``ray_id`` (None: cancelled while queued, never admitted)."""
    job, _ = store.create(name=name, spec={}, output_dir=f"/o/{name}",
                          on_create=lambda i: (spec_path(config, i).parent.mkdir(parents=True),
                                               spec_path(config, i).write_text("name: x\n")))
    if ray_id is not None:
        store.admit(None, only=job["id"])
        store.update(job["id"], ray_job_id=ray_id, state="running")
    for k in range(events):
        store.append_event(job["id"], {"kind": "train_step", "step": k + 1, "loss": 1.0})
    if state != "running":
        store.update(job["id"], state=state, **({"finished": finished} if finished else {}))
    return job["id"]


def test_the_store_deletes_an_ended_job_with_its_events_and_nothing_else(tmp_path):
    store = JobStore(tmp_path / "kdray.db")
    config = _config(tmp_path)
    done = _job(config, store, "done", "succeeded", ray_id="r1")
    running = _job(config, store, "running", "running", ray_id="r2")
    assert not store.delete(running) and len(store.events(running)) == 3  # not ended: nothing removed
    assert store.delete(done) and store.get(done) is None and store.events(done) == []
    assert not store.delete(done)  # gone already
    store.append_event(done, {"kind": "message", "text": "a late driver"})  # leaves no orphan
    assert store.events(done) == [] and store.heads([done, running]) == {running: (3, "running")}
    assert [r["id"] for r in store.list()[0]] == [running]


def test_delete_route_removes_an_ended_job_from_ray_and_the_service(tmp_path):
    config = _config(tmp_path)
    store = JobStore(config.db_path)
    ray = _FakeRay({"r1": "STOPPED", "r2": "RUNNING", "r3": "RUNNING"})
    app = build_app(config)
    app.state.ray_jobs = ray
    done = _job(config, store, "done", "cancelled", ray_id="r1")
    running = _job(config, store, "running", "running", ray_id="r2")
    # The service concluded the job failed, but Ray runs its driver still.
    concluded = _job(config, store, "concluded", "running", ray_id="r3")
    store.update(concluded, state="failed", failed_by="service", error="lost")
    never = _job(config, store, "never", "cancelled")  # cancelled while queued: Ray never had it
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer t"}
        assert client.delete(f"/v1/jobs/{done}").status_code == 401
        res = client.delete(f"/v1/jobs/{running}", headers=auth)
        assert res.status_code == 409 and f"cancel it first (kdray cancel {running})" in res.json()["error"]
        res = client.delete(f"/v1/jobs/{concluded}", headers=auth)
        assert res.status_code == 409 and "Ray still runs it (Ray job r3 is RUNNING)" in res.json()["error"]
        assert spec_path(config, concluded).exists()  # refused: nothing removed
        stopping = _job(config, store, "stopping", "running", ray_id="r4", events=0)
        store.update(stopping, state="cancelling")
        res = client.delete(f"/v1/jobs/{stopping}", headers=auth)
        assert res.status_code == 409 and "is being cancelled: delete it once it has stopped" in res.json()["error"]
        res = client.delete(f"/v1/jobs/{done}", headers=auth)
        assert res.status_code == 200 and res.json() == {"id": done, "deleted": True, "output_dir": "/o/done", "ran": True}
        assert ray.deleted == ["r1"] and not spec_path(config, done).parent.exists()
        assert client.get(f"/v1/jobs/{done}").status_code == 404
        assert client.get(f"/v1/jobs/{done}/events").status_code == 404
        assert client.delete(f"/v1/jobs/{done}", headers=auth).status_code == 404
        # its output_dir may be another job's: the answer says this one never wrote there
        assert client.delete(f"/v1/jobs/{never}", headers=auth).json() == {"id": never, "deleted": True,
                                                                           "output_dir": "/o/never", "ran": False}
        assert ray.deleted == ["r1"]  # nothing asked of Ray for a job it never had
        ray.down = True  # Ray unavailable: 503, and nothing removed
        store.update(running, state="succeeded")
        assert client.delete(f"/v1/jobs/{running}", headers=auth).status_code == 503
        assert store.get(running)["state"] == "succeeded" and spec_path(config, running).exists()
    assert sorted(r["id"] for r in store.list()[0]) == sorted([running, concluded, stopping])


def test_jobs_ended_longer_ago_than_keep_ended_days_expire(tmp_path):
    config = _config(tmp_path, keep_ended_days=2.0)
    store = JobStore(config.db_path)
    now = time.time()
    ray = _FakeRay({"r-old": "SUCCEEDED", "r-recent": "FAILED", "r-alive": "RUNNING"})
    old = _job(config, store, "old", "succeeded", finished=now - 3 * DAY, ray_id="r-old")
    recent = _job(config, store, "recent", "failed", finished=now - 1 * DAY, ray_id="r-recent")
    alive = _job(config, store, "alive", "running", ray_id="r-alive")
    store.update(alive, state="failed", failed_by="service", finished=now - 5 * DAY)
    lost = _job(config, store, "lost", "cancelled", finished=now - 4 * DAY, ray_id="r-gone")  # Ray forgot it
    assert expire_ended(_config(tmp_path), store, ray, now=now) == 0  # keep_ended_days unset: every job stays
    assert expire_ended(config, store, ray, now=now) == 2
    assert {r["id"] for r in store.list()[0]} == {recent, alive}  # alive: Ray runs it still, a later round
    assert ray.deleted == ["r-old"] and store.events(old) == [] and store.events(lost) == []
    assert len(store.events(recent)) == 3 and spec_path(config, recent).exists()
    assert not spec_path(config, old).parent.exists() and not spec_path(config, lost).parent.exists()
    many = [_job(config, store, f"m{i}", "succeeded", finished=now - 3 * DAY, events=0) for i in range(EXPIRE_BATCH + 3)]
    assert expire_ended(config, store, ray, now=now) == EXPIRE_BATCH  # a round's batch; the next one goes on
    assert expire_ended(config, store, ray, now=now) == 3 and not any(store.get(i) for i in many)


def test_keep_ended_days_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("KDRAY_API_TOKEN", "secret")
    for good in ("none", "7", "0.5"):
        assert type(app_builder({"state_dir": str(tmp_path), "keep_ended_days": good})).__name__ == "Application"
    for bad in ("0", "-1", "week", "inf"):
        with pytest.raises(ConfigError, match=f"keep_ended_days must be a number of days above 0, or none; got '{bad}'"):
            app_builder({"state_dir": str(tmp_path), "keep_ended_days": bad})
    with pytest.raises(ConfigError, match=r"keep_ended_days \(kdray serve --keep-ended-days\) must be a number of "
                                          "days above 0"):
        _config(tmp_path, keep_ended_days=0)


def test_a_stream_replaying_a_job_that_is_deleted_meanwhile_ends(tmp_path):
    """A page replaying a long ended job's history from the store while the job is deleted:
    its stream ends with ``deleted`` once the events are gone, rather than asking the store
    again and again for events its last poll said were there."""
    import asyncio

    from kdray.service.routes_events import EventHub

    config = _config(tmp_path)
    store = JobStore(config.db_path)
    job = _job(config, store, "long", "succeeded", events=1200)
    hub = EventHub(store, cap=2, poll_s=0.05)

    async def follow():
        stream = hub.stream(job, 0, hub.take())
        first = await stream.__anext__()  # the first 500, from the store
        await asyncio.sleep(0.3)  # polled: the hub's head says 1,200 events, the job ended
        assert store.delete(job)
        rest = [chunk async for chunk in stream]
        return first, rest

    first, rest = asyncio.run(asyncio.wait_for(follow(), 10))
    assert first.count("id: ") == 500 and rest == ['event: end\ndata: {"state": "deleted"}\n\n']
    assert hub.open == 0 and hub.jobs == {}


def test_two_deletes_at_once_and_a_reconcile_round_meeting_a_deleted_record(tmp_path):
    """The loser of two deletes at once (an expiry round and a user) is told it is done; a
    reconcile round whose snapshot held a job deleted meanwhile skips it."""
    from kdray.service.app import reconcile
    from kdray.service.retention import delete_job

    config = _config(tmp_path)
    store = JobStore(config.db_path)
    ray = _FakeRay({"r1": "SUCCEEDED"})
    done = _job(config, store, "done", "succeeded", ray_id="r1")
    rec = store.get(done)
    delete_job(config, store, ray, rec)
    delete_job(config, store, ray, rec)  # the same record, read before the first delete: no error
    assert store.get(done) is None and ray.deleted == ["r1"]

    class EndsAndIsDeletedWhileAsked(_FakeRay):
        """Ray's answer comes after the job's driver ended its record and a user deleted it."""

        def status(self, ray_id):
            job_id = ray_id.removeprefix("ray-")
            store.update(job_id, state="succeeded", driver=True)
            assert store.delete(job_id)
            return self.statuses.get(ray_id)

    gone = [_job(config, store, name, "running", ray_id=f"ray-{name}") for name in ("unknown", "failed")]
    for job_id in gone:
        store.update(job_id, ray_job_id=f"ray-{job_id}")
    reconcile(store, EndsAndIsDeletedWhileAsked({f"ray-{gone[1]}": "FAILED"}), now=time.time() + 3600)
    assert [store.get(i) for i in gone] == [None, None]


def test_kdray_delete_goes_on_past_a_refusal_and_exits_2(tmp_path):
    """`kdray delete A B C`: each id is tried; the refused ones are named, and the exit is 2."""
    from tests.test_e2e import kdray

    config = _config(tmp_path)
    store = JobStore(config.db_path)
    app = build_app(config)
    app.state.ray_jobs = _FakeRay({"r1": "STOPPED", "r2": "RUNNING"})
    done = _job(config, store, "done", "cancelled", ray_id="r1")
    running = _job(config, store, "running", "running", ray_id="r2")
    other = _job(config, store, "other", "failed")
    with serving(app) as url:  # the CLI in its own process, as a user runs it
        res = kdray("delete", done, running, "nope", other, "--server", url, "--token", "t", cwd=tmp_path)
    out, err = res.stdout, res.stderr
    assert res.returncode == 2 and f"{done}: deleted" in out and f"{other}: deleted" in out, (out, err)
    assert f"{running}: not deleted: job {running} has not ended (running)" in err
    assert "nope: not deleted: no job 'nope'" in err and f"2 of 4 jobs not deleted: {running} nope" in err
    assert [r["id"] for r in store.list()[0]] == [running]
