"""Benchmark: distillation throughput through Ray Train + DeepSpeed against a bare torch loop,
and the peak memory of a training worker per teacher-signal mode.

Measured in one run, on the toy models (``toy:teacher`` → ``toy:student``, forward KL):

* **Ray Train + DeepSpeed ZeRO-2** (``--workers``, default 2; ``--zero-stage``): a real job (``kdray run`` in a
  subprocess, its own local Ray) trains on the toy dataset's responses
  (``data.response_source: dataset``, so no generation phase) with evaluation off. Tokens/s
  is read from the job's per-step metrics (``tokens_per_s``: response tokens of all workers
  over the step's wall time on rank 0, from the previous step's end: its data wait and the
  previous step's report to the driver included), the median over the steady-state steps (the
  first ``--skip-steps`` are start-up and left out).
* **bare torch loop**: one process (its own subprocess) doing the same work on the same
  sequences: the same student and teacher, micro-batches of the same size, the same
  tokenization (:class:`kdray.data.examples.TokenizeForTraining`), and the one local loop
  (:class:`kdray.train.loop.LocalLoop`: the workers' step objective, AdamW with the same cosine
  schedule, gradient clipping, gradient accumulation up to the same global batch). It is timed
  from the previous step's end to its optimizer step (collating its micro-batches included),
  as the job's workers time theirs. It
  runs with 1 torch thread and with as many as the job has workers (the job's CPU budget: Ray
  gives each worker one CPU and one thread), each in its own process; the faster is the
  baseline (on tiny models extra intra-op threads mostly add synchronisation); ``--quick``
  runs 1 thread only.

The overhead is bare tokens/s over Ray's (target <= 1.3x), per round: the job and the bare
loop(s) run interleaved ``--rounds`` times, the bare loops once more at the end, so that each
job lies between two bare runs (:mod:`kdray.bench.interleave`); a round's bare figure is the
mean of those two, so a load that drifts through the minute or so of a job hits both sides
alike. The median of the rounds' ratios is printed with their spread and the host's load over
the run. Start-up is reported apart: for
the job, from the start of its train phase to its first step's metrics at the driver
(Ray Train workers, dataset tokenization, model loads, DeepSpeed initialisation, step 1);
for the bare loop, from loading the data and models to the end of step 1.

Then every teacher-signal mode (``online``, ``topk``, ``hidden``) runs as its own job of the
same shape (the throughput job is the ``online`` one) and reports the peak resident memory of
a training worker (``peak_rss_mb`` in each step's metrics: ``VmHWM`` of rank 0's process
since its models were loaded, :func:`kdray.train.setup.reset_peak_rss`; the ranks are
symmetric; every process runs with :data:`kdray.bench.train_runs.MEASURED_MALLOC`). A mode whose job fails is reported as failed with its error.

The memory section (:mod:`kdray.bench.train_memory`) puts each mode's measured peak beside
kdray's estimate for the same job: on a randomly initialised 0.5B teacher in jobs of
``--memory-steps`` steps (``--memory-teacher 0.5b``, the default), with the ``online`` job
also run under ZeRO-3 (the teacher partitioned over the workers), or on the toy jobs above
(``toy``, the default with ``--quick``).

Usage: ``kdray bench train [--quick] [--steps 400] [--modes online topk hidden]
[--memory-teacher 0.5b|toy] [--json PATH]``.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdray.bench.interleave import (HostLoad, add_rounds_option, bracketed, interleave, median_row, ratio_summary,
                                     resolve_rounds)
from kdray.bench.train_memory import PARTITIONED, add_estimate, random_teacher
from kdray.bench.train_report import TARGET_OVERHEAD, render
from kdray.bench.train_runs import MEASURED_MALLOC, error_line, run_bare, step_time_parts
from kdray.report.render import load_report
from kdray.toy.data import FAMILIES
from kdray.toy.world import N_TRAIN_PER_FAMILY

MODES = ("online", "topk", "hidden")
#: The toy world's train rows (:mod:`kdray.toy.world`).
TOY_TRAIN_ROWS = N_TRAIN_PER_FAMILY * len(FAMILIES)
#: Optimizer steps per job by default: about 20 s of training on the 2-core host, so that a
#: round's figure averages over the host's load swings (at 40 steps, the default until
#: 2026-12-04, a round's steady window was 2 s, and rounds of one run differed by up to 51%).
DEFAULT_STEPS = 400


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 3 skipped, one round: the 1-thread bare loop before and after the job")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per job (default {DEFAULT_STEPS}; --quick 10)")
    p.add_argument("--skip-steps", type=int, default=None,
                   help="start-up steps left out of the tokens/s median (default 5; --quick 3)")
    p.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step (default 32)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch and worker (default 8)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2,
                   help="the jobs' training.zero_stage (default 2; the memory section sets its own)")
    p.add_argument("--bare-threads", type=int, nargs="+", default=None,
                   help="torch threads of the bare loop, each its own run; the fastest is the baseline "
                        "(default: 1 and --workers, the job's CPU budget; --quick: 1)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="teacher-signal modes for the memory table (default: all three)")
    p.add_argument("--memory-teacher", choices=("0.5b", "toy"), default=None,
                   help="the memory section's teacher: a random 0.5B Llama (default) or the toy jobs' (--quick)")
    p.add_argument("--memory-steps", type=int, default=4, help="optimizer steps of each 0.5B memory job (default 4)")
    add_rounds_option(p, "the bare loop(s) and the job; the bare loops also run once after the last")
    p.add_argument("--out", default=None, help="keep the jobs' output here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--check", action="store_true", help="exit 1 if the overhead target does not hold")
    return p


# ----------------------------------------------------------------------------- the jobs


def job_spec(out: Path, mode: str, *, steps: int, workers: int, global_batch: int, micro_batch: int,
             teacher: str = "toy:teacher", zero_stage: int = 2) -> dict[str, Any]:
    """A small toy job: ``steps`` optimizer steps over two epochs (more where the toy's 4,000
    train rows run out), ZeRO-2 (or ``zero_stage``), evaluation off."""
    rows = min(max(global_batch, (steps + 1) // 2 * global_batch), TOY_TRAIN_ROWS)
    epochs = max(2, -(-steps // max(1, rows // global_batch)))
    return {
        "name": f"bench-train-{mode}",
        "output_dir": str(out),
        "teacher": {"model": teacher, "dtype": "float32", "max_model_len": 128},
        "student": {"model": "toy:student", "dtype": "float32", "max_model_len": 128},
        "data": {"train": "toy:train", "heldout": "toy:heldout", "max_train_samples": rows,
                 "max_heldout_samples": 8, "max_prompt_tokens": 64, "response_source": "dataset"},
        "generation": {"sampling_temperature": 0.0, "max_new_tokens": 32, "num_cpus_per_replica": 0.5,
                       "batch_size": 256, "enforce_eager": True},
        "objective": {"kind": "forward_kl", "kd_temperature": 1.0, "kd_ratio": 1.0},
        "teacher_signal": {"mode": mode},
        "training": {"num_workers": workers, "zero_stage": zero_stage, "lr": 3e-3, "warmup_steps": 2,
                     "global_batch_size": global_batch, "micro_batch_size_per_worker": micro_batch,
                     "epochs": epochs, "max_steps": steps, "max_seq_len": 96},
        "evaluation": {"enabled": False},
    }




def write_spec(out: Path, mode: str, args: argparse.Namespace, *, teacher: str = "toy:teacher",
               steps: int | None = None, zero_stage: int | None = None) -> Path:
    """``out / "spec.yaml"``: the job of ``mode`` at the bench's shape (:func:`job_spec`; its
    output under ``out / "job"``)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    spec = job_spec(out / "job", mode, steps=steps or args.steps, workers=args.workers,
                    global_batch=args.global_batch, micro_batch=args.micro_batch, teacher=teacher,
                    zero_stage=args.zero_stage if zero_stage is None else zero_stage)
    path = out / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_job(root: Path, mode: str, args: argparse.Namespace, *, teacher: str = "toy:teacher",
            steps: int | None = None, label: str | None = None, zero_stage: int | None = None) -> dict[str, Any]:
    """Run one mode's job with ``kdray run`` (under ``root / label``, default the mode); its
    steps' metrics, start-up and peak memory."""
    out = root / (label or mode)
    path = write_spec(out, mode, args, teacher=teacher, steps=steps, zero_stage=zero_stage)
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "kdray.cli", "run", str(path), "--restart"], cwd=out,
                              stdout=log, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", **MEASURED_MALLOC))
    wall = time.perf_counter() - t0
    (out / "stderr.log").write_text(proc.stderr)
    result: dict[str, Any] = {"mode": mode, "spec": str(path), "wall_s": wall}
    if proc.returncode != 0:
        return {**result, "status": "failed", "error": error_line(proc.stderr)}
    report = load_report(out / "job", with_steps=True)
    steps = [m for m in report["train_metrics"] if "loss" in m]
    events = [json.loads(line) for line in (out / "job" / "events.jsonl").read_text().splitlines()]
    train_start = next(e["time"] for e in events if e["kind"] == "phase_start" and e["phase"] == "train")
    first_step = next(e["time"] for e in events if e["kind"] == "train_step" and "loss" in e)
    steady = [m["tokens_per_s"] for m in steps[args.skip_steps:]]
    peaks = [m["peak_rss_mb"] for m in steps if "peak_rss_mb" in m]
    return {
        **result,
        **step_time_parts(steps[args.skip_steps:]),
        "sequences_per_step": args.global_batch // args.workers,  # rank 0's share of a step
        "status": "ok",
        "steps": len(steps),
        "steady_steps": len(steady),
        "tokens_per_s": statistics.median(steady) if steady else float("nan"),
        "startup_s": first_step - train_start,
        "train_phase_s": report["timings_s"].get("train"),
        "score_phase_s": report["timings_s"].get("score"),
        "peak_rss_mb": max(peaks) if peaks else float("nan"),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
    }


def memory_section(root: Path, modes: list[str], args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Each mode's measured peak beside its estimate: the toy jobs' (``--memory-teacher toy``),
    or jobs of ``--memory-steps`` steps on the random 0.5B teacher, where ``online`` also runs
    under ZeRO-3 (:data:`PARTITIONED`: the teacher partitioned over the workers)."""
    if args.memory_teacher == "toy":
        results["memory_teacher"] = "toy:teacher"
        return {mode: add_estimate(results["modes"][mode], root / mode / "spec.yaml") for mode in modes}
    print("building the memory section's random 0.5B teacher ...", file=sys.stderr, flush=True)
    teacher = random_teacher(root)
    results["memory_teacher"] = "random Llama, 0.48B parameters"
    out = {}
    variants = [(mode, mode, 2) for mode in modes] + ([(PARTITIONED, "online", 3)] if "online" in modes else [])
    for name, mode, zero_stage in variants:
        print(f"running the {name} memory job (0.5B teacher, {args.memory_steps} steps) ...", file=sys.stderr, flush=True)
        label = f"memory-{mode}-zero{zero_stage}"
        out[name] = add_estimate(run_job(root, mode, args, teacher=teacher, steps=args.memory_steps, label=label,
                                         zero_stage=zero_stage), root / label / "spec.yaml")
    return out




def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one row: the median of the rounds' tokens/s and step-time parts."""
    from kdray.train.step import StepClock

    return median_row(runs, lambda r: r.get("status") == "ok",
                      ["tokens_per_s", *StepClock.KEYS])


def _throughput_rounds(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The bare loop(s) and the online job, interleaved ``args.rounds`` times with the bare
    loops bracketing the jobs (bare, job, bare, job, ..., bare; :mod:`kdray.bench.interleave`):
    a round's overhead is the fastest bare loop's tokens/s, the mean of its runs before and
    after the round's job, over the job's; the median over rounds is printed with its spread.
    Round 0's job is ``root / "online"``; the bare loops run ``root / "bare" / "spec.yaml"``,
    the same job's spec."""
    bares = [f"bare-{t}" for t in args.bare_threads]
    bare_spec = write_spec(root / "bare", "online", args)

    def measure(variant: str, r: int) -> dict[str, Any]:
        if variant == "job":
            print(f"round {r + 1}/{args.rounds}: the online job ({args.steps} steps, {args.workers} workers) ...",
                  file=sys.stderr, flush=True)
            return run_job(root, "online", args, label="online" if r == 0 else f"online-r{r}")
        threads = int(variant.split("-", 1)[1])
        when = f"round {r + 1}/{args.rounds}" if r < args.rounds else "after the last round"
        print(f"{when}: the bare torch loop ({threads} thread(s)) ...", file=sys.stderr, flush=True)
        return run_bare(bare_spec, root / "bare" / f"r{r}", args, threads)

    rounds = interleave(measure, [*bares, "job"], args.rounds, bracket=len(bares))
    results["modes"]["online"] = results["ray"] = _median_run(rounds["job"])  # the throughput job is the online one
    results["bare_runs"] = [_median_run(rounds[v]) for v in bares]
    ran = [r for r in results["bare_runs"] if r.get("status") == "ok"]
    results["bare"] = max(ran, key=lambda r: r["tokens_per_s"]) if ran else results["bare_runs"][0]
    around = [bracketed([b["tokens_per_s"] if b.get("status") == "ok" else None for b in rounds[v]]) for v in bares]
    results["bare_failures"] = [{"threads": b.get("threads"), "run": i, "error": b.get("error", "")}
                                for v in bares for i, b in enumerate(rounds[v]) if b.get("status") != "ok"]
    best_bare = [max((a[r] for a in around if a[r] is not None), default=None) for r in range(args.rounds)]
    job = [j["tokens_per_s"] if j.get("status") == "ok" else None for j in rounds["job"]]
    summary = ratio_summary(best_bare, job)
    results["overhead"] = summary.median if summary else None
    results["overhead_rounds"] = list(summary.ratios) if summary else []
    results["overhead_summary"] = str(summary) if summary else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with its defaults filled in (they depend on ``--quick`` and
    ``--workers``); exits with a message on options that do not go together."""
    args = _parser().parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else DEFAULT_STEPS
    if args.skip_steps is None:
        args.skip_steps = 3 if args.quick else 5
    if args.memory_teacher is None:
        args.memory_teacher = "toy" if args.quick else "0.5b"
    resolve_rounds(args)
    if args.bare_threads is None:
        args.bare_threads = [1] if args.quick else [1, args.workers]
    args.bare_threads = sorted(set(args.bare_threads))  # a thread count twice would pair the wrong runs
    if args.steps <= args.skip_steps:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip-steps ({args.skip_steps})")
    per_step = args.micro_batch * args.workers
    if args.global_batch % per_step:
        raise SystemExit(f"--global-batch ({args.global_batch}) must be a multiple of --micro-batch x --workers ({per_step})")
    return args


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``kdray bench train``; returns the process exit code."""
    args = parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        print("kdray bench train needs Linux /proc (VmHWM) to measure peak memory", file=sys.stderr)
        return 2
    from kdray.toy import build_toy_world

    build_toy_world(progress=lambda line: print(line, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="kdray-bench-train-") as tmp:
        root = Path(args.out).expanduser().resolve() if args.out else Path(tmp)
        modes = ["online"] + [m for m in args.modes if m != "online"]  # online: throughput and reference
        results: dict[str, Any] = {"workers": args.workers, "global_batch": args.global_batch,
                                   "micro_batch": args.micro_batch, "steps": args.steps,
                                   "skip_steps": args.skip_steps, "zero_stage": args.zero_stage, "modes": {}}
        with HostLoad() as load:
            _throughput_rounds(root, args, results)
            for mode in modes[1:]:
                print(f"running the {mode} job ({args.steps} steps, {args.workers} workers) ...", file=sys.stderr,
                      flush=True)
                results["modes"][mode] = run_job(root, mode, args)
            results["memory"] = memory_section(root, modes, args, results)
        results["host_load"] = str(load)
    render(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    measured = len(results["overhead_rounds"]) == args.rounds and not results["bare_failures"]
    if args.check and not (measured and results["overhead"] <= TARGET_OVERHEAD):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
