"""Teacher-signal modes on the real stack: whole jobs trained from top-k and hidden-state
records of the dataset's responses (Ray Data scoring pool → parquet records → Ray Train +
DeepSpeed ZeRO-2 workers with no teacher model), the records checked row by row against a plain
HF forward of the teacher; the hidden-state job trains a bfloat16 student with its optimizer
offloaded to the CPU. The top-k job is also on-policy (GKD's λ = 0.5, issue 20): its other steps
train on the student's samples, graded by a live top-k teacher pool as they come."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdray.report.render import load_report
from tests.test_e2e import kdray, reduced_demo


def _assert_records_are_the_teachers(examples: list[dict], meta: dict, ids) -> None:
    """The scorer pool's records (vLLM) against a plain HF forward of the teacher, row by row:
    top-k log-probs (float16 as stored) or final hidden states (float32), whose product with
    the teacher's lm_head is its logits."""
    import torch

    from kdray.data.records import decode_signal
    from kdray.models import load_causal_lm

    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    head = teacher.get_output_embeddings().weight
    for example in examples:
        tokens, start = ids(example["input_ids"]), example["prompt_len"]
        record = decode_signal(example, meta)
        with torch.no_grad():
            out = teacher(input_ids=torch.as_tensor([tokens]), output_hidden_states=True)
        logits = out.logits[0, start - 1: len(tokens) - 1]  # the positions that predict the response
        if meta["mode"] == "topk":
            logp = logits.log_softmax(-1)
            stored_ids, stored = record["topk_ids"], record["topk_logprobs"]
            assert stored_ids.shape == (len(tokens) - start, meta["k"])
            values = logp.topk(meta["k"]).values.numpy()
            assert np.allclose(stored, values, rtol=2e-3, atol=2e-3)  # descending, the teacher's top k
            assert np.allclose(logp.gather(1, torch.as_tensor(stored_ids)).numpy(), stored, rtol=2e-3, atol=2e-3)
        else:
            hidden = torch.as_tensor(record["hidden"])
            assert hidden.shape == (len(tokens) - start, teacher.config.hidden_size)
            assert torch.allclose(hidden @ head.T, logits, atol=1e-4, rtol=1e-4)


#: The top-k job's curriculum: half its steps on the student's samples, the weights pushed every
#: 2 steps, each on-policy step's samples made when it starts.
ON_POLICY = {"kind": "on_policy", "lmbda": 0.5, "sync_every_steps": 2, "max_staleness": 0, "replicas": 1,
             "num_cpus_per_replica": 0.25}


def _signal_job(tmp_path: Path, signal: dict, objective: dict, student: dict, training: dict) -> Path:
    path = reduced_demo(tmp_path, **training)
    spec = yaml.safe_load(path.read_text())
    spec["teacher_signal"] = signal
    if signal["mode"] == "topk":  # the two pools beside 2 workers on 3 CPUs, with room for the reads
        spec["curriculum"] = ON_POLICY
        spec["generation"]["num_cpus_per_replica"] = 0.25
    spec["objective"] = objective
    spec["student"].update(student)
    spec["evaluation"] = {"enabled": False}
    # The toy dataset's own responses: the records are what these jobs are about, and a teacher
    # pool generating the responses first costs CI half a minute a job.
    spec["data"]["response_source"] = "dataset"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signal,objective,student,training", [
    ({"mode": "topk", "k": 20}, {"kind": "adaptive_kl", "mu": 0.5}, {}, {}),
    # The hidden-state job also trains a bfloat16 student with its optimizer offloaded (one
    # job for both: each costs CI a minute and a half, mostly start-up).
    ({"mode": "hidden"}, {"kind": "forward_kl"}, {"dtype": "bfloat16"}, {"offload_optimizer": True}),
])
def test_a_job_trains_from_teacher_records(tmp_path, toy_world, signal, objective, student, training):
    res = kdray("run", str(_signal_job(tmp_path, signal, objective, student, training)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    report = load_report(out, with_steps=True)
    phases = [json.loads(line)["phase"] for line in (out / "events.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "phase_end"]
    assert phases[:4] == ["prepare", "generate", "score", "train"]
    stats = report["teacher_signal"]
    assert stats["mode"] == signal["mode"] and stats["rows"] == 256 and stats["tokens"] > 256
    records = out / "records" / f"teacher-{signal['mode']}"
    marker = json.loads((records / "_kdray_dataset.json").read_text())  # committed by the scorer's writes
    assert marker["rows"] == 256 and stats["bytes"] == sum((records / f).stat().st_size for f in marker["files"])
    assert not list((out / "records").glob(".*partial*"))
    # The records are the training examples (the dataset's responses, tokenized by the generate
    # stage), each with the teacher's signal for its response tokens.
    import pyarrow.parquet as pq

    examples = {r["key"]: r for f in marker["files"] for r in pq.read_table(records / f).to_pylist()}
    responses = out / "datasets" / "responses"
    tokenized = [r for f in json.loads((responses / "_kdray_dataset.json").read_text())["files"]
                 for r in pq.read_table(responses / f, columns=["key", "input_ids", "prompt_len"]).to_pylist()]
    assert len(tokenized) == len(examples) == 256
    def ids(cell):  # ragged ids are Ray Data's variable-shaped tensors: {data, shape} structs, or
        # numpy arrays once ray.data has registered its Arrow extension types in this process
        return [int(t) for t in (cell["data"] if isinstance(cell, dict) else cell)]

    for row in tokenized:
        example = examples[row["key"]]
        assert ids(example["input_ids"]) == ids(row["input_ids"]) and example["prompt_len"] == row["prompt_len"]
        assert example["n_tokens"] == len(ids(row["input_ids"])) - row["prompt_len"] > 0
    _assert_records_are_the_teachers([examples[row["key"]] for row in tokenized[:16]], marker["meta"], ids)
    if signal["mode"] == "topk":
        assert stats["bytes_per_token"] <= 100  # the budget at k = 20
    steps = [m for m in report["train_metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 17))
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in steps)
    if signal["mode"] == "topk":
        _assert_on_policy_steps(out, steps)
        steps = [m for m in steps if not m["on_policy"]]  # the records' steps
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    # the exported student is a plain HF model
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "student").config.vocab_size > 0
    config = json.loads((out / "student" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == student.get("dtype", "float32")


def _assert_on_policy_steps(out: Path, steps: list[dict]) -> None:
    """The top-k job's on-policy steps: drawn per step with λ, their samples from the weights
    pushed at the configured steps and graded by the live teacher pool."""
    from kdray.train.on_policy import on_policy_step

    messages = [json.loads(line).get("text", "") for line in (out / "events.jsonl").read_text().splitlines()]
    assert "train: the on-policy student pool runs: 1 vLLM replica beside the workers" in messages
    assert "train: the teacher pool scores the student's samples: 1 replica (vllm, top-20)" in messages
    drawn = [on_policy_step(0, m["step"], ON_POLICY["lmbda"]) for m in steps]
    assert [bool(m["on_policy"]) for m in steps] == drawn and 0 < sum(drawn) < len(steps)
    pushed = 0  # the weights the pool serves: the start's, then after every second step
    for m in steps:
        if m["on_policy"]:
            assert m["sample_version"] == pushed and m["staleness"] == 0  # max_staleness 0
            assert m["generate_s"] > 0 and m["teacher_score_s"] > 0 and m["sampling_s"] > 0
            assert 0 < m["loss"] < 50
        else:
            assert "teacher_score_s" not in m and "sample_version" not in m
        if m["step"] % ON_POLICY["sync_every_steps"] == 0:
            pushed = m["step"]
    report_md = (out / "report.md").read_text()
    assert f"| on-policy steps (student samples) | {sum(drawn)} of {len(steps)}; largest staleness 0 (pushes); " in report_md
    assert "the teacher pool's grading" in report_md
