"""One way to fail: every error a user can cause is a KdrayError naming the file, row, field or
node and the fix; the CLI prints it without a traceback and exits 2; the service answers 4xx
(503 when Ray is down); anything else is a kdray bug (a traceback and exit 1, or a 500)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kdray.data.datasets import load_split, read_rows
from kdray.data.records import (check_layout, check_record_lengths, decode_signal, read_signal_records,
                                signal_tensors, write_signal_records)
from kdray.errors import (ClusterError, DataError, KdrayError, ModelError, RecordsError, SpecError,
                          user_error)
from kdray.spec import DataSpec

TOPK = {"mode": "topk", "k": 4, "vocab_size": 10, "id_dtype": "<u2", "teacher": "toy:teacher"}


def words(prompts):
    return [len(p.split()) for p in prompts]


def spec_for(train, heldout=None, **kw):
    return DataSpec(train=str(train), heldout=str(heldout or train), **kw)


# -- datasets ------------------------------------------------------------------------------------

def test_a_bad_jsonl_line_names_the_split_the_file_and_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1", "prompt": "p", "response": "r"}\n{"id": 2, prompt}\n')
    with pytest.raises(DataError) as info:
        load_split(spec_for(path), "train", words, need_response=True)
    assert str(info.value).startswith(f"data.train: {path}: line 2 is not valid JSON")
    assert "fix or remove it" in str(info.value)


def test_a_non_utf8_line_and_a_json_array_say_what_to_write(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2 is not UTF-8 text .*save the file as UTF-8"):
        read_rows(str(path))
    path.write_text('[{"prompt": "a"}]\n')
    with pytest.raises(DataError, match=r"line 1 is a list, not a JSON object; write one object per line"):
        read_rows(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a byte-order mark is fine"}\n')
    assert read_rows(str(path)) == [{"prompt": "a byte-order mark is fine"}]


def test_a_data_file_gone_since_validation_names_the_split_and_the_path(tmp_path):
    missing = tmp_path / "gone.jsonl"
    missing.write_text('{"prompt": "p"}\n')
    spec = spec_for(missing)
    missing.unlink()
    with pytest.raises(DataError) as info:
        load_split(spec, "heldout", words, need_response=False)
    assert f"data.heldout: dataset '{missing}' does not exist" in str(info.value)


def test_a_missing_column_names_the_field_and_the_fields_the_rows_have(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "question": "q", "answer": "a"}) + "\n" for i in range(3)))
    with pytest.raises(DataError) as info:
        load_split(spec_for(path), "train", words, need_response=False)
    msg = str(info.value)
    assert "3 rows without prompt field 'prompt'" in msg and "the rows have the fields answer, id, question" in msg
    assert "data.prompt_field" in msg and "on_bad_rows" not in msg  # skipping every row is no way out
    with pytest.raises(DataError, match="none of its 3 rows is usable"):
        load_split(spec_for(path, on_bad_rows="skip"), "train", words, need_response=False)
    # One bad row of another kind: skipping it is a way out, and no field name is wrong.
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in (("a", "q"), ("b", " "), ("c", "q"))))
    with pytest.raises(DataError) as info:
        load_split(spec_for(path), "train", words, need_response=False)
    msg = str(info.value)
    assert "1 of 3 rows are bad" in msg and "or set data.on_bad_rows: skip" in msg and "prompt_field" not in msg, msg


def test_corrupt_parquet_and_saved_dataset_files_are_data_errors(tmp_path):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"{bad} is not a readable parquet file"):
        read_rows(str(bad))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text('{"no": "files"}')
    with pytest.raises(DataError, match=r"state.json is not a datasets state file .*save_to_disk"):
        read_rows(str(saved))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (saved / "data.arrow").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*data.arrow, a data file of the saved dataset"):
        read_rows(str(saved))


# -- teacher records -----------------------------------------------------------------------------

def _records(path: Path, meta=TOPK) -> Path:
    ids = np.tile(np.arange(4), (3, 1))
    write_signal_records(path, ["a#0"], [{"topk_ids": ids, "topk_logprobs": np.log(np.full((3, 4), 0.2))}], meta)
    return path


def test_a_missing_or_corrupt_records_file_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "records" / "teacher-topk.parquet"
    with pytest.raises(RecordsError, match=rf"{missing} does not exist; run the job with --restart"):
        read_signal_records(missing)
    cut = _records(tmp_path / "cut.parquet")
    cut.write_bytes(cut.read_bytes()[:50])
    with pytest.raises(RecordsError, match=rf"{cut} is not a readable parquet file .*--restart"):
        read_signal_records(cut)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"key": ["a"]}), plain)
    with pytest.raises(RecordsError, match="not a kdray teacher-signal file"):
        read_signal_records(plain)


def test_records_of_another_layout_or_other_data_are_refused(tmp_path):
    path = _records(tmp_path / "r.parquet")
    meta, stored = read_signal_records(path)
    check_layout(meta, {"mode": "topk", "teacher": "toy:teacher", "vocab_size": 10, "k": 4})
    with pytest.raises(RecordsError) as info:
        check_layout(meta, {"mode": "topk", "teacher": "toy:teacher", "vocab_size": 10, "k": 8})
    assert str(path) in str(info.value) and "k 4 (this job: 8)" in str(info.value)
    row = dict(stored["a#0"], topk_ids=stored["a#0"]["topk_ids"][:-2])  # a record cut short
    with pytest.raises(RecordsError, match=r"r.parquet: a record of 3 tokens holds 22 bytes of topk_ids, not 24"):
        decode_signal(row, meta)
    with pytest.raises(RecordsError, match=r"r.parquet: a record of 3 tokens holds 22 bytes of topk_ids, not 24"):
        signal_tensors([row], [1], 6, meta)  # as a worker's collate reads it
    with pytest.raises(RecordsError, match=r"r.parquet: the teacher record of row 0 covers 3 .* labels 4"):
        check_record_lengths([stored["a#0"]["n_tokens"]], [4], meta)
    # a file without the layout a mode needs
    broken = tmp_path / "broken.parquet"
    table = pq.read_table(path)
    bad_meta = {**json.loads(table.schema.metadata[b"kdray.signal"]), "mode": "hidden"}
    pq.write_table(table.replace_schema_metadata({b"kdray.signal": json.dumps(bad_meta).encode()}), broken)
    with pytest.raises(RecordsError, match=r"not a complete teacher-signal file \(mode 'hidden', missing "
                                           r"hidden_size, hidden_dtype, hidden\)"):
        read_signal_records(broken)


# -- models --------------------------------------------------------------------------------------

def test_a_model_path_that_does_not_exist_is_a_model_error_naming_it_and_the_node():
    from kdray.models import load_causal_lm, load_tokenizer, vocab_size
    from kdray.errors import node

    for load in (load_tokenizer, vocab_size, lambda ref: load_causal_lm(ref, "float32")):
        with pytest.raises(ModelError) as info:
            load("/nonexistent/model")
        msg = str(info.value)
        assert "'/nonexistent/model'" in msg and f"on node {node()}" in msg and "save_pretrained" in msg


def test_a_model_directory_without_weights_or_with_corrupt_ones(tmp_path, toy_world):
    from kdray.models import check_model_files, load_causal_lm, load_output_head, resolve_model

    noweights = tmp_path / "noweights"
    shutil.copytree(resolve_model("toy:student"), noweights)
    (noweights / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"has no weights \(none of model.safetensors"):
        check_model_files(str(noweights))
    check_model_files("toy:student")
    notok = tmp_path / "notok"  # the tokenizer left behind: a worker's load failed with transformers' words
    shutil.copytree(resolve_model("toy:student"), notok)
    for f in notok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    with pytest.raises(ModelError, match=r"has no tokenizer \(tokenizer.json, .*save it there too"):
        check_model_files(str(notok))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(resolve_model("toy:teacher"), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match=r"cannot load the weights of model .*corrupt.*SafetensorError"):
        load_causal_lm(str(corrupt), "float32")
    with pytest.raises(ModelError, match=r"cannot load the lm_head from model.safetensors of model"):
        load_output_head(str(corrupt), "float32")


def test_mismatched_tokenizers_are_a_model_error_naming_both_models(tmp_path, toy_world):
    from kdray.models import resolve_model, shared_vocab_size
    from kdray.toy.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(resolve_model("toy:student"), other)
    train_tokenizer(["unrelated words " * 40, "more 456"], vocab_size=300).save_pretrained(other)
    with pytest.raises(ModelError) as info:
        shared_vocab_size("toy:teacher", str(other))
    msg = str(info.value)
    assert "teacher.model 'toy:teacher'" in msg and f"student.model '{other}'" in msg and "same tokenizer" in msg


# -- errors that crossed Ray, the disk, the cluster ----------------------------------------------

RAY_TEXT = """\x1b[36mray::MapWorker(MapBatches(VLLMGenerator)).__init__()\x1b[39m (pid=1, ip=10.0.0.7, actor_id=ab)
  File "/x/kdray/pools/vllm.py", line 40, in start_engine
    raise ModelError(
kdray.errors.ModelError: vLLM could not start model 'org/m' on node w1 (ValueError: no); use backend: hf

The above exception was the direct cause of the following exception:

ray.exceptions.UserCodeException: UDF failed to process a data block."""


def test_user_error_rebuilds_a_kdray_error_from_a_ray_workers_traceback():
    class FakeRayError(Exception):  # Ray Data keeps only the worker's traceback text
        __module__ = "ray.exceptions"

    found = user_error(FakeRayError(RAY_TEXT))
    assert type(found) is ModelError
    assert str(found) == ("vLLM could not start model 'org/m' on node w1 (ValueError: no); use backend: hf "
                          "(raised on the Ray worker at 10.0.0.7)")
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = DataError("inner")
    assert str(user_error(wrapped)) == "inner"
    assert user_error(RuntimeError("a kdray bug")) is None
    assert user_error(RuntimeError(RAY_TEXT)) is None  # only Ray's errors carry a worker's traceback
    assert user_error(FakeRayError("Traceback ...\nTypeError: a kdray bug on a worker")) is None
    handled_badly = ("kdray.errors.DataError: row 3\n\nDuring handling of the above exception, another exception "
                     "occurred:\n\nTraceback ...\nNameError: a bug in the handler")
    assert user_error(FakeRayError(handled_badly)) is None


ENGINE_TEXT = """The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker(MapBatches(vLLMEngineStageUDF)).__init__()\x1b[39m (pid=7, ip=10.0.0.9, actor_id=cd, repr=MapWorker(MapBatches(vLLMEngineStageUDF)))
  File "/v/ray/llm/_internal/batch/stages/vllm_engine_stage.py", line 657, in __init__
    self.llm = vLLMEngineWrapper(
  File "/v/vllm/engine/arg_utils.py", line 1955, in create_model_config
    return ModelConfig(
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (100000) is greater than the derived max_model_len
    For further information visit https://errors.pydantic.dev/2.14/v/value_error"""


def test_user_error_names_a_vllm_engine_of_rays_processor_that_did_not_start():
    """Ray's batch LLM processor starts vLLM in Ray's own actor: the engine's error and the node
    become a ModelError (the text is a real one, shortened)."""
    class FakeRayError(Exception):
        __module__ = "ray.exceptions"

    found = user_error(FakeRayError(ENGINE_TEXT))
    assert type(found) is ModelError
    msg = str(found)
    assert msg.startswith("vLLM could not start a generation pool's model on the Ray worker at 10.0.0.9 "
                          "(ValidationError: 1 validation error for ModelConfig Value error, User-specified "
                          "max_model_len (100000) is greater than the derived max_model_len")
    assert "max_model_len fits" in msg and "backend: hf" in msg
    assert user_error(FakeRayError(ENGINE_TEXT.replace("in __init__", "in generate_async"))) is None  # a bug


def test_user_error_turns_a_full_disk_into_a_cluster_error_naming_the_file():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/job/events.jsonl")
    found = user_error(full)
    assert isinstance(found, ClusterError)
    assert "/runs/job/events.jsonl" in str(found) and "No space left on device" in str(found)
    assert user_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # that one is kdray's


# -- the CLI -------------------------------------------------------------------------------------

def kdray(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kdray ARGS`` (kdray/__main__.py: the ``kdray`` command)."""
    return subprocess.run([sys.executable, "-m", "kdray", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_validate_of_a_bad_spec_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: Bad Name\nteacher: {model: /nonexistent/model}\n")
    res = kdray("validate", "bad.yaml", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "name:" in res.stderr and "teacher.model: model path '/nonexistent/model' does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_run_on_bad_data_exits_2_and_the_record_says_why(tmp_path, toy_world):
    from kdray.service.store import JobStore

    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "1", "prompt": "Q: sort 2 1\\nA:", "response": " 1 2"}\n{"id": "2", "prompt": \n')
    spec = {"name": "bad-data", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
            "student": {"model": "toy:student"}, "data": {"train": str(data), "heldout": "toy:heldout"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = JobStore(tmp_path / "kdray.db")
    job, _ = store.create(name="bad-data", spec=spec, output_dir=spec["output_dir"])
    # A node where `ray start` once ran (its address file left behind, the cluster gone): without
    # --address the job starts a Ray of its own instead of joining that one. A short directory:
    # Ray's socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kdr-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    try:
        res = kdray("run", "spec.yaml", "--store", str(tmp_path / "kdray.db"), "--job-id", job["id"], cwd=tmp_path,
                    env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "existing cluster" not in res.stderr and "127.0.0.1:9" not in res.stderr  # not joined, not refused
    assert f"data.train: {data}: line 2 is not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr
    rec = store.get(job["id"])
    assert rec["state"] == "failed" and rec["error"].startswith(f"data.train: {data}: line 2")


def test_cli_main_exits_2_for_the_users_errors_and_lets_a_bug_raise(monkeypatch, capsys):
    from kdray import cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/report.json")

    monkeypatch.setattr(cli, "cmd_validate", full_disk)
    assert cli.main(["validate", "x.yaml"]) == 2
    assert "cannot write or read /runs/x/report.json" in capsys.readouterr().err

    def bug(args):
        raise TypeError("a kdray bug")

    monkeypatch.setattr(cli, "cmd_validate", bug)
    with pytest.raises(TypeError):  # Python prints its traceback and exits 1
        cli.main(["validate", "x.yaml"])


# -- the service ---------------------------------------------------------------------------------

@pytest.fixture
def service(tmp_path):
    from fastapi.testclient import TestClient

    from kdray.service.app import ServiceConfig, build_app

    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="t",
                           dashboard_url="http://127.0.0.1:1")
    app = build_app(config)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer t"}) as client:
        client.app_ = app
        yield client


def test_bad_http_bodies_get_422_with_the_field(service):
    res = service.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert res.status_code == 422 and res.json()["errors"][0]["field"] == "(body)"
    assert "not valid JSON" in res.json()["errors"][0]["message"]
    res = service.post("/v1/jobs", content=b"name: \xff", headers={"Content-Type": "application/yaml"})
    assert res.status_code == 422 and res.json()["errors"] == [{"field": "(body)", "message": "the body is not UTF-8 text: line 1, column 7 (byte offset 6): byte 0xFF is not UTF-8"}]
    res = service.post("/v1/jobs", content=b"name: Bad Name\n", headers={"Content-Type": "application/yaml"})
    assert res.status_code == 422 and {"name", "teacher", "student", "data"} <= {e["field"] for e in res.json()["errors"]}
    assert service.post("/v1/jobs", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert service.post("/v1/jobs", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert service.get("/v1/jobs", params={"limit": "many"}).status_code == 422
    assert service.get("/v1/jobs/nope/events").status_code == 404


def test_ray_unavailable_is_a_503_and_the_record_says_why(service, toy_world):
    spec = {"name": "t", "output_dir": "t", "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student"},
            "data": {"train": "toy:train", "heldout": "toy:heldout"}}
    res = service.post("/v1/jobs", json=spec)
    assert res.status_code == 503, res.text
    body = res.json()
    assert "Ray did not accept the job" in body["error"] and "http://127.0.0.1:1" in body["error"]
    job = service.get(f"/v1/jobs/{body['id']}").json()
    assert job["state"] == "failed" and "Ray did not accept the job" in job["error"]
    assert service.get(f"/v1/jobs/{body['id']}/logs").text == ""  # never reached Ray: no log


def test_a_kdray_bug_in_a_handler_answers_500_and_a_user_error_4xx(service, caplog):
    store = service.app_.state.store

    def broken(**kw):
        raise ZeroDivisionError("division by zero")

    store.list = broken
    with caplog.at_level("ERROR", logger="kdray.service"):
        res = service.get("/v1/jobs")
    assert res.status_code == 500
    assert "ZeroDivisionError" in res.json()["error"] and "bug in kdray" in res.json()["error"]
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)  # the traceback

    def bad_data(**kw):
        raise DataError("data.train: line 3 is not valid JSON")

    store.list = bad_data
    res = service.get("/v1/jobs")
    assert res.status_code == 400 and res.json() == {"error": "data.train: line 3 is not valid JSON"}


class _FakeJobsClient:
    def __init__(self, error):
        self.error = error

    def get_job_logs(self, ray_id):
        raise self.error


def test_ray_jobs_sorts_rays_failures():
    from kdray.service.ray_jobs import RayJobs

    jobs = RayJobs("http://head:8265")
    jobs._client = _FakeJobsClient(RuntimeError("Request failed with status code 404: Job x does not exist."))
    assert jobs.logs("x") is None  # Ray forgot the job: a retry cannot help
    jobs._client = _FakeJobsClient(RuntimeError("Request failed with status code 503: busy."))
    with pytest.raises(ClusterError, match="http://head:8265 is unavailable .*retry") as info:
        jobs.logs("x")
    assert "dashboard_agent.log" not in str(info.value)
    # Ray's answer while the head's agent has no HTTP server (its port taken): where to look.
    jobs._client = _FakeJobsClient(RuntimeError("Request failed with status code 500: No available agent to submit "
                                                "job, please try again later.."))
    with pytest.raises(ClusterError, match=r"unavailable .*retry .*dashboard_agent.log .*52365, held by another"):
        jobs.logs("x")
    jobs._client = _FakeJobsClient(ConnectionError("refused"))
    with pytest.raises(ClusterError):
        jobs.logs("x")
    jobs._client = _FakeJobsClient(RuntimeError("Request failed with status code 400: bad entrypoint."))
    with pytest.raises(RuntimeError):  # a request kdray built wrongly: a bug, a 500
        jobs.logs("x")


def test_every_user_error_class_is_a_kdray_error():
    from kdray.errors import ConfigError
    from kdray.service.common import RequestError

    for cls in (SpecError, DataError, RecordsError, ModelError, ClusterError, ConfigError, RequestError):
        assert issubclass(cls, KdrayError)
