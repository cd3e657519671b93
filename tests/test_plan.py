"""The training plan: segments for plain training, POCL stages and DistiLLM-2 rounds, and the
spec rules that decide which curricula compose with which objectives."""

from __future__ import annotations

import pytest

from kdray.errors import KdrayError, SpecError
from kdray.curriculum.plan import plan_segments, total_steps
from kdray.spec import parse_spec


def make(objective=None, curriculum=None, **training):
    data = {
        "name": "t", "output_dir": "o",
        "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student"},
        "data": {"train": "toy:train", "heldout": "toy:heldout"},
        "training": {"num_workers": 2, "global_batch_size": 8, "micro_batch_size_per_worker": 4, **training},
    }
    if objective is not None:
        data["objective"] = objective
    if curriculum is not None:
        data["curriculum"] = curriculum
    return parse_spec(data)


def errors(**kw) -> str:
    with pytest.raises(SpecError) as info:
        make(**kw)
    return " ".join(msg for _, msg in info.value.errors)


def test_plain_training_is_one_segment_over_every_row():
    (seg,) = plan_segments(make(epochs=3), 100)
    assert (seg.n_rows, seg.steps_per_epoch, seg.start_step, seg.steps, seg.epochs) == (100, 12, 0, 36, 3)
    assert (seg.kd_temperature, seg.kd_ratio, seg.stage, seg.regenerate_student) == (1.0, 1.0, None, False)


def test_pocl_stages_are_cumulative_with_rising_temperature_and_kd_ratio():
    plan = plan_segments(make(curriculum={"kind": "pocl", "stage_interval": 2}), 100)
    assert [s.stage for s in plan] == [1, 2, 3, 4]
    assert [s.n_rows for s in plan] == [25, 50, 75, 100]
    assert [s.steps for s in plan] == [2 * 3, 2 * 6, 2 * 9, 2 * 12]  # 2 epochs of each subset
    assert [s.start_step for s in plan] == [0, 6, 18, 36] and total_steps(plan) == 60
    assert [round(s.kd_temperature, 4) for s in plan] == [1.0, 1.3333, 1.6667, 2.0]
    assert [round(s.kd_ratio, 4) for s in plan] == [0.7, 0.8, 0.9, 1.0]
    assert not any(s.regenerate_student or s.restart_optimizer for s in plan)


def test_pocl_in_steps_with_optimizer_restarts_and_a_step_budget():
    spec = make(curriculum={"kind": "pocl", "n_stages": 3, "stage_interval": 5, "interval_unit": "steps",
                            "restart_optimizer_each_stage": True}, max_steps=12)
    plan = plan_segments(spec, 60)
    assert [s.steps for s in plan] == [5, 5, 2]  # the budget cuts the last stage
    assert all(s.restart_optimizer for s in plan)
    # Stage 1 has 20 rows: 2 steps per pass, so its 5 steps take 3 passes (the last cut short).
    assert [s.steps_per_epoch for s in plan] == [2, 5, 7] and [s.epochs for s in plan] == [3, 1, 1]


def test_distillm2_rounds_regenerate_the_student_each_round():
    spec = make(objective={"kind": "distillm2"}, curriculum={"kind": "distillm2", "rounds": 3})
    plan = plan_segments(spec, 40)
    assert [(s.round, s.steps, s.start_step) for s in plan] == [(0, 5, 0), (1, 5, 5), (2, 5, 10)]
    assert all(s.regenerate_student for s in plan)
    assert plan[1].label(3) == "round 2/3"


def test_pocl_with_distillm2_makes_every_stage_a_round():
    spec = make(objective={"kind": "distillm2"}, curriculum=[{"kind": "pocl", "stage_interval": 1},
                                                            {"kind": "distillm2"}])
    plan = plan_segments(spec, 32)
    assert [s.round for s in plan] == [0, 1, 2, 3] and all(s.regenerate_student for s in plan)


def test_a_stage_smaller_than_the_global_batch_fails_before_any_work():
    with pytest.raises(KdrayError, match="POCL stage 1.*global_batch_size"):
        plan_segments(make(curriculum={"kind": "pocl"}), 20)  # stage 1: 5 rows < 8


@pytest.mark.parametrize("kw, needle", [
    (dict(objective={"kind": "distillm2"}), "add curriculum: [{kind: distillm2"),
    (dict(curriculum={"kind": "distillm2", "rounds": 2}), "set objective.kind: distillm2"),
    (dict(objective={"kind": "distillm2"}, curriculum={"kind": "distillm2"}), "rounds is required"),
    (dict(objective={"kind": "distillm2"}, curriculum=[{"kind": "pocl"}, {"kind": "distillm2", "rounds": 2}]),
     "remove curriculum distillm2.rounds"),
    (dict(objective={"kind": "forward_kl", "kd_ratio": 0.5}, curriculum={"kind": "pocl"}),
     "pocl schedules the KD temperature and kd_ratio"),
    (dict(curriculum={"kind": "pocl"}, epochs=2), "leave training.epochs at 1"),
    (dict(curriculum=[{"kind": "pocl"}, {"kind": "pocl"}]), "more than once"),
    (dict(objective={"kind": "distillm2", "alpha": 0.05},
          curriculum={"kind": "distillm2", "rounds": 1, "alpha_min": 0.08}), "exceeds objective.alpha"),
])
def test_invalid_combinations_are_rejected_with_the_reason(kw, needle):
    assert needle in errors(**kw)


def test_one_mapping_is_a_one_item_curriculum_list_and_null_is_none():
    assert [c.kind for c in make(curriculum={"kind": "pocl"}).curriculum] == ["pocl"]
    assert make(curriculum=None).curriculum == []
    with pytest.raises(SpecError) as info:
        make(curriculum=[{"kind": "pocl"}, {"n_stages": 2}, {"kind": "pocl", "stages": 2}])
    errs = dict(info.value.errors)
    assert "choose one of: pocl, distillm2" in errs["curriculum[1]"]
    assert "unknown key" in errs["curriculum[2].stages"] and "n_stages" in errs["curriculum[2].stages"]
