"""The kdray CLI client against the service app on a real HTTP server (no Ray): what a user
sees of a job with a long history."""

from __future__ import annotations

from kdray.service.app import ServiceConfig, build_app
from kdray.service.store import JobStore
from tests.http_app import serving


def test_watch_replays_every_event_of_a_long_history_before_it_exits(tmp_path, capsys):
    """An ended job with 2,500 events (2.5 pages of the events API): `kdray watch` shows them
    all, not the first page, and exits with the job's state."""
    from kdray.cli import main

    config = ServiceConfig(state_dir=str(tmp_path), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    store = JobStore(config.db_path)
    job, _ = store.create(name="long", spec={}, output_dir=str(tmp_path / "runs" / "long"))
    store.update(job["id"], state="running", driver=True)
    for i in range(2500):
        store.append_event(job["id"], {"kind": "message", "text": f"line {i}"})
    store.update(job["id"], state="succeeded")
    with serving(build_app(config)) as url:
        code = main(["watch", job["id"], "--server", url, "--token", "t", "--interval", "0.1"])
    out, err = capsys.readouterr()
    shown = [line for line in err.splitlines() if line.startswith("line ")]
    assert code == 0 and f"{job['id']}: succeeded" in out
    assert shown == [f"line {i}" for i in range(2500)], (len(shown), shown[-1:])
