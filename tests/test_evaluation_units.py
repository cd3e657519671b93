"""Evaluation per round and the LLM judge: verdict parsing, the rates, the spec, and how a
resumed job keeps the round scores an earlier run recorded."""

from __future__ import annotations

import pytest

from kdray.pipeline.job import Job
from kdray.errors import SpecError
from kdray.stages.evaluate import judge_requests, judge_summary, parse_verdict
from kdray.pipeline.state import JobState
from kdray.curriculum.plan import Segment
from kdray.spec import DEFAULT_JUDGE_TEMPLATE, parse_spec


def spec_of(tmp_path, **evaluation):
    return parse_spec({"name": "t", "output_dir": str(tmp_path), "teacher": {"model": "toy:teacher"},
                       "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                       "evaluation": evaluation})


def errors_of(tmp_path, **evaluation) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        spec_of(tmp_path, **evaluation)
    return dict(info.value.errors)


# -- verdicts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), ("B", "B"), (" B", "B"), ("A.", "A"), ("B\n", "B"), ("(A)", "A"), ("[B]", "B"),
    ("**A**", "A"), ('"B"', "B"), ("Response A", "A"), ("response B", "B"), ("Assistant A", "A"),
    ("A is better", "A"), ("B, since", "B"),
])
def test_a_verdict_is_the_first_letter_a_or_b(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text", ["", "   ", "a", "b", "Apple", "Both", "AB", "A1", "C", "tie", "7", " 22",
                                  "The answer is A", "Response", "-"])
def test_anything_else_is_a_tie(text):
    assert parse_verdict(text) is None


def test_judge_requests_ask_both_orders_and_keep_braces_in_answers_literal():
    items = [{"id": "q1", "prompt": "sort {x}", "student": "S {a}", "reference": "R"}]
    reqs = judge_requests(items, "P={prompt} A={a} B={b}")
    assert [(r["id"], r["item"], r["order"]) for r in reqs] == [("q1|ab", "q1", "ab"), ("q1|ba", "q1", "ba")]
    assert reqs[0]["prompt"] == "P=sort {x} A=S {a} B=R"
    assert reqs[1]["prompt"] == "P=sort {x} A=R B=S {a}"
    default = judge_requests(items, DEFAULT_JUDGE_TEMPLATE)[0]["prompt"]
    assert "sort {x}" in default and "Response A: S {a}" in default and "Response B: R" in default


def test_win_rate_counts_both_orders_and_ties_as_half():
    # q1: student wins both orders; q2: position bias (A twice); q3: unparseable twice;
    # q4: reference wins both orders.
    s = judge_summary({"q1": ("A", "B"), "q2": ("A", "A"), "q3": (None, None), "q4": ("B", "A")})
    assert (s["items"], s["comparisons"]) == (4, 8)
    assert (s["wins"], s["losses"], s["ties"]) == (3, 3, 2)
    assert s["win_rate"] == pytest.approx((3 + 2 / 2) / 8)
    assert s["position_consistency"] == pytest.approx(3 / 4)  # q1, q3 (tie both), q4
    assert s["first_position_bias"] == pytest.approx(1 / 4) and s["second_position_bias"] == 0.0
    assert s["verdicts"]["student_first"] == {"A": 2, "B": 1, "tie": 1}
    assert s["verdicts"]["student_second"] == {"A": 2, "B": 1, "tie": 1}


def test_a_judge_that_never_answers_a_or_b_gives_one_half():
    outputs = {"q1": ("7", " 22"), "q2": ("Both", "")}
    s = judge_summary({k: (parse_verdict(a), parse_verdict(b)) for k, (a, b) in outputs.items()})
    assert s["ties"] == s["comparisons"] == 4 and s["win_rate"] == 0.5 and s["position_consistency"] == 1.0
    empty = judge_summary({})
    assert empty["comparisons"] == 0 and empty["win_rate"] is None and empty["position_consistency"] is None


# -- the spec -----------------------------------------------------------------------------------

def test_judge_spec_defaults_and_model_shorthand(tmp_path):
    assert spec_of(tmp_path).evaluation.judge is None and spec_of(tmp_path).evaluation.per_round is True
    judge = spec_of(tmp_path, judge={"model": "toy:teacher"}).evaluation.judge
    assert judge.model.model == "toy:teacher" and judge.reference == "teacher"
    assert judge.max_new_tokens == 2 and judge.max_prompts is None and judge.template == DEFAULT_JUDGE_TEMPLATE
    full = spec_of(tmp_path, judge={"model": {"model": "toy:teacher", "dtype": "float32", "max_model_len": 128},
                                    "reference": "student_before", "max_prompts": 8}).evaluation.judge
    assert full.model.dtype == "float32" and full.reference == "student_before" and full.max_prompts == 8


def test_bad_judge_settings_name_the_field_and_fix(tmp_path):
    errs = errors_of(tmp_path, judge={"model": "toy:teacher", "template": "{prompt} {a}"})
    assert "missing: b" in errs["evaluation.judge.template"]
    errs = errors_of(tmp_path, judge={"model": "toy:teacher", "template": "{prompt} {a} {b} {c}"})
    assert "unknown: 'c'" in errs["evaluation.judge.template"]
    errs = errors_of(tmp_path, judge={"model": "toy:teacher", "template": "{prompt} {a} {b} {"})
    assert "literal braces" in errs["evaluation.judge.template"]
    errs = errors_of(tmp_path, judge={"model": "toy:teacher", "max_new_tokens": 8, "reference": "student_after"})
    assert "evaluation.judge.max_new_tokens" in errs and "evaluation.judge.reference" in errs
    errs = errors_of(tmp_path, judge={"model": "./no/such/judge"})
    assert "does not exist" in errs["evaluation.judge.model.model"]
    errs = errors_of(tmp_path, enabled=False, judge={"model": "toy:teacher"})
    assert "evaluation.enabled: true" in errs["evaluation"]


# -- per-round scores across runs ----------------------------------------------------------------

def test_round_scores_survive_a_rerun_and_restart_drops_them(tmp_path):
    spec = spec_of(tmp_path)
    first = JobState.open(tmp_path, spec, restart=False)
    assert first.round_score(0) is None
    first.save_round_score(0, {"rougeL": 0.4, "exact_match": 0.25, "mean_length": 2.0, "n": 4})
    again = JobState.open(tmp_path, spec, restart=False)
    assert again.round_score(0) == {"rougeL": 0.4, "exact_match": 0.25, "mean_length": 2.0, "n": 4}
    assert again.round_score(1) is None
    assert JobState.open(tmp_path, spec, restart=True).round_score(0) is None


def segments(n: int) -> list[Segment]:
    return [Segment(index=i, round=i, stage=None, n_rows=64, steps_per_epoch=2, start_step=2 * i, steps=2,
                    kd_temperature=1.0, kd_ratio=1.0, regenerate_student=True, restart_optimizer=False)
            for i in range(n)]


def test_a_resumed_job_reuses_recorded_round_scores_and_skips_the_last_segment(tmp_path):
    spec = spec_of(tmp_path)
    state = JobState.open(tmp_path, spec, restart=False)
    recorded = {"rougeL": 0.5, "exact_match": 0.3, "mean_length": 2.5, "n": 400}
    state.save_round_score(0, recorded)
    job = Job(spec)
    plan = segments(3)
    scores: dict = {}
    job.score_round(plan[0], plan, tmp_path / "student-0", state, [], scores)  # no generation: recorded
    job.score_round(plan[2], plan, tmp_path / "student-2", state, [], scores)  # the last one is student_after
    assert scores == {"student_round_1": recorded}
    # One segment, or per_round off: nothing to score per round.
    for spec_, plan_ in ((spec, segments(1)), (spec_of(tmp_path, per_round=False), plan)):
        other: dict = {}
        Job(spec_).score_round(plan_[0], plan_, tmp_path / "student-0", state, [], other)
        assert other == {}
