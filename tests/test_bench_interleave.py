"""The benches' side-by-side measurement: interleaved rounds, per-round ratios, host load."""

from __future__ import annotations

import time

import pytest

from kdray.bench.interleave import HostLoad, interleave, ratio_summary


def test_variants_run_interleaved_round_by_round():
    order = []
    results = interleave(lambda v, r: order.append((v, r)) or f"{v}{r}", ["a", "b"], 3)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleave(lambda v, r: 0, ["a"], 0)


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


def test_a_variants_rounds_become_one_row_of_medians_over_the_rounds_that_ran():
    from kdray.bench.interleave import median_row

    runs = [{"t": 3.0, "m": 10, "x": "first"}, {"error": "boom"}, {"t": 1.0, "m": 30, "x": "third"},
            {"t": 2.0, "m": 20, "x": "fourth"}]
    row = median_row(runs, lambda r: "error" not in r, ["t"], ["m"])
    assert row == {"t": 2.0, "m": 30, "x": "first", "rounds": 3}
    assert median_row([{"error": "a"}, {"error": "b"}], lambda r: "error" not in r, ["t"]) == {"error": "a"}
