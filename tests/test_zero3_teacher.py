"""Under ZeRO-3 the online teacher is partitioned like the student, and the loss takes the fused
lm-head path (issue 17, item 2): two gloo ranks build the worker's own DeepSpeed engines
(:func:`kdray.train.worker._setup_engine`) and train one step on half the rows each; the step's
loss and full gradient must equal one process's with the whole teacher and a plain student.

DeepSpeed keeps parameters under ``stage3_param_persistence_threshold`` (10^5 elements) whole on
every rank, which is every parameter of the toy models; the ranks here set it to 0, so that
every one is partitioned, as a real model's large matrices are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.curriculum.plan import plan_segments
from kdray.data.examples import TokenizeForTraining, training_batch
from kdray.models import load_causal_lm
from kdray.spec import parse_spec
from kdray.train.objectives import make_step_objective
from kdray.train.step import accumulate_step
from kdray.train.teacher import load_teacher
from tests.ranks import run_ranks
from tests.test_step_normaliser import PROMPTS, RESPONSES

CASES = [  # (objective, teacher_signal mode)
    ({"kind": "reverse_kl", "kd_ratio": 0.6}, "online"),  # the fused KD and the fused CE
    ({"kind": "jsd", "beta": 0.3}, "hidden"),  # a ZeRO-3 student with the stored teacher states
]


def make_spec(objective: dict, mode: str, zero_stage: int = 3):
    return parse_spec({
        "name": "z3", "output_dir": "o", "teacher": {"model": "toy:teacher", "dtype": "float32"},
        "student": {"model": "toy:student", "dtype": "float32"},
        "data": {"train": "toy:train", "heldout": "toy:heldout"}, "objective": objective,
        "teacher_signal": {"mode": mode},
        "training": {"num_workers": 2, "global_batch_size": 8, "micro_batch_size_per_worker": 4,
                     "zero_stage": zero_stage, "lr": 1e-3}})


def make_batch() -> dict[str, torch.Tensor]:
    """The 8 rows, with the whole teacher's final hidden states at the labels they predict."""
    raw = {"prompt": np.array(PROMPTS), "response": np.array(RESPONSES), "finish_reason": np.array(["stop"] * 8)}
    batch = training_batch(TokenizeForTraining("toy:student", max_seq_len=40), raw)
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = torch.zeros_like(out.hidden_states[-1])
    hidden[:, 1:] = out.hidden_states[-1][:, :-1]
    return {**batch, "t_hidden": hidden}


def rows(batch, keys, part: range) -> dict[str, torch.Tensor]:
    return {k: batch[k][part.start:part.stop] for k in keys}


def keys_for(mode: str) -> list[str]:
    return ["input_ids", "attention_mask", "labels"] + (["t_hidden"] if mode == "hidden" else [])


def _rank(rank: int) -> dict:
    import os

    import deepspeed
    import torch.distributed as dist

    import kdray.train.teacher as teacher_module
    import kdray.train.worker as worker_module
    from kdray.ray_setup import job_env
    from kdray.train.teacher import partitioned
    from kdray.train.worker import WorkerConfig, _setup_engine

    os.environ.update(job_env(), LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    for module, name in ((worker_module, "deepspeed_config"), (teacher_module, "teacher_zero3_config")):
        make = getattr(module, name)
        setattr(module, name, lambda spec, make=make: {**make(spec), "zero_optimization": {
            **make(spec)["zero_optimization"], "stage3_param_persistence_threshold": 0}})
    batch = make_batch()
    out = {}
    for objective, mode in CASES:
        spec = make_spec(objective, mode)
        segment = plan_segments(spec, 8)[0]
        engine, _, teacher = _setup_engine(WorkerConfig(spec, segment, total_steps=4, num_segments=1), rank)
        if mode == "online":
            assert partitioned(teacher), "the online teacher is not a ZeRO-3 engine"
            local = sum(p.ds_tensor.numel() for p in teacher.module.parameters())
            whole = sum(p.ds_numel for p in teacher.module.parameters())
            assert all(p.numel() == 0 for p in teacher.module.parameters()), "a teacher parameter stayed gathered"
            out[("teacher share", mode)] = local / whole
        step = make_step_objective(spec, segment, total_steps=4, num_segments=1, state=None)
        micro = [rows(batch, keys_for(mode), range(4 * rank, 4 * rank + 4))]
        sums = accumulate_step(step, engine, teacher, micro, lambda loss: engine.backward(loss * 2, scale_wrt_gas=False))
        grad = torch.cat([deepspeed.utils.safe_get_full_grad(p).reshape(-1) for p in engine.module.parameters()])
        loss = torch.tensor([sums["loss"]], dtype=torch.float64)
        dist.all_reduce(loss)
        out[(objective["kind"], mode)] = (float(loss), grad.numpy())
    return out


def test_a_partitioned_teacher_and_a_zero3_student_give_the_whole_teachers_step(toy_world, tmp_path):
    got = run_ranks(_rank, tmp_path, timeout=600)
    # Each rank held about half the teacher (DeepSpeed pads a partition to a multiple of the ranks).
    assert 0.49 < got[("teacher share", "online")] < 0.52

    batch = make_batch()
    student = load_causal_lm("toy:student", "float32", trainable=True)
    for objective, mode in CASES:
        spec = make_spec(objective, mode, zero_stage=2)  # a plain student and a whole teacher
        held = load_teacher(spec)
        step = make_step_objective(spec, plan_segments(spec, 8)[0], total_steps=4, num_segments=1, state=None)
        student.zero_grad(set_to_none=True)
        sums = accumulate_step(step, student, held, [rows(batch, keys_for(mode), range(8))], lambda l: l.backward())
        ref_grad = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
        loss, grad = got[(objective["kind"], mode)]
        assert loss == pytest.approx(sums["loss"], rel=1e-5), (objective, mode)
        np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-4, atol=1e-7)
