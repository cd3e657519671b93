"""What a job keeps in its output directory so that a re-run resumes it."""

from __future__ import annotations

import pytest

from kdray.errors import KdrayError
from kdray.pipeline.state import JobState
from kdray.spec import parse_spec


def spec_of(tmp_path, **training):
    return parse_spec({"name": "t", "output_dir": str(tmp_path), "teacher": {"model": "toy:teacher"},
                       "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                       "training": training})


def test_a_rerun_finds_the_run_names_and_finished_segments(tmp_path):
    spec = spec_of(tmp_path)
    first = JobState.open(tmp_path, spec, restart=False)
    assert not first.resumed
    assert first.run_name(0, "t-0-aaaa") == "t-0-aaaa"
    student = tmp_path / "ray_train" / "t-0-aaaa" / "checkpoint" / "student"
    student.mkdir(parents=True)
    first.finish(0, str(student.parent), str(student))

    again = JobState.open(tmp_path, spec, restart=False)
    assert again.resumed
    assert again.run_name(0, "t-0-bbbb") == "t-0-aaaa"  # the same Ray Train run: it restores
    assert again.run_name(1, "t-1-cccc") == "t-1-cccc"
    assert again.finished(0) == {"checkpoint": str(student.parent), "student": str(student)}
    assert again.finished(1) is None


def test_a_finished_segment_whose_files_are_gone_is_trained_again(tmp_path):
    state = JobState.open(tmp_path, spec_of(tmp_path), restart=False)
    state.finish(0, None, str(tmp_path / "missing"))
    assert state.finished(0) is None


def test_another_spec_in_the_same_output_dir_is_refused_with_the_differences(tmp_path):
    JobState.open(tmp_path, spec_of(tmp_path), restart=False).run_name(0, "x")
    with pytest.raises(KdrayError, match=r"differs in: training\.lr, training\.seed\); pass --restart"):
        JobState.open(tmp_path, spec_of(tmp_path, lr=1e-3, seed=3), restart=False)


def test_restart_discards_the_earlier_run(tmp_path):
    state = JobState.open(tmp_path, spec_of(tmp_path), restart=False)
    state.run_name(0, "x")
    (tmp_path / "ray_train" / "x").mkdir(parents=True)
    (tmp_path / "curriculum").mkdir()
    (tmp_path / "datasets" / "responses").mkdir(parents=True)
    (tmp_path / "report.md").write_text("kept")
    (tmp_path / "events.jsonl").write_text('{"kind": "train_step", "step": 1, "loss": 1.0}\n')
    fresh = JobState.open(tmp_path, spec_of(tmp_path, lr=1e-3), restart=True)  # another spec is fine now
    assert not fresh.resumed
    from kdray.pipeline.job import Job

    job = Job(spec_of(tmp_path, lr=1e-3))
    job._resume_history(fresh)  # the event history starts over with the run
    assert not (tmp_path / "events.jsonl").exists() and list(job.steps) == [] and len(job.steps) == 0
    assert not (tmp_path / "ray_train").exists() and not (tmp_path / "curriculum").exists()
    assert not (tmp_path / "datasets").exists()
    assert (tmp_path / "report.md").read_text() == "kept"  # only what resuming would use


def test_a_corrupt_state_file_says_how_to_start_over(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "job.json").write_text("{not json")
    with pytest.raises(KdrayError, match="--restart"):
        JobState.open(tmp_path, spec_of(tmp_path), restart=False)


def test_a_job_saved_before_a_field_was_added_resumes_when_it_keeps_the_default(tmp_path):
    """Upgrading kdray adds spec fields (their defaults keep the old behaviour): a job saved
    before must resume, unless the new field is set to something else now."""
    import json

    JobState.open(tmp_path, spec_of(tmp_path), restart=False).run_name(0, "x")
    saved = json.loads((tmp_path / "state" / "job.json").read_text())
    for field in ("group_by_length", "length_group_size"):  # as a kdray from before them saved it
        del saved["spec"]["training"][field]
    (tmp_path / "state" / "job.json").write_text(json.dumps(saved))
    assert JobState.open(tmp_path, spec_of(tmp_path), restart=False).run_name(0, "y") == "x"
    with pytest.raises(KdrayError, match=r"differs in: training\.group_by_length\)"):
        JobState.open(tmp_path, spec_of(tmp_path, group_by_length=True), restart=False)
    saved["spec"]["training"]["renamed_field"] = 1  # a field this kdray no longer has
    (tmp_path / "state" / "job.json").write_text(json.dumps(saved))
    with pytest.raises(KdrayError, match=r"differs in: .*training\.renamed_field"):
        JobState.open(tmp_path, spec_of(tmp_path), restart=False)


def test_a_tempered_job_saved_before_t_squared_scaling_resumes_only_as_it_trained(tmp_path):
    """objective.t_squared_scaling's default (true) changed the loss where a KD temperature is
    not 1: a POCL job saved before it trained without T², so it resumes only with the flag off
    (or is restarted); an untempered job resumes as before, the flag making no difference."""
    import json

    def pocl(out, **objective):
        return parse_spec({"name": "t", "output_dir": str(out), "teacher": {"model": "toy:teacher"},
                           "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                           "objective": {"kind": "forward_kl", **objective}, "curriculum": {"kind": "pocl"}})

    for out, spec in ((tmp_path / "pocl", pocl), (tmp_path / "plain", lambda out, **o: spec_of(out))):
        JobState.open(out, spec(out), restart=False).run_name(0, "x")
        saved = json.loads((out / "state" / "job.json").read_text())
        del saved["spec"]["objective"]["t_squared_scaling"]  # as a kdray from before it saved it
        (out / "state" / "job.json").write_text(json.dumps(saved))
    assert JobState.open(tmp_path / "plain", spec_of(tmp_path / "plain"), restart=False).run_name(0, "y") == "x"
    with pytest.raises(KdrayError, match=r"differs in: objective\.t_squared_scaling\); it trained without the KD "
                                         r"term's T², .* set objective\.t_squared_scaling: false to resume it"):
        JobState.open(tmp_path / "pocl", pocl(tmp_path / "pocl"), restart=False)
    resumed = JobState.open(tmp_path / "pocl", pocl(tmp_path / "pocl", t_squared_scaling=False), restart=False)
    assert resumed.run_name(0, "y") == "x"


def test_a_resumed_job_may_change_its_failure_policy_and_memory_savings_and_nothing_else(tmp_path):
    """A job that failed too often resumes with more retries or checkpoints; one saved under an
    older kdray's failure defaults (max_failures 0, no periodic checkpoints) resumes under today's."""
    import json

    JobState.open(tmp_path, spec_of(tmp_path, max_failures=0, checkpoint_every_steps=None),
                  restart=False).run_name(0, "x")
    assert JobState.open(tmp_path, spec_of(tmp_path), restart=False).run_name(0, "y") == "x"
    resumed = JobState.open(tmp_path, spec_of(tmp_path, max_failures=-1, checkpoint_every_steps=5,
                                              gradient_checkpointing=True), restart=False)
    assert resumed.run_name(0, "y") == "x"
    saved = json.loads((tmp_path / "state" / "job.json").read_text())
    assert saved["spec"]["training"]["max_failures"] == 0  # the saved work's own spec is kept
    more = spec_of(tmp_path).model_copy(update={"generation": spec_of(tmp_path).generation.model_copy(
        update={"max_replica_restarts": 10})})  # a pool whose replicas died too often
    assert JobState.open(tmp_path, more, restart=False).run_name(0, "y") == "x"
    with pytest.raises(KdrayError, match=r"differs in: training\.seed\)"):
        JobState.open(tmp_path, spec_of(tmp_path, max_failures=5, seed=3), restart=False)



def test_the_output_dir_written_another_way_is_the_same_job(tmp_path, monkeypatch):
    """A job started as output_dir: runs/x resumes from its saved spec.yaml, which names the
    directory absolutely (the model card's `kdray run OUT/spec.yaml`), and the other way round."""
    monkeypatch.chdir(tmp_path)
    relative = spec_of(tmp_path).model_copy(update={"output_dir": "runs/x"})
    JobState.open(tmp_path / "runs" / "x", relative, restart=False).run_name(0, "x")
    absolute = spec_of(tmp_path / "runs" / "x")
    assert JobState.open(tmp_path / "runs" / "x", absolute, restart=False).run_name(0, "y") == "x"


def test_a_resumed_job_recovers_unrecorded_steps_from_every_checkpoint_the_killed_run_left(tmp_path):
    """The killed driver recorded steps 1-7. On disk: checkpoint 8 (steps 5-8, the one Ray Train
    registered) and checkpoint 12 (steps 9-12, written by the workers while the driver was being
    killed, never registered). Step 8 is only in the lower one."""
    import json

    from kdray.pipeline.job import Job
    from kdray.pipeline.progress import Reporter

    run_dir = tmp_path / "ray_train" / "t-0-aaaa"
    for name, steps in (("checkpoint_2026-12-03_05-00-01.000000", range(5, 9)),
                        ("checkpoint_2026-12-03_05-00-02.000000", range(9, 13))):
        (run_dir / name).mkdir(parents=True)
        progress = {"step": steps[-1], "metrics": [{"step": s, "loss": float(s)} for s in steps]}
        (run_dir / name / "progress.json").write_text(json.dumps(progress))
    (run_dir / "checkpoint_2026-12-03_05-00-03.000000").mkdir()  # being written: progress.json cut short
    (run_dir / "checkpoint_2026-12-03_05-00-03.000000" / "progress.json").write_text('{"step": 16, "metr')

    events = tmp_path / "events.jsonl"
    job = Job(spec_of(tmp_path), reporter=Reporter(events))
    job.steps.start()
    for s in range(1, 8):
        job.steps.add({"step": s, "loss": 0.5})
    job._recover_metrics(run_dir)
    assert [m["step"] for m in job.steps] == list(range(1, 13))
    assert [m["loss"] for m in list(job.steps)[7:]] == [8.0, 9.0, 10.0, 11.0, 12.0]
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["step"] for e in recorded if e["kind"] == "train_step"] == [8, 9, 10, 11, 12]


def test_steps_past_the_checkpoints_ray_train_kept_are_recovered_from_the_workers_journal(tmp_path):
    """The driver was killed after step 6, and its workers trained on to step 16 before they
    died: Ray Train kept checkpoints 12 and 16 only (steps 9-16), so steps 7 and 8 are in rank
    0's journal alone (CI once lost them). A step trained twice takes its last metrics; a line
    cut short by the kill is skipped."""
    import json

    from kdray.pipeline.job import Job
    from kdray.pipeline.progress import Reporter
    from kdray.train.checkpoints import STEPS_JOURNAL

    run_dir = tmp_path / "ray_train" / "t-0-aaaa"
    for name, steps in (("checkpoint_2026-12-06_03-37-37.000000", range(9, 13)),
                        ("checkpoint_2026-12-06_03-37-38.000000", range(13, 17))):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "progress.json").write_text(json.dumps({"step": steps[-1], "metrics": [
            {"step": s, "loss": float(s)} for s in steps]}))
    lines = [{"step": s, "loss": float(s)} for s in range(1, 17)] + [{"step": 8, "loss": 80.0}]
    (run_dir / STEPS_JOURNAL).write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 17, "lo')

    job = Job(spec_of(tmp_path), reporter=Reporter(tmp_path / "events.jsonl"))
    job.steps.start()
    for s in range(1, 7):
        job.steps.add({"step": s, "loss": 0.5})
    job._recover_metrics(run_dir)
    assert [m["step"] for m in job.steps] == list(range(1, 17))
    assert [m["loss"] for m in list(job.steps)[6:9]] == [7.0, 80.0, 9.0]


def test_a_worker_group_restarted_after_the_final_report_keeps_the_last_steps_metrics(tmp_path):
    """Ray Train may restart the worker group after the segment's final report (a worker lost
    while the run ends): the new group restores the final checkpoint and trains nothing. Its
    final report carries that checkpoint's last step as trained, and a bare marker for a step
    already recorded replaces nothing (CI once lost step 16's metrics this way: report.json,
    TensorBoard). A step sent once more is recorded only if the driver never got it (CI once
    found step 16 twice in a resumed job's events: the killed driver had recorded the final
    report, and the re-run restored the final checkpoint)."""
    import json

    from kdray.pipeline.job import Job
    from kdray.pipeline.progress import Reporter
    from kdray.train.checkpoints import final_steps

    marker = {"step": 16, "total_steps": 16, "round": 0}
    trained = [{"step": s, "loss": float(s), "total_steps": 16} for s in (13, 14, 15, 16)]
    assert final_steps(trained[2:], trained[-1], [], marker) == trained[2:]  # not reported yet
    again = {**trained[-1], "resent": True}
    assert final_steps([], trained[-1], [], marker) == [again]              # reported: once more
    assert final_steps([], {}, trained, marker) == [again]                  # restored, none trained
    assert final_steps([], {}, trained[:2], marker) == [marker]             # the restored steps end before
    assert final_steps([], {}, [], marker) == [marker]

    events = tmp_path / "events.jsonl"
    job = Job(spec_of(tmp_path), reporter=Reporter(events))
    for m in trained:
        job._record_metrics(m)
    job._record_metrics({**marker, "final": True})
    job._record_metrics({**again, "final": True})
    assert list(job.steps) == trained
    job._record_metrics({**trained[-1], "loss": 0.5})  # a step trained again replaces its metrics
    assert [m["loss"] for m in job.steps] == [13.0, 14.0, 15.0, 0.5]
    assert [e["loss"] for e in map(json.loads, events.read_text().splitlines())] == [13.0, 14.0, 15.0, 16.0, 0.5]

    # A step sent once more that the driver never got (its checkpoint was unreadable) is recorded,
    # without the flag.
    fresh = Job(spec_of(tmp_path / "fresh"), reporter=Reporter(tmp_path / "fresh.jsonl"))
    fresh.out.mkdir()
    fresh._record_metrics({**again, "final": True})
    assert list(fresh.steps) == [{**trained[-1], "final": True}]


def test_steps_redone_after_a_restore_replace_the_lost_ones_from_that_step_on(tmp_path):
    """The history stays in step order: steps in order are appended, a step at or before the
    last one (a restore from an earlier checkpoint) drops that step and every later one, in the
    running job and in a resumed one's event history alike."""
    import json
    from types import SimpleNamespace

    from kdray.pipeline.job import Job
    from kdray.pipeline.progress import Reporter

    events = tmp_path / "events.jsonl"
    job = Job(spec_of(tmp_path), reporter=Reporter(events))
    for s in range(1, 11):
        job._record_metrics({"step": s, "loss": float(s)})
    job._record_metrics({"step": 4, "loss": 0.4})  # restored from checkpoint 3
    job._record_metrics({"step": 5, "loss": 0.5})
    kept = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.4), (5, 0.5)]
    assert [(m["step"], m["loss"]) for m in job.steps] == kept and 5 in job.steps and 6 not in job.steps
    assert len((tmp_path / "train_metrics.jsonl").read_text().splitlines()) == 5  # the file holds the history alone

    resumed = Job(spec_of(tmp_path), reporter=Reporter(None))
    resumed._resume_history(SimpleNamespace(resumed=True))  # the same steps, read back from events.jsonl
    assert [(m["step"], m["loss"]) for m in resumed.steps] == kept and resumed.steps.last_step == 5
    assert len(events.read_text().splitlines()) == 12 and json.loads(events.read_text().splitlines()[-1])["step"] == 5


def test_finite_makes_every_nan_and_infinity_none_for_strict_json():
    """report.json and the events are strict JSON: Python would write NaN, which JSON readers
    (ijson in the service, JavaScript in the page) refuse."""
    import json

    from kdray.pipeline.progress import finite

    value = {"a": [float("nan"), {"b": float("inf"), "c": [float("-inf"), 1.5]}], "d": "NaN", "e": 2}
    assert finite(value) == {"a": [None, {"b": None, "c": [None, 1.5]}], "d": "NaN", "e": 2}
    json.dumps(finite(value), allow_nan=False)
