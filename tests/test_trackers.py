"""Experiment trackers (kdray/report/trackers.py) through the real libraries, read back with each
one's own reader: TensorBoard's event accumulator, an MLflow server on loopback (SQLite store,
started here from ``make mlflow-server``'s venv) queried with MlflowClient, and W&B's offline
run files. The job-level check (every step of a killed and resumed job, against report.json)
is in tests/test_e2e.py; the helpers here serve both."""

from __future__ import annotations

import json
import random
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kdray.bench.service import free_port as _free_port
from kdray.report.trackers import Trackers
from kdray.spec import parse_spec
from tests.specs import errors_of, minimal

REPO = Path(__file__).resolve().parents[1]
MLFLOW = REPO / ".venv-mlflow" / "bin" / "mlflow"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of an MLflow tracking server with a SQLite store and its
    artifact proxy, for the module."""
    if not MLFLOW.exists():
        pytest.skip(f"no MLflow server at {MLFLOW}: run `make mlflow-server` (make test does)")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as res:
                if res.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` as TensorBoard shows the directory (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def mlflow_history(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """``{metric: {step: the value logged last at that step}}`` of an MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            out.setdefault(key, {})[m.step] = m.value
    return out


def wandb_runs(wandb_dir: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(run id, history rows)]`` of the offline runs under ``wandb_dir``, oldest first: the
    ``run-ID.wandb`` files read as W&B writes them (blocks of 32 KiB holding records of a 7-byte
    header, CRC, length and type, whose payloads are ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for run_file in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        data = run_file.read_bytes()
        assert data[:4] == b":W&B", run_file
        pos, rows, buf = 7, [], b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind == 0 or len(chunk) < length:  # the end, or a record cut short by a kill
                break
            buf = chunk if kind in (1, 2) else buf + chunk  # full / first, else middle / last
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        runs.append((run_file.stem.removeprefix("run-"), rows))
    return runs


def wandb_steps(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    """``{train/step: the value logged last}`` of ``key`` in W&B history rows."""
    return {int(r["train/step"]): r[key] for r in rows if key in r}


def _spec(tmp_path: Path, uri: str | None):
    tracking = {"tensorboard": {}, "wandb": {"project": "kdray-test", "mode": "offline"}}
    if uri:
        tracking["mlflow"] = {"tracking_uri": uri, "experiment": f"units-{random.randrange(10**9)}"}
    return parse_spec(minimal(output_dir=str(tmp_path / "out"), tracking=tracking))


def _step(step: int, loss: float) -> dict[str, Any]:
    return {"kind": "train_step", "time": 0.0, "step": step, "loss": loss, "lr": 0.1 * step, "checkpoint": True}


def test_a_tracker_whose_library_is_missing_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    errors = errors_of(minimal(tracking={"wandb": {"project": "p"}, "tensorboard": {}}))
    assert errors == {"tracking": "wandb needs the wandb package: pip install 'kdray[wandb]'"}
    assert "mlflow.tracking_uri" in "".join(errors_of(minimal(tracking={"mlflow": {}})))


def test_every_tracker_gets_the_steps_and_a_resumed_run_continues_the_same_runs(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    spec = _spec(tmp_path, mlflow_server)
    out = tmp_path / "out"
    messages: list[str] = []
    first = Trackers(spec, out, resumed=False, history=[], message=messages.append)
    for step in (1, 2, 3):
        first(_step(step, 1.0 / step))
    first({"kind": "phase_start", "phase": "train"})  # not a metric: ignored
    saved = json.loads((out / "state" / "trackers.json").read_text())
    assert saved["last_step"] == 3 and set(saved["runs"]) == {"tensorboard", "mlflow", "wandb"}
    first.finish("KILLED")  # a run that ended early

    # The resumed run: step 4 was recorded in events.jsonl but never sent (the driver died
    # between the two); then the restored workers train steps 3 and 4 again, and 5.
    second = Trackers(spec, out, resumed=True, history=[_step(s, 1.0 / s) for s in (1, 2, 3, 4)],
                      message=messages.append)
    for step, loss in ((3, 0.3), (4, 0.25), (5, 0.2)):
        second(_step(step, loss))
    second({"kind": "evaluation", "model": "student_after", "scores": {"rougeL": 0.5, "n": 48}})
    (out / "report.md").write_text("# report\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(out / "loss.png")
    second.report([out / "report.md", out / "loss.png"])
    second.finish("FINISHED")
    assert messages == []
    want = {1: 1.0, 2: 0.5, 3: 0.3, 4: 0.25, 5: 0.2}

    tb = tensorboard_scalars(out / "tensorboard")
    assert tb["train/loss"] == pytest.approx(want) and tb["eval/student_after/rougeL"] == {5: pytest.approx(0.5)}
    assert "train/checkpoint" not in tb and "train/step" not in tb

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(spec.tracking.mlflow.experiment).experiment_id])
    assert run.info.run_id == saved["runs"]["mlflow"] and run.info.status == "FINISHED"
    history = mlflow_history(mlflow_server, run.info.run_id)
    assert history["train/loss"] == pytest.approx(want) and history["train/lr"][5] == pytest.approx(0.5)
    assert history["eval/student_after/n"] == {5: 48.0}
    assert run.data.params["training.lr"] == str(spec.training.lr) and run.data.params["name"] == "t"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/report.md", "report/loss.png"}

    # W&B: offline runs cannot be resumed, so the second run is a second directory with the same
    # id, holding the whole history.
    (id1, rows1), (id2, rows2) = wandb_runs(out / "wandb")
    assert id1 == id2 == saved["runs"]["wandb"]
    assert wandb_steps(rows1, "train/loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert wandb_steps(rows2, "train/loss") == pytest.approx(want)
    assert any(r.get("eval/student_after/rougeL") == 0.5 for r in rows2)
    second_dir = sorted((out / "wandb").glob("offline-run-*"))[-1]
    saved_files = {p.name: p for p in (second_dir / "files" / "report").iterdir()}
    assert set(saved_files) == {"loss.png", "report.md"}  # copies, not links into the job's directory
    assert not any(p.is_symlink() for p in saved_files.values()) and saved_files["report.md"].read_text() == "# report\n"


def test_a_tracker_that_cannot_start_fails_before_any_work(tmp_path):
    from kdray.errors import ConfigError

    spec = _spec(tmp_path, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match=r"tracking\.mlflow did not start: .*check tracking\.mlflow in the spec "
                                          r"\(tracking_uri must reach a running MLflow server\)"):
        Trackers(spec, tmp_path / "out", resumed=False, history=[], message=print)
