"""Evaluation per round and the LLM judge: verdict parsing, the rates, the spec, and how a
resumed job keeps the round scores an earlier run recorded."""

from __future__ import annotations

import statistics

import pytest

from kdray.pipeline.job import Job
from kdray.errors import SpecError
from kdray.stages.judge import judge_requests, judge_summary, parse_verdict
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
    # its error over the four prompts, each one unit: q1 1, q2 1/2, q3 1/2, q4 0
    assert s["win_rate_stderr"] == pytest.approx(statistics.stdev([1, 0.5, 0.5, 0]) / 2)
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
    assert s["win_rate_stderr"] == 0.0 and empty["win_rate_stderr"] is None
    assert judge_summary({"q1": ("A", "B")})["win_rate_stderr"] is None  # no spread from one prompt


def test_rows_are_scored_where_they_are_made_and_summed_file_by_file(tmp_path):
    """A job's answers are scored per row in Ray Data tasks (score_answers) and the means come
    from the written files (answer_scores): the same figures as score_responses on the pairs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.data.text_scores import score_responses
    from kdray.stages.evaluate import ANSWER_COLUMNS, answer_scores, score_answers

    preds, golds = [" 1 2 3", "2  1", "", "a b c d"], ["1 2 3", "1 2", "x", "a c"]
    batch = {"_row": np.arange(4), "id": np.asarray(list("abcd"), dtype=object),
             "prompt": np.asarray(["p"] * 4, dtype=object), "response": np.asarray(preds, dtype=object),
             "gold": np.asarray(golds, dtype=object), "finish_reason": np.asarray(["stop"] * 4, dtype=object)}
    scored = score_answers(batch)
    assert list(scored) == ANSWER_COLUMNS  # the pool's own columns (finish_reason, ids) are not kept
    assert scored["exact_match"].tolist() == [1.0, 0.0, 0.0, 0.0] and scored["length"].tolist() == [3, 2, 0, 4]
    files = []
    for i, part in enumerate((slice(0, 3), slice(3, 4))):  # two files, as a write makes them
        files.append(tmp_path / f"{i}.parquet")
        pq.write_table(pa.table({k: pa.array(list(v[part])) for k, v in scored.items()}), files[-1])
    summed = answer_scores(files)["scores"]
    expected = score_responses(preds, golds)
    assert summed["n"] == expected["n"] == 4
    for name in ("rougeL", "exact_match", "mean_length", "rougeL_stderr", "exact_match_stderr"):
        assert summed[name] == pytest.approx(expected[name])
    # The standard error of the mean (lm-evaluation-harness's stderr): the sample deviation over sqrt(n).
    import statistics

    assert summed["exact_match_stderr"] == pytest.approx(statistics.stdev([1.0, 0.0, 0.0, 0.0]) / 2)
    assert summed["rougeL_stderr"] == pytest.approx(statistics.stdev(scored["rougeL"].tolist()) / 2)
    assert score_responses(["a"], ["a"])["rougeL_stderr"] is None  # one answer: no spread to measure
    assert score_responses(["a", "b"], ["a", "a"])["exact_match_stderr"] == pytest.approx(0.5)


def test_verdicts_are_counted_by_pair_from_the_written_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.stages.judge import pair_summary, verdict_counts

    pairs = [("A", "B"), ("A", "A"), (None, None), ("B", "A"), ("A", "B")]
    pq.write_table(pa.table({"student_first_verdict": [p[0] for p in pairs[:3]],
                             "student_second_verdict": [p[1] for p in pairs[:3]]}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"student_first_verdict": [p[0] for p in pairs[3:]],
                             "student_second_verdict": [p[1] for p in pairs[3:]]}), tmp_path / "1.parquet")
    counted = verdict_counts([tmp_path / "0.parquet", tmp_path / "1.parquet"])["pairs"]
    assert sorted(counted, key=str) == sorted([["A", "B", 2], ["A", "A", 1], [None, None, 1], ["B", "A", 1]], key=str)
    from collections import Counter

    summary = pair_summary(Counter({(ab, ba): n for ab, ba, n in counted}))
    assert summary == judge_summary({f"q{i}": p for i, p in enumerate(pairs)})
    assert (summary["items"], summary["wins"], summary["losses"]) == (5, 5, 3)


def _sides(rows, prompts, student, reference, reference_rows=None):
    """A student's and a reference's answers rows, paired by position."""
    import numpy as np

    return ({"_row": np.asarray(rows), "id": np.asarray([f"q{r}" for r in rows], dtype=object),
             "prompt": np.asarray(prompts, dtype=object), "response": np.asarray(student, dtype=object)},
            {"_row": np.asarray(rows if reference_rows is None else reference_rows),
             "response": np.asarray(reference, dtype=object)})


def test_judge_pairs_each_rows_answers_and_skips_an_item_too_long_for_the_judge(toy_world):
    from kdray.data.tokenize import judge_encoding, prompt_token_counter
    from kdray.models import load_tokenizer
    from kdray.stages.judge import _judge_batch

    tokenizer = load_tokenizer("toy:teacher", need_pad=False)
    encoding = judge_encoding("auto", tokenizer)
    sides = _sides([7, 9], ["Q: sort 2 1\nA:", "Q: sort 5 4 3 2 1 9 8 7 6\nA:"], [" 1 2", " 1 2 3 4 5 6 7 8 9"],
                   [" 2 1", " 9 8 7 6 5 4 3 2 1"])
    judge = dict(template="{prompt}{a}|{b}", judge_model="toy:teacher", encoding=encoding, sides="s and r")
    out = _judge_batch(*sides, room=100, **judge)
    assert out["id"].tolist() == ["q7|ab", "q7|ba", "q9|ab", "q9|ba"] and out["_row"].tolist() == [7, 7, 9, 9]
    assert out["item"].tolist() == ["q7", "q7", "q9", "q9"] and out["order"].tolist() == ["ab", "ba"] * 2
    # student first, then second
    assert out["prompt"].tolist()[:2] == ["Q: sort 2 1\nA: 1 2| 2 1", "Q: sort 2 1\nA: 2 1| 1 2"]
    tokens = prompt_token_counter(tokenizer, encoding)(out["prompt"].tolist())
    room = max(tokens[:2])
    assert min(tokens[2:]) > room
    short = _judge_batch(*sides, room=room, **judge)  # q9 does not fit in either order
    assert short["id"].tolist() == ["q7|ab", "q7|ba"] and short["_row"].tolist() == [7, 7]
    # an item is judged in both orders or not at all
    assert all(len(column) == 0 for column in _judge_batch(*sides, room=room - 1, **judge).values())


def test_answers_pairing_two_held_out_rows_are_refused_naming_them():
    from kdray.errors import DataError
    from kdray.stages.judge import _judge_batch

    sides = _sides([3, 4], ["p3", "p4"], ["s3", "s4"], ["r4", "r3"], reference_rows=[3, 5])
    with pytest.raises(DataError, match=r"the answers of S and R are not in one row order \(held-out row 4 beside "
                                        r"row 5\).*--restart"):
        _judge_batch(*sides, template="{prompt}{a}{b}", judge_model="toy:teacher", encoding=None, room=100,
                     sides="S and R")


def test_a_datasets_first_rows_are_cut_into_runs_from_the_footers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.data.artifacts import Artifact
    from kdray.stages.judge import _pieces

    names = []
    for i, n in enumerate((3, 5, 4, 2)):
        names.append(f"{i}.parquet")
        pq.write_table(pa.table({"_row": list(range(n))}), tmp_path / names[-1])
    answers = Artifact(tmp_path, {"files": names, "rows": 14})
    f = [str(tmp_path / name) for name in names]
    assert _pieces(answers, 10, 4) == [[(f[0], 0, 3), (f[1], 0, 1)], [(f[1], 1, 4)], [(f[2], 0, 2)]]
    assert _pieces(answers, 14, 100) == [[(f[0], 0, 3), (f[1], 0, 5), (f[2], 0, 4), (f[3], 0, 2)]]
    assert _pieces(answers, 1, 4) == [[(f[0], 0, 1)]]


def _answers(heldout, path):
    """Answers to ``heldout`` as evaluate_models writes them: read in order, answered in tasks
    that finish out of order, and scored; a file's rows depend on the name."""
    import random
    import time

    from kdray.data.artifacts import FILE_BYTES, write_dataset
    from kdray.stages.evaluate import ANSWERS_KIND, score_answers

    def answer(batch):
        time.sleep(random.random() / 10)
        batch["gold"] = batch.pop("response")
        batch["response"] = [f"{path.name}{r}" for r in batch["_row"]]
        return score_answers(batch)

    ds = heldout.read(["_row", "id", "prompt", "response"]).map_batches(answer, batch_size=3, batch_format="numpy",
                                                                         num_cpus=0.25)
    return write_dataset(ds, path, ANSWERS_KIND, row_bytes=FILE_BYTES // (4 + len(path.name)),
                         expect_rows=heldout.rows)


def test_the_judge_pairs_answers_in_the_held_out_order_row_by_row(ray_cpus, toy_world, tmp_path, monkeypatch):
    """The two answers datasets, their files cut apart differently, are paired into one item per
    held-out row, up to the last judged one; answers in another order are refused."""
    import ray.data

    from kdray.data.artifacts import FILE_BYTES, Artifact, write_dataset
    from kdray.data.tokenize import judge_encoding
    from kdray.errors import DataError, user_error
    from kdray.models import load_tokenizer
    from kdray.stages import judge as judging
    from kdray.stages.evaluate import ANSWER_COLUMNS, ANSWERS_KIND
    from kdray.stages.judge import judge_requests_dataset

    rows = [3 * i for i in range(40)]  # numbered with gaps, as a checked split's rows can be
    ds = ray.data.from_items([{"_row": r, "id": f"q{r}", "prompt": f"p{r}", "response": f"g{r}"} for r in rows],
                             override_num_blocks=6)
    heldout = write_dataset(ds, tmp_path / "heldout", "prompts", row_bytes=FILE_BYTES // 7)
    student, reference = _answers(heldout, tmp_path / "s"), _answers(heldout, tmp_path / "ref")
    assert len(student.info["files"]) != len(reference.info["files"])
    monkeypatch.setattr(judging, "JUDGE_TASK_ROWS", 16)  # two runs, across files
    judge = dict(template="{prompt}|{a}|{b}", judge_model="toy:teacher",
                 encoding=judge_encoding("auto", load_tokenizer("toy:teacher", need_pad=False)), room=100)
    got = [(int(r), i, p) for b in judge_requests_dataset(student, reference, 30, **judge).iter_batches(
        batch_format="numpy") for r, i, p in zip(b["_row"], b["id"], b["prompt"])]
    assert sorted(got) == sorted([(r, f"q{r}|ab", f"p{r}|s{r}|ref{r}") for r in rows[:30]]
                                 + [(r, f"q{r}|ba", f"p{r}|ref{r}|s{r}") for r in rows[:30]])

    with pytest.raises(DataError, match=r"holds 3 answers, not the 30 the judge compares"):
        judge_requests_dataset(student, Artifact(tmp_path / "few", {"files": [], "rows": 3}), 30, **judge)
    reversed_rows = [{c: (r if c == "_row" else f"x{r}") for c in ANSWER_COLUMNS} for r in reversed(rows)]
    shuffled = write_dataset(ray.data.from_items(reversed_rows), tmp_path / "x", ANSWERS_KIND)
    with pytest.raises(Exception) as info:
        judge_requests_dataset(student, shuffled, 30, **judge).materialize()
    assert isinstance(user_error(info.value), DataError)
    assert f"the answers of {tmp_path / 's'} and {tmp_path / 'x'} are not in one row order" in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(300)  # a group-by waiting on CPUs the pool holds would wait forever
def test_a_vllm_judge_on_all_but_a_light_share_of_the_cpus_writes_one_row_per_item(ray_cpus, toy_world, tmp_path):
    """The judge on its default backend, vLLM, its one replica reserving 1.75 of the cluster's 2
    CPUs: its verdicts still reach the group-by that pairs an item's two orders (whose sort
    tasks take a whole CPU each: a CPU replica's actor gives its CPUs back when its stage ends),
    and ``samples/judge/`` holds one row per judged held-out row, student first and second,
    as counted in the summary."""
    import json

    import pyarrow.parquet as pq
    import ray.data

    from kdray.data.artifacts import write_dataset
    from kdray.pipeline.progress import Reporter
    from kdray.stages.context import StageContext
    from kdray.stages.judge import judge

    rows = [2 * i for i in range(10)]
    ds = ray.data.from_items([{"_row": r, "id": f"q{r}", "prompt": f"Q{r}:", "response": f"g{r}"} for r in rows])
    heldout = write_dataset(ds, tmp_path / "heldout", "prompts")
    answers = {"student_after": _answers(heldout, tmp_path / "s"), "teacher": _answers(heldout, tmp_path / "t")}
    spec = parse_spec({"name": "judge", "output_dir": str(tmp_path / "out"), "teacher": {"model": "toy:teacher"},
                       "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                       "generation": {"num_cpus_per_replica": 1.75, "enforce_eager": True},
                       "evaluation": {"judge": {"model": {"model": "toy:teacher", "dtype": "float32",
                                                          "max_model_len": 128},
                                                "max_prompts": 8, "template": "{prompt}{a}\nB:{b}\nbest:"}}})
    assert spec.evaluation.judge.model.backend == "vllm"
    summary = judge(StageContext(spec, tmp_path / "out", Reporter(tmp_path / "events.jsonl")), heldout, answers)
    assert (summary["items"], summary["comparisons"], summary["skipped_too_long"]) == (8, 16, 0)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sum(e["n"] for e in events if e["kind"] == "advance" and e["phase"] == "evaluate") == 16  # its progress
    assert all(sum(summary["verdicts"][side].values()) == 8 for side in ("student_first", "student_second"))

    table = pq.read_table(sorted((tmp_path / "out" / "samples" / "judge").glob("*.parquet")))
    got = sorted(zip(*(table.column(c).to_pylist() for c in ("_row", "id", "student_first_judge_prompt",
                                                              "student_second_judge_prompt"))))
    assert got == [(r, f"q{r}", f"Q{r}:s{r}\nB:t{r}\nbest:", f"Q{r}:t{r}\nB:s{r}\nbest:") for r in rows[:8]]
    assert set(table.column("student_first_verdict").to_pylist()) <= {"A", "B", None}


def test_an_items_verdicts_are_one_row_of_strings_ties_included():
    import numpy as np
    import pyarrow as pa

    from kdray.stages.judge import _verdict_pair

    group = {"_row": np.asarray([4, 4]), "item": np.asarray(["q4", "q4"], dtype=object),
             "order": np.asarray(["ba", "ab"], dtype=object), "prompt": np.asarray(["P-ba", "P-ab"], dtype=object),
             "response": np.asarray([" 7", "maybe"], dtype=object)}
    row = _verdict_pair(group)
    assert row.to_pylist() == [{"_row": 4, "id": "q4", "student_first_judge_prompt": "P-ab",
                                "student_first_output": "maybe", "student_first_verdict": None,
                                "student_second_judge_prompt": "P-ba", "student_second_output": " 7",
                                "student_second_verdict": None}]
    # typed as text though both are ties: every file of samples/judge/ has one schema
    assert row.schema.field("student_first_verdict").type == pa.string()


def test_the_first_n_rows_end_at_their_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.data.artifacts import Artifact, nth_row_number

    for i, rows in enumerate(([0, 2, 3], [5, 9])):  # rows 1, 4, 6-8 were dropped as bad
        pq.write_table(pa.table({"_row": rows}), tmp_path / f"{i}.parquet")
    held = Artifact(tmp_path, {"files": ["0.parquet", "1.parquet"], "rows": 5})
    assert [nth_row_number(held, n) for n in range(1, 6)] == [0, 2, 3, 5, 9]
    with pytest.raises(ValueError):
        nth_row_number(held, 6)


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


def test_paired_differences_line_the_answers_up_by_row_across_files(tmp_path):
    """The student's scores minus another model's, prompt by prompt: the mean difference and its
    standard error over the prompts' differences (float64 reference), read from two answers
    datasets whose files split the rows differently; rows that do not line up give no figure."""
    import statistics

    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.data.artifacts import Artifact
    from kdray.data.text_scores import paired_difference
    from kdray.stages.evaluate import paired_scores

    before = {"rougeL": [0.5, 0.2, 0.9, 0.4], "exact_match": [1.0, 0.0, 1.0, 0.0]}
    after = {"rougeL": [0.7, 0.3, 0.8, 0.4], "exact_match": [1.0, 1.0, 1.0, 0.0]}

    def answers(name, scores, splits, rows=(0, 1, 2, 3)):
        (tmp_path / name).mkdir()
        files, start = [], 0
        for size in splits:
            files.append(f"{len(files)}.parquet")
            pq.write_table(pa.table({"_row": list(rows[start:start + size]),
                                     **{k: v[start:start + size] for k, v in scores.items()}}), tmp_path / name / files[-1])
            start += size
        return Artifact(tmp_path / name, {"files": files, "rows": len(rows)})

    got = paired_scores({"student_before": answers("b", before, [3, 1]), "student_after": answers("a", after, [1, 2, 1])})
    assert list(got) == ["student_after - student_before"]  # no teacher: that pair is left out
    d = got["student_after - student_before"]
    for key in ("rougeL", "exact_match"):
        diffs = [y - x for x, y in zip(before[key], after[key])]
        assert d[key] == pytest.approx(statistics.fmean(diffs))
        assert d[f"{key}_stderr"] == pytest.approx(statistics.stdev(diffs) / 2)
    assert d["n"] == 4 and d == paired_difference(zip(zip(*before.values()), zip(*after.values())))
    shuffled = answers("s", after, [4], rows=(0, 2, 1, 3))
    assert paired_scores({"student_before": answers("b2", before, [4]), "student_after": shuffled}) == {}
    empty = {"rougeL": [], "exact_match": []}  # no held-out prompt: no difference to give
    assert paired_scores({"student_before": answers("e1", empty, [0], rows=()),
                          "student_after": answers("e2", empty, [0], rows=())}) == {}


def test_each_round_is_paired_with_the_one_before_when_its_answers_are_this_runs(tmp_path):
    """A job scored per round compares round 1 with the student before, each round with the one
    before it and the student after with the last round; a round whose answers are gone, or are
    an earlier run's (other scores than the job state's), gives no pair."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdray.data.artifacts import FORMAT, MARKER, Artifact
    from kdray.stages.evaluate import ANSWERS_KIND, PAIRED, paired_scores, round_pairs

    def committed(label, rouge, scores):
        path = tmp_path / "samples" / label
        path.mkdir(parents=True)
        pq.write_table(pa.table({"_row": [0, 1], "rougeL": rouge, "exact_match": [0.0, 1.0]}), path / "0.parquet")
        info = {"format": FORMAT, "kind": ANSWERS_KIND, "files": ["0.parquet"], "rows": 2, "columns": [],
                "bytes": 0, "meta": {}, "scores": scores}
        (path / MARKER).write_text(json.dumps(info))
        return Artifact(path, info)

    ones = {"rougeL": 0.5, "n": 2}
    before, after = committed("student_before", [0.1, 0.2], ones), committed("student_after", [0.6, 0.9], ones)
    first = committed("student_round_1", [0.3, 0.3], {"rougeL": 0.3, "n": 2})
    committed("student_round_2", [0.4, 0.5], {"rougeL": 0.45, "n": 2})  # an earlier run's scores
    rounds, pairs = round_pairs(tmp_path, {"student_round_1": {"rougeL": 0.3, "n": 2},
                                           "student_round_2": {"rougeL": 0.5, "n": 2}})
    assert list(rounds) == ["student_round_1"] and rounds["student_round_1"].info == first.info
    assert pairs == [("student_round_1", "student_before"), ("student_round_2", "student_round_1"),
                     ("student_after", "student_round_2")]
    got = paired_scores({"student_before": before, "student_after": after, **rounds}, (*PAIRED, *pairs))
    assert list(got) == ["student_after - student_before", "student_round_1 - student_before"]
    assert got["student_round_1 - student_before"]["rougeL"] == pytest.approx(0.15)
    assert round_pairs(tmp_path, {}) == ({}, [])  # one segment: no rounds to pair
