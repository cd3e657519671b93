"""Evaluation per round and the LLM judge end to end, on the real stack (vLLM pool on Ray Data,
Ray Train + DeepSpeed ZeRO-2 on 2 gloo workers): a two-stage POCL job whose stage-1 student
is scored on the held-out prompts, and the toy teacher judging the final student against the
teacher in both answer orders. Minutes, so marked slow (CI runs it)."""

from __future__ import annotations

import json

import pytest
import yaml

from kdray.stages.evaluate import parse_verdict
from tests.test_e2e import REPO, kdray
from tests.test_report import png_size

HELDOUT, JUDGED = 32, 12


@pytest.mark.slow
def test_two_stage_job_scores_each_round_and_runs_the_judge(tmp_path, toy_world):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec.update(name="per-round", output_dir=str(tmp_path / "out"),
                objective={"kind": "forward_kl"},
                curriculum={"kind": "pocl", "n_stages": 2, "stage_interval": 1})
    # The dataset's responses (no teacher generation pass) keep the job short.
    spec["data"].update(max_train_samples=128, max_heldout_samples=HELDOUT, response_source="dataset")
    spec["training"].update(epochs=1, warmup_steps=1)
    spec["evaluation"] = {
        "max_new_tokens": 16, "per_round": True,
        # The toy teacher as judge: mechanics only (it was never trained to judge). A short
        # template fits its 128 positions.
        "judge": {"model": {"model": "toy:teacher", "dtype": "float32", "max_model_len": 128},
                  "reference": "teacher", "max_prompts": JUDGED, "max_new_tokens": 2,
                  "template": "{prompt}{a}\nB:{b}\nbest:"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = kdray("run", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())

    # Round 1 (the stage-1 student) is scored; the last stage's student is student_after.
    ev = report["evaluation"]
    assert list(ev) == ["teacher", "student_before", "student_round_1", "student_after"]
    for label, scores in ev.items():
        assert scores["n"] == HELDOUT and 0.0 <= scores["rougeL"] <= 1.0 and 0.0 <= scores["exact_match"] <= 1.0
        assert (out / "samples" / f"{label}.jsonl").is_file()
    assert ev["teacher"]["exact_match"] > ev["student_before"]["exact_match"]
    # Scored right after stage 1: between the stage-1 training and stage 2's.
    phases = [(e["phase"], e.get("detail", "")) for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
              if e["kind"] == "phase_end"]
    names = [p for p, _ in phases]
    first_eval = names.index("evaluate")
    assert names[first_eval - 1] == "train" and names[first_eval + 1] == "train"
    assert "stage 1/2" in phases[first_eval][1]
    state = json.loads((out / "state" / "job.json").read_text())
    assert state["round_scores"]["0"] == ev["student_round_1"]  # kept for a resumed run

    # The rounds plot exists and is a real image; report.md shows it and the judge.
    width, height = png_size(out / "evaluation_rounds.png")
    assert width >= 800 and height >= 250
    md = (out / "report.md").read_text()
    assert "](evaluation_rounds.png)" in md and "| student round 1 |" in md and "## LLM judge" in md

    # The judge: both orders of every judged prompt, rates in [0, 1], ties from unparseable output.
    judge = report["judge"]
    assert judge["model"] == "toy:teacher" and judge["reference"] == "teacher"
    assert judge["items"] + judge["skipped_too_long"] == JUDGED
    assert judge["comparisons"] == 2 * judge["items"] > 0
    assert judge["wins"] + judge["losses"] + judge["ties"] == judge["comparisons"]
    for key in ("win_rate", "position_consistency", "first_position_bias", "second_position_bias"):
        assert 0.0 <= judge[key] <= 1.0
    verdicts = [json.loads(line) for line in (out / "samples" / "judge.jsonl").read_text().splitlines()]
    assert len(verdicts) == judge["comparisons"]
    assert {v["order"] for v in verdicts} == {"student_first", "student_second"}
    assert all(v["verdict"] == parse_verdict(v["output"]) for v in verdicts)
    assert sum(v["verdict"] is None for v in verdicts) == judge["ties"]
    assert "judge toy:teacher: student after vs teacher: win rate" in res.stdout
