"""The benches' side-by-side measurement: interleaved rounds, per-round ratios, host load."""

from __future__ import annotations

import time

import pytest

from kdray.bench.interleave import HostLoad, bracketed, interleave, ratio_summary


def test_variants_run_interleaved_round_by_round():
    order = []
    results = interleave(lambda v, r: order.append((v, r)) or f"{v}{r}", ["a", "b"], 3)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleave(lambda v, r: 0, ["a"], 0)


def test_a_bracketing_variant_runs_once_more_after_the_last_round():
    order = []
    results = interleave(lambda v, r: order.append((v, r)) or r, ["base", "x", "job"], 2, bracket=2)
    # the bracketing variants swap order every round: each one's runs around a job are equally far from it
    assert order == [("base", 0), ("x", 0), ("job", 0), ("x", 1), ("base", 1), ("job", 1), ("base", 2), ("x", 2)]
    assert results == {"base": [0, 1, 2], "x": [0, 1, 2], "job": [0, 1]}
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bracket"):
            interleave(lambda v, r: 0, ["base", "x", "job"], 2, bracket=bad)


def test_a_steady_drift_cancels_when_the_baseline_brackets_each_round():
    """The host slows steadily; the baseline (bracketing, rate 2x the job's) runs before and after
    each job. Against the run before alone, every round's ratio is off; against the mean of the
    runs on both sides, it is the true 2x."""
    def speed(t: float) -> float:  # the host's relative speed at time t
        return 1.0 - 0.1 * t

    base = [2.0 * speed(t) for t in (0, 2, 4, 6)]  # at t = 0, 2, 4, 6; the jobs at t = 1, 3, 5
    job = [1.0 * speed(t) for t in (1, 3, 5)]
    assert all(r != pytest.approx(2.0) for r in ratio_summary(base[:-1], job).ratios)
    assert ratio_summary(bracketed(base), job).ratios == pytest.approx((2.0, 2.0, 2.0))
    assert bracketed([1.0, None, 3.0]) == [1.0, 3.0]  # a failed run: its rounds take the run on their other side
    assert bracketed([None, None]) == [None]
    assert bracketed([1.0]) == []


def test_a_load_change_that_hits_both_sides_of_a_round_leaves_the_ratio_alone():
    """B is 2x A's time; the host slows by 1x, 3x, 1.5x between rounds: per-round ratios stay
    2 (spread 0), where the ratio of the two variants' medians taken from different rounds
    (A in rounds 0-1, B in rounds 1-2) would not."""
    slow = [1.0, 3.0, 1.5]
    a = [1.0 * s for s in slow]
    b = [2.0 * s for s in slow]
    summary = ratio_summary(b, a)
    assert summary.ratios == (2.0, 2.0, 2.0) and summary.median == 2.0 and summary.spread == 0.0
    assert "2.00x (spread 0% over 3 rounds)" == str(summary)
    noisy = ratio_summary([2.0, 2.4, 1.8], [1.0, 1.0, 1.0])
    assert noisy.median == 2.0 and noisy.spread == pytest.approx(0.3)


def test_rounds_with_a_missing_figure_are_left_out():
    assert ratio_summary([1.0, None, 3.0], [1.0, 2.0, 0.0]).ratios == (1.0,)
    assert ratio_summary([None], [1.0]) is None


def test_host_load_samples_while_the_block_runs():
    with HostLoad(every_s=0.05) as load:
        time.sleep(0.3)
    assert len(load.samples) >= 4  # one at entry, one at exit, a few between
    assert str(load).startswith("host load (1-min average)") and "CPUs" in str(load)


def test_a_variants_runs_become_one_row_of_medians_over_the_runs_that_ran():
    from kdray.bench.interleave import median_row

    runs = [{"t": 3.0, "m": 10, "x": "first"}, {"error": "boom"}, {"t": 1.0, "m": 30, "x": "third"},
            {"t": 2.0, "m": 20, "x": "fourth"}]
    row = median_row(runs, lambda r: "error" not in r, ["t"], ["m"])
    assert row == {"t": 2.0, "m": 30, "x": "first", "runs": 3}
    assert median_row([{"error": "a"}, {"error": "b"}], lambda r: "error" not in r, ["t"]) == {"error": "a"}
