"""One training step, two runners: the local loop equals the Ray Train worker, under ZeRO-3.

A real job (2 Ray Train workers, DeepSpeed ZeRO-3 over gloo, which partitions every parameter)
trains 6 optimizer steps on 8 rows with micro-batches of one row (4 accumulated per rank), so
every step sees every row once whatever order Ray Data's shuffle gives: the step's loss is the
mean over the 8 rows' label tokens and its gradient that mean's gradient, whatever the split.
:class:`kdray.train.loop.LocalLoop` then trains the same student on the same 8 micro-batches,
and on one micro-batch of all 8 rows, and each step's loss and gradient norm (before clipping)
must agree with the workers'. The same job checks that ZeRO-3's export gathers a full, trained checkpoint.
"""

from __future__ import annotations

import pytest
import yaml

from kdray.report.render import load_report
from tests.test_e2e import REPO, kdray

N_ROWS, STEPS = 8, 6


def parity_spec(tmp_path):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["name"] = "parity"
    spec["output_dir"] = str(tmp_path / "out")
    spec["data"].update(max_train_samples=N_ROWS, response_source="dataset")
    spec["training"].update(num_workers=2, zero_stage=3, global_batch_size=N_ROWS, micro_batch_size_per_worker=1,
                            epochs=STEPS, warmup_steps=1, gradient_clipping=0.5)
    spec["evaluation"] = {"enabled": False}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def local_steps(spec_path, rows_per_micro_batch: int = 1):
    import torch

    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.data.datasets import load_split
    from kdray.data.examples import CollateExamples, TokenizeForTraining
    from kdray.models import load_causal_lm
    from kdray.spec import load_spec
    from kdray.train.loop import LocalLoop
    from kdray.train.teacher import load_teacher

    spec = load_spec(spec_path)
    rows, _ = load_split(spec.data, "train", lambda prompts: [1] * len(prompts), need_response=True)
    assert len(rows) == N_ROWS
    encoder = TokenizeForTraining(spec.student.model, spec.training.max_seq_len, spec.data.chat_template)
    encoded = encoder(
        {"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
         "finish_reason": ["stop"] * len(rows)})
    r = rows_per_micro_batch
    collate = CollateExamples(encoder.pad_id)  # as a worker pads each micro-batch
    micro_batches = [collate({k: v[i:i + r] for k, v in encoded.items()}) for i in range(0, N_ROWS, r)]
    torch.manual_seed(spec.training.seed)
    student = load_causal_lm(spec.student.model, spec.student.dtype, trainable=True)
    student.train()
    plan = plan_segments(spec, N_ROWS)
    loop = LocalLoop(spec, student, load_teacher(spec), total_steps=total_steps(plan), num_segments=len(plan))
    loop.begin_segment(plan[0])
    return [loop.step(micro_batches) for _ in range(STEPS)]


@pytest.mark.slow
def test_local_loop_and_zero3_workers_give_the_same_steps_and_a_full_export(tmp_path, toy_world):
    spec_path = parity_spec(tmp_path)
    res = kdray("run", str(spec_path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    worker = [m for m in load_report(tmp_path / "out", with_steps=True)["train_metrics"] if "loss" in m]
    local = local_steps(spec_path)
    # The step's objective is the mean over all its label tokens, however it is split: the workers'
    # 2 ranks × 4 accumulated micro-batches, 8 local micro-batches, and one micro-batch of 8 rows.
    whole = local_steps(spec_path, rows_per_micro_batch=N_ROWS)
    assert [m["step"] for m in worker] == [m["step"] for m in local] == list(range(1, STEPS + 1))
    for w, loc, one in zip(worker, local, whole):
        for ref in (loc, one):
            assert ref["loss"] == pytest.approx(w["loss"], rel=1e-4), (w, ref)
            assert ref["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), (w, ref)
            assert ref["lr"] == pytest.approx(w["lr"], rel=1e-9)
        assert loc["tokens"] == one["tokens"]
    assert all(0 < m["grad_norm"] < float("inf") for m in local)
    assert sum(m["loss"] for m in worker[-2:]) < sum(m["loss"] for m in worker[:2])

    # ZeRO-3 partitions every parameter; the export gathers them into one full checkpoint.
    import torch
    from transformers import AutoModelForCausalLM

    from kdray.models import load_causal_lm

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student")
    initial = load_causal_lm("toy:student", "float32", trainable=False)
    for (name, p), (_, q) in zip(exported.named_parameters(), initial.named_parameters()):
        assert p.shape == q.shape and p.numel() > 0, name  # not a ZeRO-3 placeholder
    assert any(not torch.equal(p, q) for p, q in zip(exported.parameters(), initial.parameters()))
