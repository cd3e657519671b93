"""A job's per-step metrics on disk (kdray/report/train_metrics.py): the driver's StepLog keeps the
file in step order through restores and recoveries, and readers get the same steps from a new
job directory and from an older report.json that held them itself."""

from __future__ import annotations

import json
import math

from kdray.report import render
from kdray.report.train_metrics import TRAIN_METRICS_FILE, StepLog, iter_steps, last_step, read_train_metrics
from tests.test_report import make_job


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_file_holds_the_history_alone_through_restores(tmp_path):
    log = StepLog(tmp_path / TRAIN_METRICS_FILE)
    log.start()
    assert list(log) == [] and log.last_step is None and log.summary() == {
        "steps": 0, "last_step": None, "first_loss": None, "last_loss": None}
    for s in range(1, 9):
        log.add({"step": s, "loss": float(s), "grad_norm": math.nan if s == 2 else 1.0})
    log.add({"step": 6, "loss": 0.6})  # restored from checkpoint 5: steps 6-8 are lost
    log.add({"step": 7, "loss": 0.7})
    log.add({"step": 7, "total_steps": 7, "final": True})  # a marker without a loss
    steps = _lines(log.path)
    assert [(m["step"], m.get("loss")) for m in steps] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                           (6, 0.6), (7, None)]
    assert steps[1]["grad_norm"] is None  # strict JSON: a NaN is written as null
    assert list(log) == steps and len(log) == 7 and log.last_step == 7
    assert 6 in log and 8 not in log and 0 not in log and "6" not in log
    assert log.summary() == {"steps": 7, "last_step": 7, "first_loss": {"step": 1, "loss": 1.0},
                             "last_loss": {"step": 6, "loss": 0.6}}
    log.add({"step": 1, "loss": 9.0})  # back to the first step: the file is that step alone
    assert _lines(log.path) == [{"step": 1, "loss": 9.0}]
    log.start()  # a new run starts over
    assert log.path.read_bytes() == b"" and len(log) == 0


def test_a_log_opened_on_a_file_that_has_lines_cuts_only_its_own(tmp_path):
    path = tmp_path / TRAIN_METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n')
    log = StepLog(path)
    log.add({"step": 5, "loss": 5.0})
    log.add({"step": 5, "loss": 0.5})
    assert _lines(path) == [{"step": 1, "loss": 1.0}, {"step": 5, "loss": 0.5}]


def test_missing_steps_are_appended_or_merged_in_step_order(tmp_path):
    log = StepLog(tmp_path / TRAIN_METRICS_FILE)
    log.start()
    for s in (1, 2, 5):
        log.add({"step": s, "loss": float(s)})
    kept = [{"step": s, "loss": 10.0 + s} for s in (2, 3, 4, 6)]  # 2 is known: kept as recorded
    added = log.add_missing(kept)
    assert [m["step"] for m in added] == [3, 4, 6]
    assert [(m["step"], m["loss"]) for m in log] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 5.0), (6, 16.0)]
    assert log.add_missing([{"step": 7, "loss": 7.0}]) == [{"step": 7, "loss": 7.0}] and log.last_step == 7
    log.add({"step": 5, "loss": 0.5})  # the index still matches the rewritten file
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5] and _lines(log.path)[-1] == {"step": 5, "loss": 0.5}


def test_a_line_cut_short_is_skipped_and_a_missing_file_reads_empty(tmp_path):
    path = tmp_path / TRAIN_METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # a driver killed mid-write
    assert list(iter_steps(path)) == [{"step": 1, "loss": 1.0}]
    assert list(iter_steps(tmp_path / "none.jsonl")) == []
    assert read_train_metrics(tmp_path, {}) == [] and last_step({}) is None


def test_an_older_report_that_held_its_steps_reads_and_renders_as_a_new_one(tmp_path):
    new = make_job(tmp_path, "new", rounds=(1,))
    report = json.loads((new / "report.json").read_text())
    steps = read_train_metrics(new, report)
    assert [m["step"] for m in steps] == list(range(1, 7)) and last_step(report) == 6
    old = tmp_path / "old"
    old.mkdir()
    held = {k: v for k, v in report.items() if k not in ("train_metrics_file", "train_summary")}
    (old / "report.json").write_text(json.dumps({**held, "train_metrics": steps}))
    assert read_train_metrics(old, json.loads((old / "report.json").read_text())) == steps
    assert last_step({"train_metrics": steps}) == 6
    render.render_report(new)
    render.render_report(old)
    for name in ("report.md", "loss.png", "schedule.png"):
        assert (old / name).read_bytes() == (new / name).read_bytes(), name
    assert "| optimizer steps | 6 of 6 |" in (new / "report.md").read_text(encoding="utf-8")


def test_odd_steps_and_losses_keep_the_index_true(tmp_path):
    """An event without a usable step is appended (never replacing the last step), a float step
    names the same step as its int, and a NaN loss is neither the first nor the last loss of the
    summary (strict JSON holds it as null; the model card formats the summary)."""
    from kdray.report.model_card import model_card

    log = StepLog(tmp_path / TRAIN_METRICS_FILE)
    log.start()
    for s in (1, 2, 3):
        log.add({"step": s, "loss": math.nan if s == 3 else float(s)})
    for odd in ({"loss": None}, {"step": True}, {"step": math.nan}, {"step": 2.5}):
        log.add(odd)
    assert [m.get("step") for m in log] == [1, 2, 3, None, True, None, 2.5] and len(log) == 7
    assert 3 in log and 3.0 in log and 4 not in log and True not in log and log.last_step == 3
    summary = log.summary()
    assert summary["first_loss"] == {"step": 1, "loss": 1.0} and summary["last_loss"] == {"step": 2, "loss": 2.0}
    assert "- loss: 1.0000 at step 1, 2.0000 at the last step" in model_card({"train_summary": summary, "spec": {}})
    log.add({"step": 3, "loss": 0.3})  # a restore to step 3 drops the step-less lines after it too
    assert [m.get("step") for m in log] == [1, 2, 3] and _lines(log.path)[-1] == {"step": 3, "loss": 0.3}


def test_merging_keeps_lines_the_log_did_not_write_out_of_its_history(tmp_path):
    path = tmp_path / TRAIN_METRICS_FILE
    path.write_text('{"step": 10, "loss": 10.0}\n')
    log = StepLog(path)
    for s in (3, 5):
        log.add({"step": s, "loss": float(s)})
    assert [m["step"] for m in log.add_missing([{"step": 4, "loss": 4.0}])] == [4]
    assert [m["step"] for m in log] == [3, 4, 5] and len(log) == 3


def test_a_report_whose_steps_file_is_missing_or_rewritten_says_so(tmp_path):
    """report.json counts its steps (train_summary): a file a later run is rewriting (a resume,
    or --restart), or one that is gone, is named with what to do, not read as the report's."""
    import pytest

    from kdray.errors import KdrayError

    job = make_job(tmp_path, "j")
    report = json.loads((job / "report.json").read_text())
    StepLog(job / TRAIN_METRICS_FILE).start()  # kdray run --restart begins
    with pytest.raises(KdrayError, match=r"train_metrics.jsonl holds 0 steps where report.json counts 6: a later run"):
        read_train_metrics(job, report)
    with pytest.raises(KdrayError, match="a later run"):
        render.render_report(job)
    (job / TRAIN_METRICS_FILE).unlink()
    with pytest.raises(KdrayError, match=r"train_metrics.jsonl is missing: .* \(copy it with report.json\)"):
        read_train_metrics(job, report)
    assert last_step(report) == 6  # kdray compare reads the summary only
