"""kdray's Python API (kdray/api.py): what `import kdray` offers, the command line's own path."""

from __future__ import annotations

import json

import pytest
import yaml

import kdray
from kdray.errors import KdrayError, SpecError
from tests.test_e2e import REPO
from tests.test_report import make_job


def _demo() -> dict:
    return yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())


def test_validate_takes_a_path_a_dict_or_a_jobspec_and_returns_the_resolved_spec(toy_world):
    from kdray.spec import JobSpec

    spec = kdray.validate(REPO / "jobs" / "demo.yaml")
    assert isinstance(spec, JobSpec) and spec.teacher.model == "toy:teacher"
    assert kdray.validate(_demo()) == spec == kdray.validate(spec)


def test_a_jobspec_changed_with_model_copy_is_validated_again(toy_world):
    """pydantic's model_copy(update=...) validates nothing: validate checks the fields of the
    spec it is given as it checks a file's, so an updated field is checked, and a section
    replaced by a mapping becomes that section (its other fields at their defaults)."""
    spec = kdray.validate(REPO / "jobs" / "demo.yaml")
    with pytest.raises(SpecError) as err:
        kdray.validate(spec.model_copy(update={"name": "Demo B!", "output_dir": "s3://bucket/x"}))
    assert {field for field, _ in err.value.errors} == {"name", "output_dir"}
    assert kdray.validate(spec.model_copy(update={"training": {"lr": 1e-4}})).training.lr == 1e-4


def test_validate_checks_the_training_workers_memory_budget_as_the_command_line_does(tmp_path, toy_world):
    """``training.gpu_memory_gb`` below the estimate of a worker's memory: a SpecError from
    ``kdray.validate`` too (it was the command line's own check), naming the spec's file."""
    spec = _demo()
    spec["training"].update(use_gpu=True, gpu_memory_gb=0.0001)
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as err:
        kdray.validate(tmp_path / "gpu.yaml")
    [(field, message)] = err.value.errors
    assert field == "training.gpu_memory_gb" and "a training worker may need" in message
    assert f"in {tmp_path / 'gpu.yaml'}" in str(err.value)


def test_validate_names_a_lora_layer_a_local_student_lacks(toy_world):
    """A typo in training.lora.target_modules, found by validate on the student's skeleton (the
    job found it only once it started)."""
    spec = _demo()
    spec["training"]["lora"] = {"r": 4, "target_modules": ["qproj"]}
    with pytest.raises(SpecError) as err:
        kdray.validate(spec)
    [(field, message)] = err.value.errors
    assert field == "training.lora.target_modules" and message.startswith("['qproj'] match no linear layer")
    spec["training"]["lora"]["target_modules"] = ["q_proj"]
    assert kdray.validate(spec).training.lora.target_modules == ["q_proj"]


def test_validate_names_every_bad_field_and_the_source():
    bad = _demo()
    bad["training"]["lr"] = -1
    bad["student"]["model"] = "/nonexistent/student"
    with pytest.raises(SpecError) as err:
        kdray.validate(bad)
    text = str(err.value)
    assert "training.lr" in text and "spec" in text
    with pytest.raises(SpecError, match="expected a path, a dict or a JobSpec, got int"):
        kdray.validate(42)


def test_validate_reads_the_field_names_of_a_local_datasets_first_row(tmp_path, toy_world):
    """A misnamed field failed a job after its Ray Data stage read every row; validate now
    names it from the first row of a JSONL file or a parquet file's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "a", "promt": "p", "response": "r"}) + "\n")
    pq.write_table(pa.table({"uid": ["a"], "prompt": ["p"], "answer": ["r"]}), tmp_path / "heldout.parquet")
    spec = _demo()
    spec["data"].update(train=str(tmp_path / "train.jsonl"), heldout=str(tmp_path / "heldout.parquet"))
    with pytest.raises(SpecError) as err:
        kdray.validate(spec)
    errors = err.value.errors
    assert [f for f, _ in errors] == ["data.prompt_field", "data.id_field", "data.response_field"], errors
    assert f"the first row of {tmp_path / 'train.jsonl'} (data.train) has no field 'prompt'; its fields are id, " \
           "promt, response" in errors[0][1]
    assert "(one name for both splits)" in errors[0][1] and "(data.heldout) has no field 'id'" in errors[1][1] and "or null to number the rows" in errors[1][1]
    assert "(data.heldout) has no field 'response'; its fields are uid, prompt, answer" in errors[2][1]
    spec["data"]["on_bad_rows"] = "skip"  # a first row without a field may be one the job drops
    kdray.validate(spec)
    spec["data"].update(prompt_field="promt", id_field=None, response_field="response", on_bad_rows="fail")
    spec["evaluation"] = {"enabled": False}  # the held-out rows then need no response
    spec["data"]["heldout"] = str(tmp_path / "train.jsonl")
    assert kdray.validate(spec).data.prompt_field == "promt"
    spec["output_dir"] = str(tmp_path / "train.jsonl" / "run")  # under a file: no directory can be made there
    with pytest.raises(SpecError, match=r"output_dir: .*train.jsonl is a file, so .*run cannot be the job's directory"):
        kdray.validate(spec)
    (tmp_path / "train.jsonl").write_text("{not json\n")
    with pytest.raises(SpecError, match="line 1 is not valid JSON"):
        kdray.validate(spec)
    (tmp_path / "train.jsonl").write_text(json.dumps([{"id": "a", "promt": "p"}], indent=1))  # a .json array
    with pytest.raises(SpecError, match="is one JSON array, not JSON lines: write one object per line"):
        kdray.validate(spec)


def test_validate_refuses_a_local_model_its_vllm_pool_would_not_run(tmp_path, toy_world):
    """A head size vLLM's CPU attention lacks, or a max_model_len over the model's positions:
    checked for the pools the job runs the model in (the student's only when it goes through one)."""
    import shutil

    from kdray.models import resolve_model

    student = tmp_path / "student"
    shutil.copytree(resolve_model("toy:student"), student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "head_dim": 16, "max_position_embeddings": 100}))
    spec = _demo()
    spec["student"]["model"] = str(student)
    with pytest.raises(SpecError) as err:
        kdray.validate(spec)
    [(field, message)] = err.value.errors
    assert field == "student.max_model_len" and "max_model_len 128 is over the 100 positions" in message
    spec["student"]["max_model_len"] = 100
    with pytest.raises(SpecError, match="student.model: model .* has attention heads of 16 dimensions"):
        kdray.validate(spec)
    spec["evaluation"] = {"enabled": False}  # the student then goes through no pool
    assert kdray.validate(spec).student.model == str(student)


def test_run_refuses_a_bad_spec_or_output_dir_before_any_work(tmp_path):
    bad = _demo()
    bad["objective"]["kind"] = "no_such_loss"
    with pytest.raises(SpecError, match="objective"):
        kdray.run(bad)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    spec = dict(_demo(), output_dir=str(blocked / "out"))
    with pytest.raises(SpecError, match="output_dir"):
        kdray.run(spec)
    assert not (blocked.parent / "out").exists()


def test_a_report_loads_typed_from_a_job_directory(tmp_path):
    job = make_job(tmp_path, "fkl", rounds=(1,))
    report = kdray.Report.load(job)
    assert report.name == "fkl" and report.status == "succeeded" and report.output_dir == job
    assert list(report.evaluation) == ["teacher", "student_before", "student_round_1", "student_after"]
    after = report.evaluation["student_after"]
    assert (after.rouge_l, after.exact_match, after.n) == (0.4841, 0.3175, 400)
    assert report.timings_s["train"] == 50.0 and [m["step"] for m in report.train_metrics] == list(range(1, 7))
    assert report.student_dir == job / "student" and report.data == json.loads((job / "report.json").read_text())
    assert kdray.Report.load(job / "report.json") == report
    with pytest.raises(KdrayError, match="run the job first"):
        kdray.Report.load(tmp_path / "nothing-here")


def test_a_failed_job_leaves_its_error_in_its_output_directory(tmp_path, monkeypatch):
    """The terminal says why a job failed, and so does its directory afterwards: events.jsonl
    ends with the error, which kdray report / compare / Report.load give for a job without a
    report.json (they said "run the job first" of a job that had run). A run refused because the
    directory holds another job's work leaves that job's events as they were."""
    from kdray.errors import DataError
    from kdray.pipeline.job import Job
    from kdray.pipeline.state import JobState
    from kdray.spec import parse_spec

    spec = _demo()
    spec["output_dir"] = str(tmp_path / "out")

    def fails(self, state, trackers):  # a stage's failure, without starting Ray
        self.reporter.message("prepare: reading")
        raise DataError("data.train: 3 of 3 rows are bad")

    monkeypatch.setattr(Job, "_stages", fails)
    with pytest.raises(DataError):
        kdray.run(spec, progress=False)
    events = tmp_path / "out" / "events.jsonl"
    last = json.loads(events.read_text().splitlines()[-1])
    assert last["kind"] == "job_failed" and last["error"] == "data.train: 3 of 3 rows are bad"
    with pytest.raises(KdrayError, match=r"has no report.json: its job failed \(data.train: 3 of 3 rows are bad\); "
                                         "fix that and run it again"):
        kdray.Report.load(tmp_path / "out")

    # A user's error that reached the driver inside another (Ray's, for one raised on a worker) is
    # recorded as the user's message, not as the wrapper's first line.
    def wrapped(self, state, trackers):
        raise RuntimeError("a task failed") from DataError("row 7 of train.jsonl has no prompt")

    monkeypatch.setattr(Job, "_stages", wrapped)
    with pytest.raises(RuntimeError):
        kdray.run({**spec, "output_dir": str(tmp_path / "wrapped")}, progress=False)
    last = json.loads((tmp_path / "wrapped" / "events.jsonl").read_text().splitlines()[-1])
    assert last["error"] == "row 7 of train.jsonl has no prompt", last

    # Stopped (Ctrl-C; SIGTERM, which Ray's handler in a driver turns into SystemExit(15)): said so.
    for stop in (KeyboardInterrupt(), SystemExit(15)):
        def stops(self, state, trackers, stop=stop):
            raise stop

        monkeypatch.setattr(Job, "_stages", stops)
        with pytest.raises(type(stop)):
            kdray.run({**spec, "output_dir": str(tmp_path / "stopped")}, progress=False)
        last = json.loads((tmp_path / "stopped" / "events.jsonl").read_text().splitlines()[-1])
        assert last["kind"] == "job_stopped", last
        with pytest.raises(KdrayError, match=r"has no report.json: its job was stopped before it finished .*run it "
                                             r"again \(it resumes\)"):
            kdray.Report.load(tmp_path / "stopped")

    other = parse_spec({**spec, "training": {**spec["training"], "lr": 0.5}})
    JobState.open(tmp_path / "out", other, restart=True).run_name(0, "x")  # another job's work is there now
    before = events.read_text()
    with pytest.raises(KdrayError, match="differs in: training.lr"):
        kdray.run(spec, progress=False)
    assert events.read_text() == before
