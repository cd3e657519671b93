"""The per-micro-batch objectives of the training worker, on the toy models without Ray:
the loss a worker optimises is the loss library's, with the segment's schedule values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray import losses
from kdray.curriculum import DistiLLM2Schedule, distillm2_delta
from kdray.models import load_causal_lm
from kdray.curriculum.plan import plan_segments
from kdray.spec import parse_spec
from kdray.train.objectives import DistiLLM2Step, KDStep, make_step_objective
from kdray.data.examples import TokenizeForTraining, training_batch


def make(objective, curriculum=None):
    data = {"name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher", "dtype": "float32"},
            "student": {"model": "toy:student", "dtype": "float32"},
            "data": {"train": "toy:train", "heldout": "toy:heldout"},
            "training": {"num_workers": 1, "global_batch_size": 2, "micro_batch_size_per_worker": 2}}
    data["objective"] = objective
    if curriculum:
        data["curriculum"] = curriculum
    return parse_spec(data)


@pytest.fixture(scope="module")
def models(toy_world):
    torch.manual_seed(0)
    return load_causal_lm("toy:student", "float32", trainable=False), load_causal_lm("toy:teacher", "float32", trainable=False)


def batch_of(student_responses: bool):
    tok = TokenizeForTraining("toy:student", max_seq_len=32)
    raw = {"prompt": np.array(["Q: sort 3 1 2\nA:", "Q: reverse 4 5\nA:"]),
           "response": np.array([" 1 2 3", " 5 4"]), "finish_reason": np.array(["stop", "stop"])}
    if student_responses:
        raw.update(student_response=np.array([" 1 1", " 4 4 4"]), student_finish_reason=np.array(["stop", "length"]))
    return training_batch(tok, raw)


@pytest.mark.parametrize("stage, scaled", [(0, True), (-1, True), (-1, False)])
def test_kd_step_uses_the_pocl_stage_temperature_and_kd_ratio(models, stage, scaled):
    """The stage's temperature and kd_ratio; above T = 1 the KD term weighs T² (Hinton et al.
    2015, §2: the soft targets' gradients shrink as 1/T²; POCL's released losses do it), so the
    last stage, at T = 2, weighs it 4×; ``objective.t_squared_scaling: false`` leaves it as it
    is. The logged ``kd`` is the divergence itself."""
    student, teacher = models
    spec = make({"kind": "forward_kl", "t_squared_scaling": scaled}, {"kind": "pocl", "n_stages": 2, "stage_interval": 1})
    seg = plan_segments(spec, 8)[stage]
    assert seg.kd_temperature == (1.0 if stage == 0 else 2.0) and (stage != 0 or seg.kd_ratio == 0.7)
    step = make_step_objective(spec, seg, total_steps=6, num_segments=2, state=None)
    assert type(step) is KDStep
    b = batch_of(False)
    loss, parts, n_tokens = step(student, teacher, b)
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    target = b["labels"][:, 1:]
    mask = target != -100
    kd = losses.masked_token_mean(losses.forward_kl(s, t, temperature=seg.kd_temperature), mask)
    ce = losses.masked_token_mean(losses.token_cross_entropy(s, target), mask)
    weight = seg.kd_temperature ** 2 if scaled else 1.0
    assert float(loss) == pytest.approx(float(seg.kd_ratio * weight * kd + (1 - seg.kd_ratio) * ce), rel=1e-5)
    assert parts["kd"] == pytest.approx(float(kd), rel=1e-5)
    assert "ce" not in parts if seg.kd_ratio == 1.0 else parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert n_tokens == int(mask.sum())
    assert step.metrics() == {"kd_temperature": seg.kd_temperature, "kd_ratio": seg.kd_ratio}


@pytest.mark.parametrize("mode", ["paper", "released_code"])
def test_distillm2_step_is_the_contrastive_loss_with_scheduled_alpha_and_beta(models, mode):
    student, teacher = models
    spec = make({"kind": "distillm2", "alpha": 0.1}, {"kind": "distillm2", "rounds": 2, "mode": mode})
    plan = plan_segments(spec, 4)
    step = make_step_objective(spec, plan[0], total_steps=4, num_segments=2, state=None)
    assert isinstance(step, DistiLLM2Step)
    b = batch_of(True)

    # An independent reference: the same schedule object, driven by hand.
    ref = DistiLLM2Schedule(num_rounds=2, total_steps=4, mode=mode, alpha0=0.1)
    ids = torch.cat([b["input_ids"], b["s_input_ids"]])
    attn = torch.cat([b["attention_mask"], b["s_attention_mask"]])
    target = torch.cat([b["labels"], b["s_labels"]])[:, 1:]
    mask = target != -100
    s = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
    t = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
    flags = torch.tensor([False, False, True, True])
    gather = lambda x: x.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    delta = distillm2_delta(gather(t), gather(s), mask, flags)

    for call in range(2):  # the second call uses the running means the first one observed
        alpha = ref.alpha(delta, flags)
        expected, _ = losses.distillm2_loss(s[:2], t[:2], mask[:2], s[2:], t[2:], mask[2:], beta=ref.beta,
                                            skl_alpha=alpha[:2], srkl_alpha=alpha[2:])
        ref.observe(delta, flags)
        loss, parts, _ = step(student, teacher, b)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert set(parts) == {"kd", "skl", "srkl"}
        step.end_micro_batches()  # as accumulate_step does at the end of every step
        step.optimizer_step()
        ref.step()
    m = step.metrics()
    assert m["beta"] == (1.0 if mode == "released_code" else 1.5)  # t = 2 of T = 4: the ramp's top
    assert m["delta_mean_teacher"] == pytest.approx(float(delta[:2].mean()))
    for key, value in ref.metrics().items():
        if key != "round":
            assert m[key] == pytest.approx(value, rel=1e-5), key
    if mode == "released_code":
        assert m["alpha_min"] == m["alpha_max"] == pytest.approx(0.1)

    # The state saved at the end of round 1 continues identically in round 2's segment.
    nxt = make_step_objective(spec, plan[1], total_steps=4, num_segments=2, state=step.state_dict())
    assert nxt.schedule.round == 1 and nxt.schedule.beta == step.schedule.beta
    assert nxt.schedule.delta_mean(False) == step.schedule.delta_mean(False)


def test_a_micro_batch_that_does_not_fit_the_gpu_ends_training_with_what_takes_less(models):
    """torch's out-of-memory error in a step (here raised by a forward hook of the student, as a
    GPU's allocator would raise it) becomes a ClusterError naming the micro-batch's shape and the
    settings that take less: a KdrayError, which Ray Train does not retry (the same batch after
    the same checkpoint would need the same memory)."""
    from kdray.errors import ClusterError
    from kdray.stages.train import worker_user_error
    from kdray.train.step import accumulate_step

    student, teacher = models
    spec = make({"kind": "forward_kl"})
    step = make_step_objective(spec, plan_segments(spec, 8)[0], total_steps=4, num_segments=1, state=None)
    b = batch_of(False)

    def no_room(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free.\nIncluding non-PyTorch memory ...")

    hook = student.get_input_embeddings().register_forward_hook(no_room)  # whichever path the loss takes
    try:
        with pytest.raises(ClusterError) as info:
            accumulate_step(step, student, teacher, [b], backward=lambda loss: None)
    finally:
        hook.remove()
    msg = str(info.value)
    rows, tokens = b["input_ids"].shape
    assert msg.startswith("a training worker ran out of GPU memory on node ") and (
        "(CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        f"is free.), in a micro-batch of {rows} × {tokens} (sequences × tokens)") in msg, msg
    for fix in ("training.micro_batch_size_per_worker", "training.gradient_checkpointing: true", "kdray validate",
                "it resumes from its latest checkpoint"):
        assert fix in msg
    assert worker_user_error(info.value) is info.value  # not retried
    # The same in the backward pass, through the runner's own backward (DeepSpeed's, in a worker).
    with pytest.raises(ClusterError, match="ran out of GPU memory"):
        accumulate_step(step, student, teacher, [b], backward=lambda loss: no_room())
