"""The ``kdray`` command line.

    kdray validate SPEC           print the resolved spec, or every error with its field path
    kdray run SPEC [--address A] [--restart]  run (or resume) a job here or on a cluster's Ray
    kdray toy [--world W] [--force]  build (or show) a toy world (the demo's and tests'; grammar)
    kdray report DIR              (re-)render report.md and the PNG plots of a finished job
    kdray compare DIR...          several jobs side by side: one table, one plot
    kdray bench losses [...]      loss-kernel memory/time benchmark
    kdray bench service [...]     status latency under 50 clients while a job trains
    kdray bench store [...]       the job store's reads at 100,000 jobs; a long job's curve vs its events
    kdray bench train [...]       tokens/s of Ray Train + DeepSpeed vs a bare torch loop; memory per mode
    kdray bench generation [...]  tokens/s of the vLLM pool vs bare vLLM and HF generate
    kdray bench onpolicy [...]    replay's in-worker samples vs the live pool, synchronous and overlapped
    kdray repro [--quick] [...]   a grid of methods x seeds: the POCL and DistiLLM-2 orderings
    kdray serve [...]             the HTTP service (Ray Serve) that runs jobs as Ray jobs
    kdray submit|list|status|watch|logs|cancel|delete   its command-line client

One way to fail: an error the user can fix (the spec, the data, a model, the cluster, the
disk; :class:`kdray.errors.KdrayError`, also when it was raised on a Ray worker) prints one
readable message and exits 2, never a traceback; any other exception is a kdray bug and
Python prints its traceback (exit 1). Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from kdray.errors import interrupted, user_error

#: Exit status of an error the user can fix (a kdray bug exits 1, with its traceback).
EXIT_USER = 2
EXIT_INTERRUPTED = 130


def _err(console: Any, text: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from kdray.api import local_models, validate
    from kdray.spec import dump_spec

    spec = validate(args.spec)  # a training worker's memory against its budget too, where both models are here
    if len(local_models(spec)) == 2:  # both configs at hand: what a training worker will hold
        from kdray.train.memory import job_estimate

        sys.stderr.write(f"memory per training worker (estimate, {spec.training.num_workers} workers, ZeRO-"
                         f"{spec.training.zero_stage}):\n{job_estimate(spec).table()}\n")
    sys.stdout.write(dump_spec(spec))
    return 0


def _summary_table(report: Any) -> Any:
    from rich.table import Table

    from kdray.report.markdown import STDERR_NOTE, score

    table = Table(title=f"kdray job {report.name}: held-out evaluation", caption_justify="left")
    table.add_column("model")
    table.add_column("ROUGE-L", justify="right")
    table.add_column("exact match", justify="right")
    table.add_column("mean length", justify="right")
    for label, s in report.evaluation.items():
        table.add_row(label.replace("_", " "), score({"rougeL": s.rouge_l, "rougeL_stderr": s.rouge_l_stderr}, "rougeL"),
                      score({"exact_match": s.exact_match, "exact_match_stderr": s.exact_match_stderr}, "exact_match"),
                      f"{s.mean_length:.2f}")
    if any(s.rouge_l_stderr is not None for s in report.evaluation.values()):
        table.caption = STDERR_NOTE
    return table


def cmd_run(args: argparse.Namespace) -> int:
    from kdray.api import run
    from kdray.service.tracking import Tracker

    if args.log_file:  # a job the service submitted: it keeps a copy of the driver's log
        from kdray.service.driver_log import copy_output_to

        if why := copy_output_to(Path(args.log_file)):
            print(f"warning: no copy of this log in {args.log_file}: {why}", file=sys.stderr, flush=True)
    tracker = Tracker(args.store, args.job_id)  # a job the service submitted: its record follows the run
    with tracker.following():
        report = run(args.spec, address=args.address, restart=args.restart, job_id=args.job_id,
                     on_reporter=tracker.attach)
    _print_result(report)
    return 0


def _print_result(report: Any) -> None:
    from rich.console import Console

    stdout = Console()
    if report.evaluation:
        from kdray.report.markdown import paired
        from kdray.report.render import empty_answers_note

        stdout.print(_summary_table(report))
        for line in paired(report.data.get("paired_differences")):  # prompt by prompt
            stdout.print(line, highlight=False, markup=False)
        if note := empty_answers_note({k: s.mean_length for k, s in report.evaluation.items() if s.n}):
            stdout.print(note, markup=False)
    if judge := report.judge:
        from kdray.report.markdown import score

        stdout.print(f"judge {judge['model']}: student after vs {judge['reference']}: win rate "
                     f"{score(judge, 'win_rate')} over {judge['comparisons']} comparisons, position "
                     f"consistency {score(judge, 'position_consistency')}", markup=False)  # paths may hold [...]
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in report.timings_s.items())
    stdout.print(f"timings: {timings}")
    stdout.print(f"student: {report.student_dir}", markup=False)
    stdout.print(f"report:  {report.output_dir / 'report.md'} (and report.json, *.png)", markup=False)


def cmd_toy(args: argparse.Namespace) -> int:
    import json

    from kdray import toy

    world = toy.build_world(
        args.world,
        Path(args.cache_dir) if args.cache_dir else None,
        force=args.force,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps({"root": str(world.root), **world.meta}, indent=2, default=str))
    return 0


#: ``kdray bench NAME``: the modules of :mod:`kdray.bench` that have a ``run(argv)``.
BENCHES = ("losses", "service", "train", "generation", "onpolicy", "scale", "store")


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"kdray.bench.{args.what}").run(args.rest)  # ``what``: one of BENCHES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation of LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a job spec and print it with every default resolved")
    p.add_argument("spec", help="job spec YAML file")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="run a job (starts a local Ray unless --address is given)")
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--restart", action="store_true",
                   help="discard what an earlier run of this job left in output_dir and start over "
                        "(default: resume it)")
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)  # set by kdray serve
    p.add_argument("--job-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-file", default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("toy", help="build a toy world (dataset, tokenizer, teacher, student) and print its metadata")
    p.add_argument("--world", choices=["toy", "grammar"], default="toy",
                   help="toy (default: one right answer per prompt) or grammar (answers with a known distribution)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--cache-dir", default=None,
                   help="cache directory (default: $KDRAY_CACHE_DIR/WORLD or ~/.cache/kdray/WORLD)")
    p.set_defaults(fn=cmd_toy)

    from kdray.service import client
    from kdray.report import render as report
    from kdray.repro import cli as repro

    report.add_parsers(sub)
    repro.add_parsers(sub)
    client.add_parsers(sub)

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    p.add_argument("what", choices=BENCHES, help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see kdray bench WHAT --help)")
    p.set_defaults(fn=cmd_bench)
    return parser


def _quiet_ray() -> None:
    """Silence Ray's loggers for the rest of an interrupted process: a pool's dataset still runs
    in its thread (:func:`kdray.stages.context.run_draining`) while Ray shuts down at exit, and
    Ray Data logged tracebacks of "Ray is not initialized" after the job's last word."""
    import logging

    for name in ["ray", *logging.root.manager.loggerDict]:  # Ray sets some of its loggers' own levels
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: its exit status, 2 with one message for the user's error, or the
    exception itself (a kdray bug: its traceback, exit 1)."""
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        return args.fn(args)
    except (KeyboardInterrupt, SystemExit) as exc:
        if not interrupted(exc):  # another exit
            raise
        _err(console, "interrupted")
        _quiet_ray()
        return EXIT_INTERRUPTED
    except Exception as exc:
        if interrupted(exc):  # an interrupt Python wrapped (kdray.errors.interrupted)
            _err(console, "interrupted")
            return EXIT_INTERRUPTED
        user = user_error(exc)  # also behind a Ray worker's failure, a full disk, a lost node
        if user is None:
            raise
        _err(console, str(user))
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
