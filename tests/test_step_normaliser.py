"""A step's objective and gradient do not depend on how the step is split (issue 14, item 1).

Eight rows whose responses have very different lengths are one optimizer step. Trained as one
micro-batch, every label token (every response, for DistiLLM-2's per-response reduction) weighs
the same. Split into 2 or 4 micro-batches (gradient accumulation) and over 2 ranks, the step
must give the same loss and the same gradient, in float64, for every objective kind and teacher
signal: :func:`kdray.train.step.accumulate_step` counts the step's items first
(``num_items_in_batch``) and every micro-batch is normalised by that count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.curriculum.plan import plan_segments
from kdray.data.examples import TokenizeForTraining, training_batch
from kdray.models import load_causal_lm, shared_vocab_size
from kdray.spec import parse_spec
from kdray.train.objectives import make_step_objective
from kdray.train.teacher import TeacherHead
from kdray.train.step import accumulate_step
from tests.ranks import run_ranks

# Responses of very different lengths, longest first, so a split by position puts the long
# responses in one micro-batch and the short ones in another (the worst case).
PROMPTS = ["Q: sort 3 1 2\nA:", "Q: reverse 4 5\nA:", "Q: sort 9 8\nA:", "Q: reverse 1 2 3\nA:",
           "Q: sort 5 5 1\nA:", "Q: reverse 7\nA:", "Q: sort 2 6\nA:", "Q: reverse 8 9\nA:"]
RESPONSES = [" 1 2 3 4 5 6 7 8 9 1 2 3", " 5 4 3 2 1 9 8 7", " 8 9 1 2 3 4", " 3 2 1 1", " 1 5 5",
             " 7", "", " 9"]
STUDENT_RESPONSES = [" 1", " 5 4 4 4 4 4 4 4 4 4", " 8", " 3 3 3 3 3 3", " 1", " 7 7 7", " 2 2", ""]
TOPK = 4

CASES = [  # (objective, teacher_signal mode, ZeRO stage: a plain model takes the fused path at any)
    ({"kind": "forward_kl"}, "online", 2),
    ({"kind": "reverse_kl", "kd_ratio": 0.6}, "online", 2),
    ({"kind": "jsd", "beta": 0.3}, "online", 2),
    ({"kind": "tvd"}, "online", 2),
    ({"kind": "skew_forward_kl", "alpha": 0.2}, "online", 2),
    ({"kind": "skew_reverse_kl", "alpha": 0.2, "detach_mixture_student": False, "kd_ratio": 0.5}, "online", 2),
    ({"kind": "adaptive_kl"}, "online", 2),
    ({"kind": "forward_kl", "kd_ratio": 0.7}, "topk", 2),
    ({"kind": "adaptive_kl"}, "topk", 2),
    ({"kind": "reverse_kl", "kd_ratio": 0.7}, "hidden", 2),  # the fused lm-head path
    ({"kind": "jsd"}, "hidden", 3),
    ({"kind": "distillm2", "alpha": 0.1}, "online", 2),
    ({"kind": "distillm2", "alpha": 0.1, "kd_ratio": 0.8}, "online", 2),
]


def make_spec(objective: dict, mode: str, zero_stage: int):
    data = {"name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher", "dtype": "float32"},
            "student": {"model": "toy:student", "dtype": "float32"},
            "data": {"train": "toy:train", "heldout": "toy:heldout"}, "objective": objective,
            "teacher_signal": {"mode": mode, **({"k": TOPK} if mode == "topk" else {})},
            "training": {"num_workers": 1, "global_batch_size": 8, "micro_batch_size_per_worker": 8,
                         "zero_stage": zero_stage}}
    if objective["kind"] == "distillm2":
        data["curriculum"] = {"kind": "distillm2", "rounds": 1, "mode": "paper"}
    return parse_spec(data)


def load_models():
    student = load_causal_lm("toy:student", "float32", trainable=True).double()
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False).double()
    return student, teacher


def make_batch(teacher) -> dict[str, torch.Tensor]:
    """The 8 rows as one batch, with both responses and the teacher's stored signals."""
    raw = {"prompt": np.array(PROMPTS), "response": np.array(RESPONSES), "finish_reason": np.array(["stop"] * 8),
           "student_response": np.array(STUDENT_RESPONSES), "student_finish_reason": np.array(["stop"] * 8)}
    batch = training_batch(TokenizeForTraining("toy:student", max_seq_len=40), raw)
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    # Stored signals sit at the label they predict: position j holds the teacher at position j - 1.
    lps = out.logits.log_softmax(-1)
    top = lps.topk(TOPK, dim=-1)
    ids, vals = torch.zeros_like(top.indices), torch.zeros_like(top.values)
    ids[:, 1:], vals[:, 1:] = top.indices[:, :-1], top.values[:, :-1]
    hidden = torch.zeros_like(out.hidden_states[-1])
    hidden[:, 1:] = out.hidden_states[-1][:, :-1]
    return {**batch, "t_topk_ids": ids, "t_topk_logprobs": vals, "t_hidden": hidden}


def teacher_for(spec, teacher):
    if spec.teacher_signal.mode == "hidden":
        head = teacher.get_output_embeddings()
        return TeacherHead(head.weight.detach(), head.bias, shared_vocab_size("toy:teacher", "toy:student"))
    return teacher if spec.teacher_signal.mode == "online" else None


def keys_for(spec) -> list[str]:
    keys = ["input_ids", "attention_mask", "labels"]
    if spec.objective.kind == "distillm2":
        keys += ["s_input_ids", "s_attention_mask", "s_labels"]
    return keys + {"topk": ["t_topk_ids", "t_topk_logprobs"], "hidden": ["t_hidden"]}.get(spec.teacher_signal.mode, [])


def split(batch, keys, rows: range, n_micro: int) -> list[dict[str, torch.Tensor]]:
    size = len(rows) // n_micro
    return [{k: batch[k][rows.start + i * size: rows.start + (i + 1) * size] for k in keys} for i in range(n_micro)]


def run_step(spec, student, teacher, micro_batches, scale: float = 1.0) -> tuple[dict[str, float], torch.Tensor]:
    """One step's metrics and gradient (a fresh objective each time: DistiLLM-2's α state)."""
    segment = plan_segments(spec, 8)[0]
    objective = make_step_objective(spec, segment, total_steps=4, num_segments=1, state=None)
    student.zero_grad(set_to_none=True)
    sums = accumulate_step(objective, student, teacher_for(spec, teacher), micro_batches,
                           lambda loss: (loss * scale).backward())
    grad = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    return sums, grad


@pytest.fixture(scope="module")
def world(toy_world):
    torch.manual_seed(0)
    student, teacher = load_models()
    return student, teacher, make_batch(teacher)


def test_the_rows_make_a_step_that_splits_unevenly(world):
    _, _, batch = world
    tokens = (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    assert tokens[0] >= 3 * max(tokens[4:]) and 0 < min(tokens)  # the empty response still has its EOS
    # Split in two, the halves' token counts differ by far: the per-micro-batch mean is wrong here.
    assert sum(tokens[:4]) > 3 * sum(tokens[4:])


def test_forward_kl_step_is_the_mean_over_every_label_token_of_the_step(world):
    """An independent float64 reference: Σ over every label token of KL(p‖q) / their number."""
    student, teacher, batch = world
    spec = make_spec({"kind": "forward_kl"}, "online", 2)
    sums, _ = run_step(spec, student, teacher, split(batch, keys_for(spec), range(8), 4))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    p = t.softmax(-1)
    kl = (p * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    expected = float(kl[mask].sum() / mask.sum())
    assert sums["loss"] == pytest.approx(expected, rel=1e-10)
    # What the old per-micro-batch mean gave: visibly different, so this test can fail.
    per_micro = np.mean([float(kl[i:i + 2][mask[i:i + 2]].mean()) for i in range(0, 8, 2)])
    assert abs(per_micro - expected) > 1e-3 * expected


@pytest.mark.parametrize("objective, mode, zero_stage", CASES,
                         ids=[f"{o['kind']}-{m}-z{z}{'-ce' if 'kd_ratio' in o else ''}" for o, m, z in CASES])
def test_gradient_accumulation_gives_the_one_micro_batch_step(world, objective, mode, zero_stage):
    student, teacher, batch = world
    spec = make_spec(objective, mode, zero_stage)
    keys = keys_for(spec)
    ref_sums, ref_grad = run_step(spec, student, teacher, split(batch, keys, range(8), 1))
    assert torch.isfinite(ref_grad).all() and ref_grad.abs().sum() > 0
    for n_micro in (2, 4):
        sums, grad = run_step(spec, student, teacher, split(batch, keys, range(8), n_micro))
        for key in ref_sums:
            assert sums[key] == pytest.approx(ref_sums[key], rel=1e-9, abs=1e-12), (n_micro, key)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def _two_ranks(rank: int) -> dict:
    """One of two gloo ranks: its half of the rows, as 1 or 2 micro-batches; the gradient summed
    over micro-batches and averaged over the ranks, as DeepSpeed reduces it (the worker scales
    each loss by the number of ranks to undo that average)."""
    import torch.distributed as dist

    student, teacher = load_models()
    batch = make_batch(teacher)
    out = {}
    for objective, mode, zero_stage in CASES:
        spec = make_spec(objective, mode, zero_stage)
        for n_micro in (1, 2):
            micro = split(batch, keys_for(spec), range(4 * rank, 4 * rank + 4), n_micro)
            sums, grad = run_step(spec, student, teacher, micro, scale=2.0)
            dist.all_reduce(grad)
            loss = torch.tensor([sums["loss"]], dtype=torch.float64)
            dist.all_reduce(loss)
            out[(objective["kind"], mode, zero_stage, "kd_ratio" in objective, n_micro)] = (
                float(loss), (grad / 2).numpy())
    return out


def test_two_ranks_give_the_one_micro_batch_step(world, tmp_path):
    student, teacher, batch = world
    got = run_ranks(_two_ranks, tmp_path)
    for objective, mode, zero_stage in CASES:
        spec = make_spec(objective, mode, zero_stage)
        ref_sums, ref_grad = run_step(spec, student, teacher, split(batch, keys_for(spec), range(8), 1))
        for n_micro in (1, 2):
            loss, grad = got[(objective["kind"], mode, zero_stage, "kd_ratio" in objective, n_micro)]
            assert loss == pytest.approx(ref_sums["loss"], rel=1e-9), (objective, mode, n_micro)
            np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-8, atol=1e-12)
