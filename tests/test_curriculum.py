"""Tests for kdray.curriculum: schedule boundary values, RRF ordering, and that saving and
restoring every curriculum mid-stage / mid-round continues exactly like an uninterrupted run."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdray.curriculum import (
    FIXED, FRESH, REPLAY, DifficultyRanks, DistiLLM2Schedule, POCLScheduler, ReplayScheduler,
    curriculum_from_state_dict, difficulty_ranks, distillm2_alpha, distillm2_beta,
    distillm2_delta, pocl_stage_size, pocl_stage_values, rrf_order,
)


def json_roundtrip(state):
    """What a checkpoint does to a state dict; also proves it is strict JSON."""
    return json.loads(json.dumps(state, allow_nan=False))


# ---------------------------------------------------------------- RRF / difficulty ranks
def test_rrf_order_sample_better_on_both_is_easiest():
    assert rrf_order([0.5, 0.9, 0.1], [1.0, 0.5, 3.0]).tolist() == [1, 0, 2]


def test_rrf_order_prefers_a_top_rank_over_two_middle_ranks():
    # ranks (rouge, ce): s0 (1, 3), s1 (3, 1), s2 (2, 2). 1/61 + 1/63 > 2/62, so the two
    # one-sided samples are easier than the compromise; s0 and s1 tie exactly and the
    # tie goes to the higher ROUGE-L.
    ranks = difficulty_ranks([0.9, 0.1, 0.5], [3.0, 0.5, 1.0])
    assert ranks.rouge_rank.tolist() == [1.0, 3.0, 2.0]
    assert ranks.ce_rank.tolist() == [3.0, 1.0, 2.0]
    assert ranks.score[0] == ranks.score[1] == pytest.approx(1 / 61 + 1 / 63)
    assert ranks.score[2] == pytest.approx(2 / 62)
    assert ranks.order.tolist() == [0, 1, 2]


def test_rrf_ties_share_ranks_average_and_min():
    rouge, ce = [0.5, 0.5, 0.2, 0.5], [1.0, 1.0, 1.0, 1.0]
    avg = difficulty_ranks(rouge, ce)
    assert avg.rouge_rank.tolist() == [2.0, 2.0, 4.0, 2.0]
    assert avg.ce_rank.tolist() == [2.5] * 4
    low = difficulty_ranks(rouge, ce, ties="min")
    assert low.rouge_rank.tolist() == [1.0, 1.0, 4.0, 1.0]
    assert low.ce_rank.tolist() == [1.0] * 4
    # the three identical samples keep index order; the worse ROUGE-L goes last
    assert avg.order.tolist() == low.order.tolist() == [0, 1, 3, 2]


def test_rrf_score_ties_broken_by_rouge_then_ce_then_index():
    # identical (rouge, ce) pairs -> index order; otherwise score decides
    assert rrf_order([0.3, 0.3, 0.3], [2.0, 2.0, 2.0]).tolist() == [0, 1, 2]
    # k = 60, explicit, and the 1-based convention: a single sample has both ranks 1
    one = difficulty_ranks([0.7], [1.2], k=60)
    assert one.score.tolist() == [2 / 61]


def test_rrf_accepts_numpy_and_tensors():
    rouge, ce = [0.2, 0.8, 0.4, 0.4], [2.0, 0.5, 1.0, 3.0]
    expected = rrf_order(rouge, ce).tolist()
    assert rrf_order(np.array(rouge), np.array(ce)).tolist() == expected
    assert rrf_order(torch.tensor(rouge), torch.tensor(ce, dtype=torch.float16)).tolist() == expected
    assert rrf_order(rouge, ce).dtype == np.int64


@pytest.mark.parametrize("rouge, ce, k, ties, fragment", [
    ([0.1, 0.2], [1.0], 60, "average", "one value per sample"),
    ([0.1, float("nan")], [1.0, 2.0], 60, "average", "non-finite"),
    ([[0.1, 0.2]], [[1.0, 2.0]], 60, "average", "1-D"),
    ([], [], 60, "average", "empty"),
    ([0.1], [1.0], -1, "average", "k must be"),
    ([0.1], [1.0], 60, "dense", "ties must be"),
])
def test_rrf_rejects_bad_input(rouge, ce, k, ties, fragment):
    with pytest.raises(ValueError, match=fragment):
        rrf_order(rouge, ce, k=k, ties=ties)


def test_difficulty_ranks_roundtrip_and_tamper_check():
    ranks = difficulty_ranks([0.2, 0.8, 0.4, 0.4, 0.0], [2.0, 0.5, 1.0, 3.0, 9.0])
    stored = json_roundtrip(ranks.to_dict())
    again = DifficultyRanks.from_dict(stored)
    assert again.order.tolist() == ranks.order.tolist()
    assert np.array_equal(again.score, ranks.score)
    # position is the inverse permutation of order
    assert ranks.order[ranks.position].tolist() == list(range(5))
    assert stored["position"][ranks.order[0]] == 0
    stored["order"] = stored["order"][::-1]
    with pytest.raises(ValueError, match="does not match"):
        DifficultyRanks.from_dict(stored)


# values from a small set so hypothesis produces plenty of ties
_measure = st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]),
                              st.sampled_from([0.3, 1.0, 1.5, 2.0, 4.0])), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None, database=None)
@given(pairs=_measure, ties=st.sampled_from(["average", "min"]), data=st.data())
def test_rrf_is_permutation_invariant(pairs, ties, data):
    perm = data.draw(st.permutations(list(range(len(pairs)))))
    rouge, ce = [p[0] for p in pairs], [p[1] for p in pairs]
    base = difficulty_ranks(rouge, ce, ties=ties)
    moved = difficulty_ranks([rouge[i] for i in perm], [ce[i] for i in perm], ties=ties)
    # each sample keeps its ranks and score wherever it sits ...
    assert np.array_equal(moved.score, base.score[perm])
    assert np.array_equal(moved.rouge_rank, base.rouge_rank[perm])
    # ... and the easy -> hard sequence of samples is the same
    assert [pairs[perm[j]] for j in moved.order] == [pairs[i] for i in base.order]
    assert sorted(base.order.tolist()) == list(range(len(pairs)))


@settings(max_examples=150, deadline=None, database=None)
@given(pairs=_measure, ties=st.sampled_from(["average", "min"]))
def test_rrf_sample_better_on_both_is_never_harder(pairs, ties):
    rouge, ce = [p[0] for p in pairs], [p[1] for p in pairs]
    pos = difficulty_ranks(rouge, ce, ties=ties).position
    for a in range(len(pairs)):
        for b in range(len(pairs)):
            dominates = rouge[a] >= rouge[b] and ce[a] <= ce[b] and pairs[a] != pairs[b]
            if dominates:
                assert pos[a] < pos[b], (a, b, pairs[a], pairs[b])


# ---------------------------------------------------------------- POCL stage values
def test_pocl_stage_values_first_and_last_stage():
    assert pocl_stage_values(1, 4) == (1.0, 0.7, 0.25)
    assert pocl_stage_values(4, 4) == (2.0, 1.0, 1.0)
    t2, k2, f2 = pocl_stage_values(2, 4)
    assert (t2, k2, f2) == (pytest.approx(4 / 3), pytest.approx(0.8), 0.5)
    assert pocl_stage_values(3, 4)[:2] == (pytest.approx(5 / 3), pytest.approx(0.9))


def test_pocl_stage_values_configurable_and_single_stage():
    assert pocl_stage_values(2, 3, t_start=2.0, t_end=4.0, kd_ratio_start=0.0,
                             kd_ratio_end=0.5) == (3.0, 0.25, pytest.approx(2 / 3))
    # one stage: it is also the last one -> end values, all data, no division by zero
    assert pocl_stage_values(1, 1) == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"stage": 0, "n_stages": 4}, "stage must be >= 1"),
    ({"stage": 5, "n_stages": 4}, "stage must be <= 4"),
    ({"stage": 1, "n_stages": 0}, "n_stages must be >= 1"),
    ({"stage": 1.0, "n_stages": 4}, "stage must be an integer"),
    ({"stage": 1, "n_stages": 4, "kd_ratio_end": 1.5}, "kd_ratio_end"),
    ({"stage": 1, "n_stages": 4, "t_start": 0.0}, "t_start"),
])
def test_pocl_stage_values_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        pocl_stage_values(**kwargs)


def test_pocl_stage_sizes_are_nested_and_last_covers_all():
    for n_stages in range(1, 8):
        for n in range(1, 30):
            sizes = [pocl_stage_size(s, n_stages, n) for s in range(1, n_stages + 1)]
            assert sizes[0] >= 1 and sizes[-1] == n
            assert sizes == sorted(sizes)
            assert sizes[0] == math.ceil(n / n_stages)


# ---------------------------------------------------------------- POCL scheduler
def _order(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rrf_order(rng.random(n), rng.random(n) * 3)


def test_pocl_scheduler_epoch_stages_are_cumulative_and_nested():
    order = _order(10)
    sched = POCLScheduler(n_stages=4, stage_interval=2, order=order)
    seen = []
    for epoch in range(8):
        seen.append((sched.stage, sched.temperature, sched.kd_ratio, sched.active_indices().tolist()))
        assert sched.step() is False                    # steps never move an epoch schedule
        changed = sched.end_epoch()
        assert changed == (epoch in (1, 3, 5))
    assert [s[0] for s in seen] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert seen[0][1:3] == (1.0, 0.7) and seen[-1][1:3] == (2.0, 1.0)
    actives = [s[3] for s in seen]
    for smaller, larger in zip(actives, actives[1:]):
        assert larger[: len(smaller)] == smaller          # nested prefixes of the order
    assert [len(a) for a in actives[::2]] == [3, 5, 8, 10]
    assert actives[-1] == order.tolist()                   # last stage: all data
    assert sched.finished
    assert sched.end_epoch() is False and sched.stage == 4


def test_pocl_scheduler_step_interval():
    sched = POCLScheduler(n_stages=3, stage_interval=3, interval_unit="steps", order=_order(6))
    changes = [sched.step() for _ in range(9)]
    assert changes == [False, False, True, False, False, True, False, False, False]
    assert sched.finished and sched.stage == 3 and sched.total_units == 9
    assert sched.end_epoch() is False


def test_pocl_scheduler_needs_an_order_before_stepping():
    sched = POCLScheduler()
    assert sched.num_rounds == 1
    with pytest.raises(RuntimeError, match="set_order"):
        sched.step()
    with pytest.raises(ValueError, match="permutation"):
        sched.set_order([0, 0, 1])
    sched.set_order(_order(5))
    restored = POCLScheduler.from_state_dict(json_roundtrip(sched.state_dict()))
    assert restored.n_active == sched.n_active            # a resumed job keeps the order: no re-measure


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_stages": 0}, "n_stages"), ({"stage_interval": 0}, "stage_interval"),
    ({"interval_unit": "batches"}, "interval_unit"), ({"kd_ratio_start": -0.1}, "kd_ratio_start"),
])
def test_pocl_scheduler_rejects_bad_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        POCLScheduler(**kwargs)


def _pocl_trace(sched, units, unit):
    out = []
    for _ in range(units):
        out.append((sched.stage, sched.temperature, sched.kd_ratio, sched.active_indices().tolist(),
                    sched.metrics()))
        out.append(sched.step() if unit == "steps" else sched.end_epoch())
    return out


@pytest.mark.parametrize("unit, cut", [("steps", 4), ("steps", 7), ("epochs", 5)])
def test_pocl_save_restore_mid_stage_continues_identically(unit, cut):
    make = lambda: POCLScheduler(n_stages=4, stage_interval=3, interval_unit=unit, order=_order(11))
    full = _pocl_trace(make(), 14, unit)
    first = make()
    head = _pocl_trace(first, cut, unit)
    assert first.state_dict()["state"]["units_done"] == cut % 3 != 0   # really mid-stage
    resumed = POCLScheduler.from_state_dict(json_roundtrip(first.state_dict()))
    assert head + _pocl_trace(resumed, 14 - cut, unit) == full


def test_pocl_load_state_refuses_other_config():
    state = POCLScheduler(n_stages=4, order=_order(4)).state_dict()
    with pytest.raises(ValueError, match="n_stages"):
        POCLScheduler(n_stages=3).load_state_dict(state)


# ---------------------------------------------------------------- DistiLLM-2 β and α
def test_distillm2_beta_boundaries():
    assert distillm2_beta(0, 100) == 1.0
    assert distillm2_beta(25, 100) == 1.25
    assert distillm2_beta(50, 100) == 1.5
    assert distillm2_beta(100, 100) == 1.5
    assert distillm2_beta(250, 100) == 1.5
    assert distillm2_beta(1, 3) == pytest.approx(1 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="total_steps"):
        distillm2_beta(0, 0)
    with pytest.raises(ValueError, match="step"):
        distillm2_beta(-1, 10)


def test_distillm2_alpha_boundaries():
    mean = 0.2
    delta = torch.tensor([mean, 1e6, 0.5 * mean, -0.3, 0.9 / 0.95 - 1e-5, -1e-5])
    a = distillm2_alpha(delta.clone().requires_grad_(True), mean, alpha0=0.1)
    assert a[0] == pytest.approx(0.1)         # Δ_i = Δ̄: exactly α₀ after the clip
    assert a[1] == pytest.approx(0.1)         # far above the mean: upper clip
    assert a[2] == pytest.approx(0.01)        # 1 - 0.9*2 < 0.01: lower clip
    assert a[3] == pytest.approx(0.1)         # negative Δ (student ahead): 1 + … -> α₀
    assert distillm2_alpha(delta[4:5], 1.0)[0] == pytest.approx(0.05, rel=1e-4)  # inside the clip
    assert a[5] == pytest.approx(0.01)        # zero denominator: no NaN, lower clip
    assert torch.isfinite(a).all() and not a.requires_grad and a.shape == delta.shape
    assert distillm2_alpha(torch.tensor([-1e-5]), 0.0)[0] == pytest.approx(0.1)
    assert distillm2_alpha(torch.tensor([0.3]), 0.0)[0] == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"alpha0": 0.0}, "alpha0"), ({"alpha0": 1.0}, "alpha0"),
    ({"alpha0": 0.1, "alpha_min": 0.2}, "alpha_min"), ({"eps": -1.0}, "eps"),
])
def test_distillm2_alpha_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        distillm2_alpha(torch.tensor([0.1]), 0.1, **kwargs)


def test_distillm2_delta_sign_and_mask():
    half, quarter = math.log(0.5), math.log(0.25)
    teacher = torch.tensor([[half, half, -math.inf], [half, half, half]])
    student = torch.tensor([[quarter, quarter, float("nan")], [quarter, quarter, quarter]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    d_teacher = distillm2_delta(teacher, student, mask, is_student_response=False)
    assert d_teacher.tolist() == pytest.approx([0.25, 0.25])
    d_student = distillm2_delta(teacher, student, mask, is_student_response=True)
    assert d_student.tolist() == pytest.approx([-0.25, -0.25])
    mixed = distillm2_delta(teacher, student, mask, torch.tensor([False, True]))
    assert mixed.tolist() == pytest.approx([0.25, -0.25])
    with pytest.raises(ValueError, match="no response tokens"):
        distillm2_delta(teacher, student, torch.tensor([[0, 0, 0], [1, 1, 1]]), False)
    with pytest.raises(ValueError, match="shape"):
        distillm2_delta(teacher, student[:, :2], mask, False)
    with pytest.raises(ValueError, match="is_student_response"):
        distillm2_delta(teacher, student, mask, torch.tensor([True]))


# ---------------------------------------------------------------- DistiLLM-2 schedule
def test_distillm2_schedule_released_code_mode_is_fixed():
    sched = DistiLLM2Schedule(num_rounds=2, total_steps=10, mode="released_code")
    sched.observe(torch.tensor([0.5, 0.1]), False)
    for _ in range(6):
        sched.step()
    assert sched.beta == 1.0
    a = sched.alpha(torch.tensor([0.01, 0.5, 10.0]), torch.tensor([False, True, False]))
    assert a.tolist() == pytest.approx([0.1, 0.1, 0.1])


def test_distillm2_alpha_statistics_cover_every_micro_batch_of_the_step():
    """alpha_mean/min/max describe the optimizer step, all its micro-batches (and, recorded by
    the trainer, all its ranks), not the last micro-batch; after the step they stay its."""
    sched = DistiLLM2Schedule(num_rounds=1, total_steps=10)
    sched.observe(torch.tensor([1.0, 3.0]), False)  # Δ̄ = 2
    sched.alpha(torch.tensor([100.0]), False)  # its own α: α₀ = 0.1
    sched.alpha(torch.tensor([1.0]), False)  # clipped to 0.01
    sched.record_alpha(torch.tensor([0.05]))  # another rank's, as the trainer records it
    sched.alpha(torch.tensor([1.0]), False, record=False)  # recorded by the caller: not twice
    stats = {k: v for k, v in sched.metrics().items() if k.startswith("alpha_")}
    assert stats == pytest.approx({"alpha_mean": (0.1 + 0.01 + 0.05) / 3, "alpha_min": 0.01, "alpha_max": 0.1})
    sched.step()
    assert {k: v for k, v in sched.metrics().items() if k.startswith("alpha_")} == pytest.approx(stats)
    sched.alpha(torch.tensor([100.0]), False)  # the next step's first micro-batch
    assert sched.metrics()["alpha_min"] == pytest.approx(0.1)


def test_distillm2_schedule_running_means_and_alpha():
    sched = DistiLLM2Schedule(num_rounds=1, total_steps=10)
    first = sched.alpha(torch.tensor([0.05, 0.5]), False)
    assert first.tolist() == pytest.approx([0.1, 0.1])  # no anchor yet: α₀
    sched.observe(torch.tensor([1.0, 3.0]), False)
    sched.observe(torch.tensor([5.0]), False)
    sched.observe(torch.tensor([-2.0]), True)
    assert sched.delta_mean(False) == 3.0 and sched.delta_mean(True) == -2.0
    a = sched.alpha(torch.tensor([1.0, 3.0]), torch.tensor([False, False]))
    assert a.tolist() == pytest.approx([0.01, 0.1])
    ema = DistiLLM2Schedule(num_rounds=1, total_steps=10, running_mean="ema", ema_decay=0.5)
    ema.observe(torch.tensor([1.0, 3.0]), False)
    ema.observe(torch.tensor([5.0]), False)
    assert ema.delta_mean(False) == 3.5 and ema.delta_mean(True) is None


def test_distillm2_schedule_rounds_and_beta_scope():
    job = DistiLLM2Schedule(num_rounds=2, total_steps=8, beta_scope="job")
    per_round = DistiLLM2Schedule(num_rounds=2, total_steps=4, beta_scope="round")
    assert job.num_rounds == 2
    for s in (job, per_round):
        for _ in range(4):
            s.step()
        s.end_round()
    assert job.beta == 1.5 and per_round.beta == 1.0      # per-round ramp restarted
    assert job.round == 1 and job.metrics()["round"] == 1.0
    job.end_round()
    assert job.finished
    with pytest.raises(RuntimeError, match="rounds"):
        job.end_round()


def _distillm2_trace(sched, events):
    out = []
    for kind, payload in events:
        if kind == "batch":
            delta, flags = payload
            a = sched.alpha(delta, flags)
            sched.observe(delta, flags)
            sched.step()
            out.append((sched.round, sched.beta, a.tolist(), sched.metrics()))
        else:
            sched.end_round()
            out.append(("end_round", sched.round))
    return out


def _distillm2_events(rounds=2, steps=6, batch=4):
    gen = torch.Generator().manual_seed(0)
    events = []
    for _ in range(rounds):
        for _ in range(steps):
            delta = torch.randn(batch, generator=gen) * 0.3 + 0.2
            flags = torch.rand(batch, generator=gen) < 0.5
            events.append(("batch", (delta, flags)))
        events.append(("end_round", None))
    return events


@pytest.mark.parametrize("mode, running_mean", [("paper", "cumulative"), ("paper", "ema"),
                                                ("released_code", "cumulative")])
@pytest.mark.parametrize("cut", [3, 9])   # mid-round 0 and mid-round 1
def test_distillm2_save_restore_mid_round_continues_identically(mode, running_mean, cut):
    make = lambda: DistiLLM2Schedule(num_rounds=2, total_steps=12, mode=mode,
                                     running_mean=running_mean, ema_decay=0.9)
    events = _distillm2_events()
    full = _distillm2_trace(make(), events)
    first = make()
    head = _distillm2_trace(first, events[:cut])
    resumed = DistiLLM2Schedule.from_state_dict(json_roundtrip(first.state_dict()))
    assert head + _distillm2_trace(resumed, events[cut:]) == full
    if mode == "paper":   # the run did exercise the adaptive α
        assert any(min(step[2]) < 0.1 for step in full if step[0] != "end_round")


# ---------------------------------------------------------------- replay
def test_replay_threshold_rule_last_raise_vs_previous():
    losses = [2.0, 2.08, 2.16]
    last = ReplayScheduler(reference="last_raise")
    prev = ReplayScheduler(reference="previous")
    assert [last.on_validation(v) for v in losses] == [False, False, True]
    assert [prev.on_validation(v) for v in losses] == [False, False, False]
    assert last.threshold == pytest.approx(0.1) and prev.threshold == 0.0
    assert last.reference_loss == 2.16 and prev.reference_loss == 2.16


def test_replay_threshold_rise_is_absolute_and_capped():
    sched = ReplayScheduler()
    sched.on_validation(10.0)
    assert sched.on_validation(10.5)               # +0.5 absolute (5 % relative): raise
    small = ReplayScheduler()
    small.on_validation(0.5)
    assert not small.on_validation(0.59)           # +0.09 absolute (18 % relative): no raise
    assert not small.on_validation(0.4)            # falling loss never raises
    capped = ReplayScheduler()
    results = [capped.on_validation(1.0 + 0.5 * i) for i in range(15)]
    assert results[1:11] == [True] * 10 and results[11:] == [False] * 4
    assert capped.threshold == 1.0


def test_replay_decide_follows_the_rule():
    seed, cap = 7, 4
    sched = ReplayScheduler(capacity=cap, init_threshold=0.5, seed=seed)
    twin = random.Random(seed)                      # the documented decision RNG
    total = 100
    step = 0
    while not sched.is_full:                        # not full: every r < φ is fresh,
        r = twin.random()                           # even at t = T where φ·(1 - t/T) = 0
        d = sched.decide(total, total)
        assert d == (FRESH if r < 0.5 else FIXED)
        if d == FRESH:
            sched.push([{"step": step}])
        step += 1
    assert step > cap                               # some fixed steps happened meanwhile
    for _ in range(200):                            # full, t = T/2: fresh below φ/2
        r = twin.random()
        expected = FRESH if r < 0.25 else REPLAY if r < 0.5 else FIXED
        assert sched.decide(50, total) == expected
    assert sched.metrics()["replay_replay_steps"] > 0


def test_replay_zero_threshold_always_fixed_and_end_never_fresh():
    zero = ReplayScheduler()
    assert {zero.decide(s, 10) for s in range(11)} == {FIXED}
    full = ReplayScheduler(capacity=2, init_threshold=1.0)
    full.push([{"a": 1}, {"a": 2}])
    assert {full.decide(10, 10) for _ in range(50)} == {REPLAY}   # 1 - t/T = 0
    assert {full.decide(0, 10) for _ in range(50)} == {FRESH}     # r < φ·1 always
    with pytest.raises(ValueError, match="step"):
        full.decide(11, 10)


def test_replay_buffer_is_fifo_with_capacity():
    sched = ReplayScheduler(capacity=3)
    original = {"i": 0, "tokens": [1, 2]}
    sched.push([original] + [{"i": i, "tokens": [i]} for i in range(1, 5)])
    original["tokens"].append(99)                   # the buffer holds copies
    assert len(sched) == 3
    assert sorted(s["i"] for s in sched.sample(3)) == [2, 3, 4]
    batch = sched.sample(2)
    batch[0]["i"] = -1                              # so do sampled batches
    assert sorted(s["i"] for s in sched.sample(3)) == [2, 3, 4]
    with pytest.raises(ValueError, match="exceeds"):
        sched.sample(4)
    with pytest.raises(ValueError, match="JSON"):
        sched.push([{"ids": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="list of sample dicts"):
        sched.push({"i": 5})


def _replay_trace(sched, start, stop, total=60):
    out = []
    for step in range(start, stop):
        d = sched.decide(step, total)
        if d == FRESH:
            sched.push([{"step": step, "k": k, "ids": [step, k]} for k in range(2)])
            out.append((d, None))
        elif d == REPLAY:
            out.append((d, sched.sample(3)))
        else:
            out.append((d, None))
        if step % 10 == 9:
            out.append(("val", sched.on_validation(1.0 + 0.15 * (step // 10)), sched.threshold))
    return out


@pytest.mark.parametrize("cut", [13, 31])
def test_replay_save_restore_continues_identically(cut):
    make = lambda: ReplayScheduler(capacity=8, init_threshold=0.3, seed=3)
    full = _replay_trace(make(), 0, 60)
    first = make()
    head = _replay_trace(first, 0, cut)
    state = json_roundtrip(first.state_dict())
    assert 0 < len(state["state"]["buffer"]) <= 8
    resumed = curriculum_from_state_dict(state)
    assert isinstance(resumed, ReplayScheduler)
    assert head + _replay_trace(resumed, cut, 60) == full
    kinds = {e[0] for e in full}
    assert {FRESH, REPLAY, FIXED, "val"} <= kinds     # every branch was exercised


def test_replay_rejects_a_zero_capacity():
    with pytest.raises(ValueError, match="capacity"):
        ReplayScheduler(capacity=0)
    with pytest.raises(ValueError, match="reference"):
        ReplayScheduler(reference="best")


# ---------------------------------------------------------------- common protocol
def test_state_dicts_dispatch_and_reject_mismatches():
    objs = [POCLScheduler(order=_order(5)), DistiLLM2Schedule(num_rounds=3, total_steps=5),
            ReplayScheduler()]
    for obj in objs:
        state = json_roundtrip(obj.state_dict())
        again = curriculum_from_state_dict(state)
        assert type(again) is type(obj) and again.state_dict() == state
    with pytest.raises(ValueError, match="not 'pocl'"):
        POCLScheduler().load_state_dict(objs[2].state_dict())
    bad_version = dict(objs[0].state_dict(), version=99)
    with pytest.raises(ValueError, match="version"):
        POCLScheduler.from_state_dict(bad_version)
    with pytest.raises(ValueError, match="known curriculum"):
        curriculum_from_state_dict({"kind": "nope"})
