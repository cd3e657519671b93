"""Smoke test of the loss benchmark (kdray bench losses) at toy sizes."""

from __future__ import annotations

import sys

import pytest

from kdray.bench import losses as bench_losses


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bench_runs_and_reports_ratios(capsys):
    argv = ["--tokens", "32", "--vocab", "300", "--repeats", "1", "--rounds", "2", "--variants", "naive", "kdray"]
    assert bench_losses.run(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "naive/kdray  peak RSS" in out and "unavailable" not in out
    # interleaved: naive, kdray, naive, kdray; the time ratio is the median of the rounds'
    assert [line.split(": ")[1] for line in captured.err.splitlines() if line.startswith("round ")] == \
        ["naive at V=300 ...", "kdray at V=300 ..."] * 2
    assert "over 2 rounds)" in out and "host load (1-min average)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("naive ", "kdray "))}
    assert set(rows) == {"naive", "kdray"}
    # same objective on the same inputs: the loss and gradient norms agree
    naive, kdray = (list(map(float, rows[k][-3:])) for k in ("naive", "kdray"))
    assert kdray == pytest.approx(naive, rel=1e-4, abs=2e-6)


def test_bench_rejects_endpoint_beta():
    with pytest.raises(SystemExit):
        bench_losses.run(["--beta", "0"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sweep_measures_each_chunk_size_interleaved(capsys):
    argv = ["--tokens", "32", "--vocab", "300", "--repeats", "1", "--rounds", "2", "--variants", "kdray",
            "--sweep", "8", "16"]
    assert bench_losses.run(argv) == 0
    captured = capsys.readouterr()
    order = [line.split(": ")[1] for line in captured.err.splitlines() if line.startswith("round ")]
    assert order == ["kdray@8 at V=300 ...", "kdray@16 at V=300 ..."] * 2
    rows = {int(line.split()[2]): line.split() for line in captured.out.splitlines()
            if line.startswith("kdray ") and "sweep" not in line}
    # variant, kernel (V = 300 is below COMPILE_MIN_VOCAB: eager), chunk, peak, step, median s
    assert set(rows) == {8, 16} and all(r[1] == "eager" and float(r[5]) > 0 for r in rows.values())
    assert "kdray chunk sweep" in captured.out and "targets: none evaluated (a sweep)" in captured.out
