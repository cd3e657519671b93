"""The report of ``kdray bench train`` (:mod:`kdray.bench.train`): the throughput table with
the overhead against its target, the teacher-signal modes' memory table, and the memory
section's estimates (:mod:`kdray.bench.train_memory`)."""

from __future__ import annotations

import sys
from typing import Any

from rich.markup import escape

from kdray.bench.train_memory import render_memory

#: The most bare-loop tokens/s per job tokens/s that ``kdray bench train`` accepts.
TARGET_OVERHEAD = 1.3


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def _render_step_time(console: Any, rows: list[tuple[str, dict[str, Any]]]) -> None:
    """Where a steady-state step's time goes in each run: the mean seconds of each part
    (:class:`kdray.train.step.StepClock`; the job's from rank 0, which trains its share of the
    step's sequences), and the CPU time the process spent in the step with its share of the wall
    time: under 1 with one thread, the rest is waiting (on the other ranks, or for a core)."""
    from rich.table import Table

    from kdray.train.step import StepClock

    table = Table(title="where a step's time goes (mean seconds per steady-state step; the job: rank 0)")
    table.add_column("run")
    table.add_column("sequences on this process", justify="right")
    ran = [r for _, r in rows if r.get("status") == "ok"]
    keys = [p for p in StepClock.PARTS if any(r.get(f"{p}_s") for r in ran)] + ["step"]  # parts no run has left out
    for part in keys:
        table.add_column("whole step" if part == "step" else part.replace("_", " "), justify="right")
    table.add_column("CPU (share)", justify="right")
    for label, r in rows:
        if r.get("status") == "ok":
            cpu, wall = r.get("cpu_s"), r.get("step_s")
            share = f" ({cpu / wall:.0%})" if cpu is not None and wall else ""
            table.add_row(label, _fmt(r.get("sequences_per_step")), *(_fmt(r.get(f"{p}_s"), ".3f") for p in keys),
                          _fmt(cpu, ".3f") + share)
    console.print(table)


def render(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    ray_run, bare = results["ray"], results["bare"]
    table = Table(title=f"kdray bench train: distillation tokens/s (toy student ← toy teacher, "
                        f"global batch {results['global_batch']}, micro-batch {results['micro_batch']})")
    for col in ("run", "status", "tokens/s (steady median)", "steps (steady)", "start-up s", "loss first → last"):
        table.add_column(col, justify="left" if col in ("run", "status") else "right")
    rows = [(f"Ray Train + DeepSpeed ZeRO-{results.get('zero_stage', 2)} ({results['workers']} workers)", ray_run)]
    rows += [(f"bare torch loop ({r.get('threads', '?')} thread{'s' if r.get('threads') != 1 else ''})"
              + (" (baseline)" if r is bare and len(results["bare_runs"]) > 1 else ""), r) for r in results["bare_runs"]]
    for label, r in rows:
        ok = r.get("status") == "ok"
        table.add_row(label, "ok" if ok else f"failed: {r.get('error', '')}",
                      _fmt(r.get("tokens_per_s")), f"{r.get('steps', '-')} ({r.get('steady_steps', '-')})",
                      _fmt(r.get("startup_s"), ".1f"),
                      f"{_fmt(r.get('first_loss'), '.3f')} → {_fmt(r.get('last_loss'), '.3f')}" if ok else "-")
    console.print(table)
    _render_step_time(console, rows)
    overhead = results.get("overhead")
    if overhead is not None:
        verdict = "[green]meets[/]" if overhead <= TARGET_OVERHEAD else "[red]misses[/]"
        per_round = ", ".join(f"{r:.2f}" for r in results["overhead_rounds"])
        console.print(f"overhead: bare / Ray = {results['overhead_summary']}, rounds {per_round} (a round: the "
                      "fastest bare loop's tokens/s, the mean of its runs before and after the round's job, over "
                      f"the job's); {verdict} the target <= {TARGET_OVERHEAD}x")
    else:
        console.print("overhead: not measured (a run failed)")
    for failed in results.get("bare_failures", []):  # its rounds use the bare run on their other side
        console.print(f"[red]bare loop ({failed['threads']} thread(s)), run {failed['run'] + 1} failed[/]: "
                      f"{escape(failed['error'])}")

    mem = Table(title="teacher-signal modes on the toy teacher (peak memory: VmHWM of rank 0)")
    for col in ("teacher_signal.mode", "status", "peak RSS MiB", "vs online", "tokens/s", "score phase s",
                "train phase s"):
        mem.add_column(col, justify="left" if col in ("teacher_signal.mode", "status") else "right")
    online = results["modes"].get("online", {}).get("peak_rss_mb")
    for mode, r in results["modes"].items():
        ok = r.get("status") == "ok"
        ratio = r["peak_rss_mb"] / online if ok and online and online == online else None
        mem.add_row(mode, "ok" if ok else f"[red]failed[/]: {r.get('error', '')}", _fmt(r.get("peak_rss_mb")),
                    _fmt(ratio, ".2f") + ("x" if ratio else ""), _fmt(r.get("tokens_per_s")),
                    _fmt(r.get("score_phase_s"), ".1f"), _fmt(r.get("train_phase_s"), ".1f"))
    mem.add_row("bare loop (1 process)", bare.get("status", "-"), _fmt(bare.get("peak_rss_mb")), "", "", "", "")
    console.print(mem)
    render_memory(results, console, _fmt)
    console.print(results.get("host_load", ""))
