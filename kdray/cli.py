"""The ``kdray`` command line.

    kdray validate SPEC           print the resolved spec, or every error with its field path
    kdray run SPEC [--address A] [--restart]  run (or resume) a job here or on a cluster's Ray
    kdray toy [--force]           build (or show) the toy world used by the demo and tests
    kdray report DIR              (re-)render report.md and the PNG plots of a finished job
    kdray compare DIR...          several jobs side by side: one table, one plot
    kdray bench losses [...]      loss-kernel memory/time benchmark
    kdray bench service [...]     status latency under 50 clients while a job trains
    kdray bench train [...]       tokens/s of Ray Train + DeepSpeed vs a bare torch loop; memory per mode
    kdray bench generation [...]  tokens/s of the vLLM pool vs bare vLLM and HF generate
    kdray repro [--quick] [...]   a grid of methods x seeds: the POCL and DistiLLM-2 orderings
    kdray serve [...]             the HTTP service (Ray Serve) that runs jobs as Ray jobs
    kdray submit|list|status|watch|logs|cancel   its command-line client

User errors print one readable message and exit 2 (spec/data) or 1 (job failure); they never
print a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from kdray.errors import KdrayError, SpecError

EXIT_USAGE = 2
EXIT_FAILED = 1


def _err(console: Any, text: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from kdray.spec import dump_spec, load_spec

    spec = load_spec(args.spec)
    _check_vocabularies(spec)
    sys.stdout.write(dump_spec(spec))
    return 0


def _check_vocabularies(spec: Any) -> None:
    """Teacher and student must share a tokenizer; checked here when both are on this machine
    (toy models or local directories). A hub id is checked by the job when it loads it."""
    from kdray.models import shared_vocab_size
    from kdray.spec import TOY_PREFIX

    if all(m.model.startswith(TOY_PREFIX) or Path(m.model).expanduser().is_dir() for m in (spec.teacher, spec.student)):
        try:
            shared_vocab_size(spec.teacher.model, spec.student.model)
        except KdrayError as exc:
            raise SpecError([("teacher.model / student.model", str(exc))]) from None


def _summary_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"kdray job {report['name']}: held-out evaluation")
    table.add_column("model")
    table.add_column("ROUGE-L", justify="right")
    table.add_column("exact match", justify="right")
    table.add_column("mean length", justify="right")
    for label, scores in report["evaluation"].items():
        table.add_row(
            label.replace("_", " "),
            f"{scores['rougeL']:.3f}",
            f"{scores['exact_match']:.3f}",
            f"{scores['mean_length']:.2f}",
        )
    return table


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from rich.console import Console

    from kdray.pipeline.job import Job
    from kdray.pipeline.progress import ConsoleReporter
    from kdray.spec import load_spec

    store = None
    if args.store:  # a job the service submitted: its record follows the run
        from kdray.service.store import JobStore

        if not args.job_id:
            raise SpecError([("--job-id", "required with --store")])
        store = JobStore(args.store)
    try:
        spec = load_spec(args.spec)
        out = Path(spec.output_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
    except (SpecError, OSError) as exc:
        if store is not None:
            store.update(args.job_id, state="failed", error=str(exc))
        raise
    console = Console(stderr=True)
    reporter = ConsoleReporter(out / "events.jsonl", console=console)
    if store is not None:
        reporter.sinks.append(lambda event: store.append_event(args.job_id, event))
        store.update(args.job_id, state="running")
        # Ray Jobs stops a job with SIGTERM: unwind like Ctrl-C so the record says so.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = Job(spec, reporter=reporter, address=args.address, restart=args.restart).run()
    except KeyboardInterrupt:
        if store is not None:
            cancelled = (store.get(args.job_id) or {}).get("state") == "cancelling"
            store.update(args.job_id, state="cancelled" if cancelled else "failed",
                         error=None if cancelled else "interrupted")
        raise
    except Exception as exc:
        if store is not None:
            store.update(args.job_id, state="failed", error=str(exc) or type(exc).__name__)
        raise
    finally:
        reporter.close()
    if store is not None:
        store.update(args.job_id, state="succeeded")
    stdout = Console()
    if report["evaluation"]:
        stdout.print(_summary_table(report))
    if judge := report.get("judge"):
        def rate(key: str) -> str:
            return "n/a" if judge.get(key) is None else f"{judge[key]:.3f}"

        stdout.print(f"judge {judge['model']}: student after vs {judge['reference']}: win rate "
                     f"{rate('win_rate')} over {judge['comparisons']} comparisons, position "
                     f"consistency {rate('position_consistency')}")
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_s"].items())
    stdout.print(f"timings: {timings}")
    stdout.print(f"student: {report['student_dir']}")
    stdout.print(f"report:  {out.resolve() / 'report.md'} (and report.json, *.png)")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    import json

    from kdray import toy

    world = toy.build_toy_world(
        Path(args.cache_dir) if args.cache_dir else None,
        force=args.force,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps({"root": str(world.root), **world.meta}, indent=2, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "losses":
        from kdray.bench import losses as bench_losses

        return bench_losses.run(args.rest)
    if args.what == "service":
        from kdray.bench import service as bench_service

        return bench_service.run(args.rest)
    if args.what == "train":
        from kdray.bench import train as bench_train

        return bench_train.run(args.rest)
    if args.what == "generation":
        from kdray.bench import generation as bench_generation

        return bench_generation.run(args.rest)
    raise KdrayError(f"unknown benchmark {args.what!r}")


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
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("toy", help="build the toy world (dataset, tokenizer, teacher, student) and print its metadata")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $KDRAY_CACHE_DIR/toy or ~/.cache/kdray/toy)")
    p.set_defaults(fn=cmd_toy)

    from kdray.service import client
    from kdray.report import render as report
    from kdray.repro import harness as repro

    report.add_parsers(sub)
    repro.add_parsers(sub)
    client.add_parsers(sub)

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    p.add_argument("what", choices=["losses", "service", "train", "generation"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see kdray bench WHAT --help)")
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        return args.fn(args)
    except SpecError as exc:
        _err(console, str(exc))
        return EXIT_USAGE
    except KdrayError as exc:
        _err(console, str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err(console, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
