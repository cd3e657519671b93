"""``kdray bench train``'s options and step table, without running a job (the job itself runs
in ``tests/test_e2e_training.py::test_bench_train_quick_smoke``)."""

import pytest


def test_zero_stage_option_reaches_the_jobs_spec(tmp_path):
    from kdray.bench.train import _parser, job_spec
    from kdray.spec import parse_spec

    assert _parser().parse_args([]).zero_stage == 2  # the default the figures in docs/benchmarks.md use
    args = _parser().parse_args(["--zero-stage", "1"])
    spec = job_spec(tmp_path, "online", steps=4, workers=2, global_batch=32, micro_batch=8, zero_stage=args.zero_stage)
    assert parse_spec(spec, "bench").training.zero_stage == 1
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--zero-stage", "4"])
    assert exc.value.code == 2


def test_step_table_shows_cpu_share_and_leaves_out_parts_no_run_has():
    from rich.console import Console

    from kdray.bench.train_report import _render_step_time

    parts = {"data_wait_s": 0.002, "sampling_s": 0.0, "forward_s": 0.03, "backward_s": 0.026, "optimizer_s": 0.006,
             "report_s": 0.0005, "weight_sync_s": 0.0}
    job = {"status": "ok", "sequences_per_step": 16, **parts, "step_s": 0.07, "cpu_s": 0.049}
    bare = {"status": "ok", "sequences_per_step": 32, **parts, "report_s": 0.0, "step_s": 0.05, "cpu_s": 0.05}
    console = Console(width=200, record=True)
    _render_step_time(console, [("the job", job), ("bare", bare)])
    text = console.export_text()
    assert "CPU (share)" in text and "0.049 (70%)" in text and "0.050 (100%)" in text
    assert "forward" in text and "report" in text  # a part one run has stays
    assert "sampling" not in text and "weight sync" not in text  # no run has these


def test_a_job_runs_the_steps_asked_for_even_past_the_toys_train_rows(tmp_path):
    """The default job (400 steps of 32) needs 12,800 sequences; the toy world has 4,000 train rows,
    so the job trains more epochs over them rather than stopping at 250 steps."""
    from kdray.bench.train import DEFAULT_STEPS, TOY_TRAIN_ROWS, job_spec
    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.spec import parse_spec
    from kdray.toy.data import generate_splits
    from kdray.toy.world import N_TRAIN_PER_FAMILY

    assert TOY_TRAIN_ROWS == len(generate_splits(N_TRAIN_PER_FAMILY, 0)[0])
    for steps in (10, DEFAULT_STEPS, 1000):
        spec = parse_spec(job_spec(tmp_path, "online", steps=steps, workers=2, global_batch=32, micro_batch=8), "bench")
        rows = spec.data.max_train_samples
        assert rows <= TOY_TRAIN_ROWS and total_steps(plan_segments(spec, rows)) == steps, (steps, rows)


def test_a_thread_count_given_twice_runs_once():
    from kdray.bench.train import parse_args

    assert parse_args(["--bare-threads", "2", "1", "2"]).bare_threads == [1, 2]
    assert parse_args([]).bare_threads == [1, 2] and parse_args(["--quick"]).bare_threads == [1]
    assert parse_args(["--workers", "1", "--global-batch", "8"]).bare_threads == [1]


def _stub_runs(monkeypatch, bare_speeds: dict[int, list[float | None]], job_speeds: list[float]):
    """``_throughput_rounds`` with each run replaced by its figure, in the order they are asked
    for; returns the order. A None bare figure is a failed run."""
    from kdray.bench import train
    from kdray.train.step import StepClock

    order, left = [], {t: list(v) for t, v in bare_speeds.items()}
    jobs = list(job_speeds)

    def row(speed: float) -> dict:
        return {"status": "ok", "tokens_per_s": speed, **dict.fromkeys(StepClock.KEYS)}

    def run_job(root, mode, args, label=None, **_):
        order.append("job")
        return row(jobs.pop(0))

    def run_bare(spec, out_dir, args, threads):
        order.append(f"b{threads}")
        speed = left[threads].pop(0)
        return row(speed) | {"threads": threads} if speed is not None else {
            "status": "failed", "threads": threads, "error": "boom"}

    monkeypatch.setattr(train, "run_job", run_job)
    monkeypatch.setattr(train, "run_bare", run_bare)
    return order


def test_each_job_sits_between_two_runs_of_every_bare_loop(tmp_path, monkeypatch):
    """Three rounds, bare loops of 1 and 2 threads: they swap order every round, so each one's
    runs around a job are equally far from it, and a round's bare figure is their mean."""
    from kdray.bench.train import _throughput_rounds, parse_args

    args = parse_args(["--bare-threads", "1", "2"])
    order = _stub_runs(monkeypatch, {1: [100, 110, 120, 130], 2: [90, 150, 90, 150]}, [50.0, 100.0, 100.0])
    results = {"modes": {}}
    _throughput_rounds(tmp_path, args, results)
    assert order == ["b1", "b2", "job", "b2", "b1", "job", "b1", "b2", "job", "b2", "b1"]
    # round 0: max(105, 120) / 50; round 1: max(115, 120) / 100; round 2: max(125, 120) / 100
    assert results["overhead_rounds"] == pytest.approx([2.4, 1.2, 1.25])
    assert results["overhead"] == pytest.approx(1.25) and results["bare_failures"] == []


def test_a_failed_bare_run_is_reported_and_its_rounds_use_the_other_side(tmp_path, monkeypatch):
    from kdray.bench.train import _throughput_rounds, parse_args

    args = parse_args(["--bare-threads", "1", "--rounds", "2"])
    _stub_runs(monkeypatch, {1: [100, None, 140]}, [100.0, 100.0])
    results = {"modes": {}}
    _throughput_rounds(tmp_path, args, results)
    assert results["overhead_rounds"] == pytest.approx([1.0, 1.4])
    assert results["bare_failures"] == [{"threads": 1, "run": 1, "error": "boom"}]
