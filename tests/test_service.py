"""The job service against a real `kdray serve` on localhost: Ray Serve, Ray Jobs, the
SQLite store, the CLI client. Starting Ray and Serve takes ~30 s and the jobs minutes, so
the module is marked slow (CI runs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdray.bench.service import free_port
from tests.browser import ARTIFACTS, chromium, click, waiting
from tests.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"
pytestmark = pytest.mark.slow


class PortTaken(Exception):
    pass


class Service:
    """``kdray serve`` with its local Ray, reaching Ray's job API through a TCP proxy the tests
    can cut off (:attr:`dashboard`)."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.dashboard = TcpProxy(free_port(), 0).start()
        # The local Ray's sessions (their logs: Serve's replica, the jobs' drivers) go here; short,
        # for Ray's socket paths.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="krt"))

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):  # a port taken meanwhile: try another one
            try:
                return self._start()
            except PortTaken:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError(f"kdray serve could not bind a port in {attempts} attempts")

    def _start(self) -> None:
        # The token from a file, which the replica reads on the head (as a RayService's token_file),
        # at the first start; from KDRAY_API_TOKEN at a restart, as the docs' example gives it.
        token_file = self.state_dir.parent / "token"
        token_file.write_text(TOKEN + "\n")
        env = {k: v for k, v in os.environ.items() if k != "KDRAY_API_TOKEN"}
        env.update(PYTHONUNBUFFERED="1", RAY_TMPDIR=str(self.ray_tmp))
        token_args = ["--token-file", str(token_file)]
        if self.proc is not None:
            env["KDRAY_API_TOKEN"], token_args = TOKEN, []
        self.log = open(self.state_dir.parent / f"serve-{time.time():.0f}.log", "w")
        self.dashboard.target = free_port()  # the local Ray's dashboard, behind the proxy
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kdray.cli", "serve", "--port", str(self.port), "--state-dir", str(self.state_dir),
             "--dashboard-port", str(self.dashboard.target), "--max-running-jobs", "1", *token_args,
             "--dashboard-url", f"http://127.0.0.1:{self.dashboard.port}", "--ray-timeout", "5"],
            cwd=self.state_dir.parent, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                log = Path(self.log.name).read_text()
                if "could not listen on" in log:
                    raise PortTaken(log)
                raise AssertionError(log)
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kdray serve did not come up"
            time.sleep(1)

    def kill(self) -> None:
        """The service and everything it started (its local Ray), as a crash would; then what a
        crash leaves in /tmp, HAProxy's private folder, goes too."""
        family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        folders = set()
        for p in family:
            try:
                if p.name() == "haproxy":
                    folders.add(haproxy_folder(p))
            except (psutil.Error, ValueError):  # gone meanwhile, a zombie, or no -f: nothing to remove
                pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        self.proc.wait()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def http(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def service(tmp_path_factory, toy_world):
    svc = Service(tmp_path_factory.mktemp("svc") / "state")
    svc.start()
    yield svc
    svc.kill()
    svc.dashboard.stop()
    shutil.rmtree(svc.ray_tmp, ignore_errors=True)


def job_spec(name: str, max_steps: int, **data) -> dict:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec.update(name=name, output_dir=name, evaluation={"enabled": False})
    spec["data"].update(max_train_samples=64, max_heldout_samples=16, **data)
    # 64 rows are 2 steps per epoch: enough epochs for max_steps (a long job for the cancel tests).
    spec["training"].update(epochs=max(1, max_steps // 2), warmup_steps=0, max_steps=max_steps)
    return spec


def wait_for(client: httpx.Client, job_id: str, pred, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        assert job["state"] not in ("succeeded", "failed", "cancelled"), job  # ended before pred held
        assert time.monotonic() < deadline, job
        time.sleep(1)


def kdray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, KDRAY_API_TOKEN=TOKEN))


def test_tokens_content_types_bad_specs_and_paths_get_clear_4xx(service):
    spec = job_spec("authz", 2)
    with service.http(token=None) as anon, service.http(token="wrong") as wrong, service.http() as ok:
        assert anon.post("/v1/jobs", json=spec).status_code == 401
        assert wrong.post("/v1/jobs", json=spec).status_code == 401
        assert anon.post("/v1/jobs/x/cancel").status_code == 401
        assert anon.get("/v1/jobs").status_code == 200  # reads are open unless --auth-reads

        res = ok.post("/v1/jobs", content=b"name: x", headers={"Content-Type": "text/plain"})
        assert res.status_code == 415 and "application/yaml" in res.json()["error"]
        res = ok.post("/v1/jobs", content=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"})
        assert res.status_code == 413

        bad = dict(spec, name="Bad Name", training={"lr": "fast", "zero_stage": 7})
        res = ok.post("/v1/jobs", json=bad)
        assert res.status_code == 422
        fields = {e["field"] for e in res.json()["errors"]}
        assert {"name", "training.lr", "training.zero_stage"} <= fields

        for escape in ("../outside", "/etc/kdray", "a/../../b"):
            res = ok.post("/v1/jobs", json=dict(spec, output_dir=escape))
            assert res.status_code == 422 and res.json()["errors"][0]["field"] == "output_dir", escape

        assert ok.get("/v1/jobs/nope").status_code == 404
        assert ok.post("/v1/jobs/nope/cancel").status_code == 404
        assert ok.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
        assert ok.get("/v1/jobs", params={"limit": "many"}).status_code == 422
        assert ok.get("/docs").status_code == 200 and "/v1/jobs" in ok.get("/openapi.json").text


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=12)


@st.composite
def mutated_spec(draw):
    """The tiny job spec with random fields replaced, added or removed (it can never become
    valid: its training data does not exist, so a fuzz case never starts a job)."""
    spec = job_spec("fuzz", 1)
    spec["data"]["train"] = "/nonexistent/train.jsonl"
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(spec)))
        if isinstance(spec[section], dict) and spec[section] and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(spec[section])))
            spec[section][key] = draw(_json)
        elif draw(st.booleans()):
            spec[section] = draw(_json)
        else:
            spec.pop(section)
    return spec


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(mutated_spec().map(lambda s: json.dumps(s).encode()), st.binary(max_size=300),
                      _json.map(lambda v: json.dumps(v).encode())),
       ctype=st.sampled_from(["application/json", "application/yaml", "text/yaml", "text/plain", ""]),
       job_id=st.text(max_size=80))
def test_fuzzed_requests_never_get_a_server_error(service, body, ctype, job_id):
    with service.http() as client:
        res = client.post("/v1/jobs", content=body, headers={"Content-Type": ctype} if ctype else {})
        assert res.status_code < 500, (res.status_code, res.text)
        assert res.status_code != 201, "a fuzz case must not start a job"
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
            try:
                res = client.get(httpx.URL(path))
            except httpx.InvalidURL:
                continue
            assert res.status_code < 500, (path, res.status_code, res.text)


def test_submit_and_watch_a_job_to_success_through_its_phases(service, tmp_path):
    spec_path = tmp_path / "job.yaml"
    # The toy dataset's own responses: the service's part is what this test is about (a teacher
    # pool before the training would add half a minute on CI).
    # The student by a path relative to the service's working directory: the service makes it
    # absolute, so the Ray Train workers, which run in Ray's own directories, find it too.
    from kdray import toy

    (service.state_dir.parent / "my-student").symlink_to(toy.resolve("toy:student"))
    spec = job_spec("watched", 2, response_source="dataset")
    spec["student"]["model"] = "./my-student"
    spec_path.write_text(yaml.safe_dump(spec))
    res = kdray("submit", str(spec_path), "--server", service.url, "--idempotency-key", "k-1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    again = kdray("submit", str(spec_path), "--server", service.url, "--idempotency-key", "k-1", cwd=tmp_path)
    assert again.stdout.strip() == job_id  # a retried submit is the same job

    # Ray's job API out of reach for a while as the job runs (several reconcile rounds): reads
    # still answer from the store, the driver's log from the service's copy (Ray's is out of
    # reach), and nothing is decided about the job.
    from kdray.service.app import RECONCILE_EVERY_S

    with service.http() as client:
        wait_for(client, job_id, lambda j: j["state"] in ("running", "succeeded"))
        service.dashboard.stop()
        try:
            deadline = time.monotonic() + 4 * RECONCILE_EVERY_S + 2
            while time.monotonic() < deadline:
                assert client.get(f"/v1/jobs/{job_id}").json()["state"] in ("running", "succeeded")
                time.sleep(0.5)
            res = client.get(f"/v1/jobs/{job_id}/logs")
            assert res.status_code == 200, res.text
            assert res.text == (service.state_dir / "jobs" / job_id / "driver.log").read_text()
        finally:
            service.dashboard.start()
        # A head that takes connections and never answers (Ray's SDK sets no timeout): a call
        # gives up after --ray-timeout, and the job is not judged meanwhile.
        service.dashboard.stalled = True
        try:
            t0 = time.monotonic()
            res = client.get(f"/v1/jobs/{job_id}/logs")  # Ray's, given up on after 5 s: the copy
            assert res.status_code == 200 and 5 <= time.monotonic() - t0 < 15, res.text
            assert client.get(f"/v1/jobs/{job_id}").json()["state"] in ("running", "succeeded")
        finally:
            service.dashboard.stalled = False

    # The web page, in a real browser, follows the job while `kdray watch` does.
    from selenium.webdriver.common.by import By

    browser = chromium(tmp_path / "profile")
    try:
        browser.get(service.url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "use-token").click()
        row = f'tr[data-job="{job_id}"]'
        click(browser, row)

        watch = kdray("watch", job_id, "--server", service.url, cwd=tmp_path)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        assert f"{job_id}: succeeded" in watch.stdout and "train" in watch.stderr

        # The page saw the job end: its row, its loss curve (both steps, from its curve and event
        # stream), its title, and the report it loaded once the stream said the job ended.
        wait = waiting(browser, 30)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} td.state").text == "succeeded")
        wait.until(lambda d: d.find_element(By.ID, "loss").get_attribute("data-points") == "2")
        wait.until(lambda d: "without held-out evaluation" in d.find_element(By.ID, "evaluation").text)
        assert f"({job_id}): succeeded" in browser.find_element(By.ID, "d-title").text
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "service-page.png"))  # kept for a person to look at
    finally:
        browser.quit()

    with service.http() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["percent"] == 100.0
        assert job["step"] == job["total_steps"] == 2 and job["metrics"]["loss"] > 0
        assert job["output_dir"] == str(service.state_dir / "runs" / "watched")
        events = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
        phases = [e["phase"] for e in events if e["kind"] == "phase_start"]
        assert phases == ["prepare", "generate", "train", "report"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        streamed = client.get(f"/v1/jobs/{job_id}/events", params={"stream": "true"}).text  # SSE through Serve
        assert streamed.count("\nid: ") + streamed.startswith("id: ") == len(events)
        assert streamed.rstrip().endswith('data: {"state": "succeeded"}')
        assert "timings:" in client.get(f"/v1/jobs/{job_id}/logs").text
        listed = client.get("/v1/jobs", params={"state": "succeeded"}).json()
        assert job_id in [j["id"] for j in listed["jobs"]]
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    # The driver joins the service's own Ray by its GCS address: Ray's job supervisor would give
    # it whichever Ray it finds on the host (any GCS process, with two Rays on one host).
    import socket

    with service.http() as client:  # the driver's log opens with the command Ray ran
        entry = next(line for line in client.get(f"/v1/jobs/{job_id}/logs").text.splitlines()
                     if line.startswith("Running entrypoint for job"))
    host, _, port = entry.rpartition(" --address ")[2].rpartition(":")
    assert " --address " in entry and port.isdigit(), entry
    socket.create_connection((host, int(port)), timeout=5).close()  # the GCS listens there
    # and it is the service's own Ray's: the GCS port its session (in ray_tmp) records
    sessions = sorted(service.ray_tmp.glob("**/session_2*"), key=lambda p: p.stat().st_mtime)
    assert [f.read_text().strip() for f in sessions[-1].glob("gcs_server_port_*")] == [port]
    assert (service.state_dir / "runs" / "watched" / "student" / "config.json").exists()
    saved = yaml.safe_load((service.state_dir / "runs" / "watched" / "spec.yaml").read_text())
    assert saved["student"]["model"] == str(service.state_dir.parent / "my-student")
    assert saved["output_dir"] == str(service.state_dir / "runs" / "watched")
    report = json.loads((service.state_dir / "runs" / "watched" / "report.json").read_text())
    assert "train_metrics" not in report and report["train_metrics_file"] == "train_metrics.jsonl"  # steps apart
    assert report["train_summary"]["steps"] == len((service.state_dir / "runs" / "watched" / report["train_metrics_file"])
                                                   .read_text().splitlines()) > 0


def ray_job_status(service, ray_id: str) -> str:
    """What the service's local Ray says of job ``ray_id`` (``None``: it has no such job), asked
    from another process: its dashboard wants Ray's token (the local Ray runs with token auth),
    and this process's Ray auth mode must stay unset for the other tests' clusters."""
    code = ("import sys; from kdray.service.ray_jobs import RayJobs; "
            "print(RayJobs(sys.argv[1]).status(sys.argv[2]))")
    res = subprocess.run([sys.executable, "-c", code, f"http://127.0.0.1:{service.dashboard.port}", ray_id],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def driver_running(job_id: str) -> bool:
    return any(f"--job-id {job_id}" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def open_streams(url: str, job_id: str, n: int, during) -> tuple[Any, int]:
    """``n`` pages following the job: server-sent event streams from its latest event on (as
    an EventSource reconnecting with Last-Event-ID), all open at once and read as they come,
    while ``during()`` runs on another connection. Returns what it returned, and the bytes the
    streams received meanwhile."""
    import asyncio

    async def scenario():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            last = (await client.get(f"/v1/jobs/{job_id}/events", params={"limit": 10000})).json()["events"][-1]["seq"]
            streams = await asyncio.gather(*(client.send(client.build_request(
                "GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"}, headers={"Last-Event-ID": str(last)}),
                stream=True) for _ in range(n)))
            received = [0]

            async def read(stream):
                async for chunk in stream.aiter_bytes():
                    received[0] += len(chunk)

            readers = [asyncio.create_task(read(s)) for s in streams]
            try:
                assert [s.status_code for s in streams] == [200] * n
                return await asyncio.to_thread(during), received[0]
            finally:
                for task in readers:
                    task.cancel()
                for s in streams:
                    await s.aclose()

    return asyncio.run(scenario())


def test_cancel_stops_the_ray_job(service, tmp_path):
    with service.http() as client:
        # The toy dataset's own responses: no generation pool before the training this is about.
        job_id = client.post("/v1/jobs", json=job_spec("cancelled", 500, response_source="dataset")).json()["id"]
        try:
            _follow_with_200_pages_then_cancel(service, client, job_id)
        finally:  # a failure above must not leave a 500-step job holding the service's one slot
            client.post(f"/v1/jobs/{job_id}/cancel")
    deadline = time.monotonic() + 60
    while driver_running(job_id):  # Ray Jobs stopped the `kdray run` process
        assert time.monotonic() < deadline, "the job's driver still runs"
        time.sleep(1)
    _delete_through_the_cli(service, job_id, tmp_path)


def _delete_through_the_cli(service, job_id: str, cwd: Path) -> None:
    """`kdray delete` of an ended job: Ray's job table, its record and events, and the spec the
    service saved go; its output directory stays."""
    with service.http() as client:
        out = Path(client.get(f"/v1/jobs/{job_id}").json()["output_dir"])
        assert client.get(f"/v1/jobs/{job_id}/events").json()["events"]
    assert ray_job_status(service, f"kdray-{job_id}") in ("STOPPED", "RUNNING")
    deadline = time.monotonic() + 60
    while True:  # Ray may say RUNNING for a moment after the driver stopped: the service refuses (409) until it ends
        res = kdray("delete", job_id, "--server", service.url, cwd=cwd)
        if res.returncode == 0 or "Ray still runs it" not in res.stderr or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert res.returncode == 0 and f"{job_id}: deleted (its output directory stays: {out})" in res.stdout, res.stderr
    with service.http() as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/events").status_code == 404
    assert ray_job_status(service, f"kdray-{job_id}") == "None"  # gone from Ray's job table too
    assert not (service.state_dir / "jobs" / job_id).exists() and (out / "events.jsonl").is_file()
    again = kdray("delete", job_id, "--server", service.url, cwd=cwd)
    assert again.returncode == 2 and f"no job '{job_id}'" in again.stderr, again.stderr


def _follow_with_200_pages_then_cancel(service, client: httpx.Client, job_id: str) -> None:
    wait_for(client, job_id, lambda j: j["phase"] == "train" and (j["step"] or 0) >= 1)
    assert driver_running(job_id)
    res = client.delete(f"/v1/jobs/{job_id}")  # a running job stays
    assert res.status_code == 409 and "cancel it first" in res.json()["error"], res.text

    # 200 pages following the training job through Ray Serve: health still answers (well within
    # a 10 s timeout: a stream holding the event loop would hold it for the job's whole run; how
    # fast it answers is the host's business, not this test's) and a submit goes through
    # (queued: --max-running-jobs 1); it is cancelled at once.
    def health_and_submit():
        for _ in range(5):
            assert client.get("/healthz", timeout=10).status_code == 200
            time.sleep(0.5)  # a few training steps' events reach the pages meanwhile
        res = client.post("/v1/jobs", json=job_spec("behind-streams", 2))
        assert res.status_code == 201 and res.json()["state"] == "queued", res.text
        cancelled = client.post(f"/v1/jobs/{res.json()['id']}/cancel").json()
        assert cancelled["state"] == "cancelled", cancelled

    _, received = open_streams(service.url, job_id, 200, health_and_submit)
    assert received > 0  # the training job's new events reached the pages meanwhile
    res = client.post(f"/v1/jobs/{job_id}/cancel")
    assert res.status_code == 202 and res.json()["state"] in ("cancelling", "cancelled")
    job = wait_for(client, job_id, lambda j: j["state"] == "cancelled", timeout=120)
    assert job["step"] < 500


def test_records_survive_a_service_restart_and_a_lost_job_shows_its_true_state(service):
    with service.http() as client:
        before = {j["id"]: j for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        running = client.post("/v1/jobs", json=job_spec("orphaned", 500)).json()["id"]
        wait_for(client, running, lambda j: j["phase"] not in (None, "prepare"))  # its plan is in its log
        # --max-running-jobs 1: the next job waits in the queue; one into the same output_dir is refused.
        waiting = client.post("/v1/jobs", json=job_spec("waiting", 500)).json()
        assert waiting["state"] == "queued" and waiting["queue_position"] == 1, waiting
        clash = client.post("/v1/jobs", json=dict(job_spec("clash", 2), output_dir="orphaned"))
        assert clash.status_code == 409 and clash.json()["owner"] == running, clash.json()
    service.kill()  # the service and its local Ray (with the running job) die
    service.start()
    with service.http() as client:
        after = {j["id"]: j for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert set(before) | {running, waiting["id"]} == set(after)
        for job_id, job in before.items():
            assert after[job_id]["state"] == job["state"] and after[job_id]["created"] == job["created"]
        lost = wait_for(client, running, lambda j: j["state"] == "failed", timeout=60)
        assert "no longer knows this job" in lost["error"]
        # Ray's new cluster never had the job: its log is the copy the service kept
        kept = client.get(f"/v1/jobs/{running}/logs")
        assert kept.status_code == 200 and "optimizer steps" in kept.text, kept.text[-2000:]
        assert client.delete(f"/v1/jobs/{running}").json()["deleted"]
        assert not (service.state_dir / "jobs" / running).exists()  # the copy went with the job
        # The queue outlived the service: its job starts once the lost one's slot is free.
        wait_for(client, waiting["id"], lambda j: j["state"] == "running", timeout=180)
        assert client.post(f"/v1/jobs/{waiting['id']}/cancel").status_code == 202
        wait_for(client, waiting["id"], lambda j: j["state"] == "cancelled", timeout=120)


def test_haproxys_admin_socket_is_out_of_other_users_reach(service):
    """The service's HAProxy (its default ingress) keeps its config and admin socket in a folder
    of mode 700 (kdray.service.ingress.private_haproxy_dir), not Ray's shared /tmp/haproxy-serve."""
    import stat

    family = psutil.Process(service.proc.pid).children(recursive=True)
    haproxies = [p for p in family if p.name() == "haproxy"]
    assert haproxies, [p.name() for p in family]
    for proc in haproxies:
        private = haproxy_folder(proc)
        assert private.name.startswith("kdray-hap-") and stat.S_IMODE(private.stat().st_mode) == 0o700, private
        assert len(list(private.glob("*/admin.sock"))) == 1


def haproxy_folder(proc: psutil.Process) -> Path:
    """The folder of a HAProxy process's files: its config's, above the one Ray names after the node."""
    cmdline = proc.cmdline()
    return Path(cmdline[cmdline.index("-f") + 1]).parents[1]


def test_the_token_is_in_no_log_and_no_answer(service):
    """Last in the module, after every job above: the API token appears in no answer (an error
    included) and in no log: the service's own, and every log of its Ray sessions (Serve's
    controller, proxy and replica, the jobs' drivers and workers)."""
    with service.http() as client, service.http(token="wrong-" + TOKEN[:4]) as wrong:
        answers = [wrong.post("/v1/jobs/x/cancel"), wrong.post("/v1/jobs", json=job_spec("t", 1)), wrong.delete("/v1/jobs/x"),
                   client.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),
                   client.get("/v1/jobs/nope"), client.get("/v1/jobs", params={"state": "x"}),
                   client.get("/v1/jobs"), client.get("/healthz"), client.get("/")]
    assert [a.status_code for a in answers] == [401, 401, 401, 422, 404, 422, 200, 200, 200]
    assert not [a.request.url for a in answers if TOKEN in a.text]
    logs = [p for p in service.state_dir.parent.glob("serve-*.log")]
    logs += list(service.state_dir.glob("jobs/*/driver.log"))  # the service's copies of its drivers' logs
    logs += [p for p in service.ray_tmp.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt")]
    assert len(logs) > 20 and any("job-driver" in p.name for p in logs), logs  # the jobs' logs are among them
    assert any(p.name == "driver.log" and p.stat().st_size for p in logs), logs  # and the service's copies
    assert not [str(p) for p in logs if TOKEN in p.read_text(encoding="utf-8", errors="replace")]
    # Nor the environment of its Ray's processes (the jobs' drivers and workers run the users'
    # code), though this start of the service took it from KDRAY_API_TOKEN.
    family = psutil.Process(service.proc.pid).children(recursive=True)
    assert len(family) > 5
    assert not [p.pid for p in family if _environ_holds(p, TOKEN)]


def _environ_holds(proc: psutil.Process, text: str) -> bool:
    try:
        return text in Path(f"/proc/{proc.pid}/environ").read_text(errors="replace")
    except (OSError, psutil.Error):  # gone meanwhile
        return False
