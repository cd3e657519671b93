"""Reports of finished jobs: ``kdray report DIR`` and ``kdray compare DIR...``.

:func:`render_report` turns ``DIR/report.json`` and ``DIR/train_metrics.jsonl`` into
``report.md``, ``loss.png`` (loss and its parts per step), ``schedule.png`` (lr, temperature,
kd_ratio, α, β, stage, round: one panel per quantity), ``evaluation.png`` (held-out scores per
model and round) and, for a job scored after each round (``evaluation.per_round``),
``evaluation_rounds.png`` (scores vs round, with the teacher and the initial student as reference
lines); :func:`compare_reports` puts jobs side by side in one markdown table and ``compare.png``.
Plots use matplotlib's Agg canvas directly (no display, no pyplot state) under fixed rc settings,
so a report renders to the same bytes every time; every file is written under a temporary name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError
from kdray.report.train_metrics import last_step, read_train_metrics
from kdray.train.step import StepClock
from kdray.report.markdown import STDERR_NOTE, cell as _cell, duration as _duration, fmt as _fmt, has_stderr, paired, score
from kdray.report.markdown import table as _table
from kdray.report.plots import (_COUNTERS, _num, _write_atomic, plot_compare, plot_evaluation, plot_evaluation_rounds,
                                plot_loss, plot_schedule)

# Per-step keys that are neither a loss part nor a schedule value (the step's time parts among them).
# The parts, then the whole step and the CPU time rank 0's process spent in it (StepClock.lap).
_STEP_TIME = list(StepClock.KEYS)
_STEP_TIME_NAMES = {"step_s": "whole step", "cpu_s": "CPU (this process)"}
# (generate_s: the on-policy pool's time for a step's samples, which may overlap the step)
_NOT_PLOTTED = {"step", "total_steps", "epoch", "final", "time", "tokens_per_s", "grad_norm", "generate_s", *_STEP_TIME}
_LOSS_KEYS = {"loss", "kd", "ce", "skl", "srkl", "fkl", "rkl", "tvd", "jsd", "akl", "cald"}
_SCHEDULE_FIRST = ("lr", "kd_temperature", "temperature", "kd_ratio", "alpha", "beta", "stage", "round")
_FIX = "run the job first: kdray run SPEC"


def _ending(events: Path) -> str | None:
    """How a job whose ``events.jsonl`` ends before its report ended, as ``kdray report`` says
    it: ``failed (ERROR)`` (:data:`kdray.pipeline.progress.FAILED_EVENT`), ``was stopped
    before it finished`` (:data:`~kdray.pipeline.progress.STOPPED_EVENT`), else None."""
    from kdray.pipeline.progress import FAILED_EVENT, STOPPED_EVENT

    try:
        with events.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 65536))
            last = json.loads(fh.read().decode("utf-8", "replace").strip().rsplit("\n", 1)[-1])
    except (OSError, ValueError):
        return None
    kind = last.get("kind") if isinstance(last, dict) else None
    if kind == FAILED_EVENT:
        return f"failed ({last.get('error')}); fix that and run it again"
    if kind == STOPPED_EVENT:
        return "was stopped before it finished (Ctrl-C, or SIGTERM: a cancel); run it again"
    return None


def load_report(job_dir: Path, with_steps: bool = False) -> dict[str, Any]:
    """The parsed ``report.json`` of a job directory (with every step's metrics under
    ``train_metrics`` if ``with_steps``: :mod:`.train_metrics`), or a KdrayError naming the path and fix."""
    job_dir = Path(job_dir)
    path = job_dir if job_dir.name == "report.json" and job_dir.is_file() else job_dir / "report.json"
    if not path.is_file():
        if ended := _ending(path.parent / "events.jsonl"):
            raise KdrayError(f"{path.parent} has no report.json: its job {ended} (it resumes): kdray run SPEC")
        what = "has no report.json" if path.parent.is_dir() else "is not a directory"
        raise KdrayError(f"{path.parent} {what} ({path} not found); {_FIX}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdrayError(f"{path} is not a valid report ({exc}); {_FIX}") from exc
    if not isinstance(report, dict):
        raise KdrayError(f"{path} is not a valid report (expected a JSON object); {_FIX}")
    if with_steps:
        report["train_metrics"] = read_train_metrics(path.parent, report)
    return report



def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _evaluation(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Evaluation entries ordered teacher, student_before, student_round_N (by N), student_after,
    then anything else in its stored order."""
    ev = _dict(report.get("evaluation"))
    fixed = {"teacher": (0, 0), "student_before": (1, 0), "student_after": (3, 0)}

    def rank(label: str) -> tuple[int, int]:
        match = re.fullmatch(r"student_round_(\d+)", label)
        return fixed.get(label) or ((2, int(match.group(1))) if match else (4, 0))

    return [(k, ev[k]) for k in sorted(ev, key=rank) if isinstance(ev[k], dict)]  # stable sort


def _rounds(entries: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The student after each round: student_round_1..N-1, then student_after (round N); empty
    when the job recorded no per-round scores."""
    rounds = [(k, s) for k, s in entries if re.fullmatch(r"student_round_\d+", k)]
    final = [(k, s) for k, s in entries if k == "student_after"]
    return rounds + final if rounds and final else []


def _round_unit(report: dict[str, Any]) -> str:
    plan = report.get("plan")
    staged = isinstance(plan, list) and any(_dict(p).get("stage") is not None for p in plan)
    return "stage" if staged else "round"


def _judge_lines(judge: dict[str, Any]) -> list[str]:
    reference = str(judge.get("reference", "?")).replace("_", " ")
    intro = (f"Judge `{judge.get('model', '?')}` compared the distilled student (student after) with "
             f"**{reference}** on {_fmt(judge.get('items'), '.0f')} held-out prompts, once in each answer "
             "order. A verdict other than A or B counts as a tie; the win rate counts ties as half a win.")
    if judge.get("win_rate_stderr") is not None:
        intro += (" Its ± is the standard error over the prompts (a prompt's two verdicts as one unit): a win rate "
                  "less than about two of it from 0.500 does not tell the two models apart.")
    out = ["", "## LLM judge", "", intro, ""]
    out += _table(["quantity", "value"], [
        ["win rate of the student", score(judge, "win_rate")],
        ["comparisons (both orders)", _fmt(judge.get("comparisons"), ".0f")],
        ["wins / ties / losses", " / ".join(_fmt(judge.get(k), ".0f") for k in ("wins", "ties", "losses"))],
        ["position consistency", _fmt(judge.get("position_consistency"))],
        ["judged A in both orders", _fmt(judge.get("first_position_bias"))],
        ["judged B in both orders", _fmt(judge.get("second_position_bias"))],
        ["prompts skipped (judge prompt too long)", _fmt(judge.get("skipped_too_long"), ".0f")]])
    return out


def _step_time_row(metrics: list[dict[str, Any]]) -> list[list[str]]:
    """The mean of each of a step's time parts (:class:`kdray.train.step.StepClock`, rank 0)
    over the steps that report them (a mean: the batched reports come every few steps), as one
    table row; none when no step does."""
    parts = []
    for key in _STEP_TIME:
        values = [v for v in (_num(m.get(key)) for m in metrics) if not math.isnan(v)]
        if values:
            name = _STEP_TIME_NAMES.get(key, key[:-2].replace("_", " "))
            parts.append(f"{name} {statistics.fmean(values):.3f}")
    return [["a step's seconds (mean; rank 0)", " · ".join(parts)]] if parts else []


def _replay_row(metrics: list[dict[str, Any]]) -> list[list[str]]:
    """DistiLLM's replay (``replay_decision``, :mod:`kdray.train.replay`): the steps of each
    source, and the pushes to the live student pool (``sampler: pool``) with their mean time."""
    decided = [m for m in metrics if "replay_decision" in m]
    if not decided:
        return []
    counts = {d: sum(m["replay_decision"] == d for m in decided) for d in ("fresh", "replay", "fixed")}
    pushes = [v for v in (_num(m.get("weight_sync_s")) for m in decided) if v > 0]
    pool = (f"; {len(pushes)} pushes to the student pool, {statistics.fmean(pushes):.3f} s each (mean)"
            if pushes else "")
    return [["replay steps (DistiLLM)", f"fresh {counts['fresh']}, replayed {counts['replay']}, fixed "
             f"{counts['fixed']} of {len(decided)}{pool}"]]


def _on_policy_row(metrics: list[dict[str, Any]]) -> list[list[str]]:
    """The on-policy curriculum's steps (``on_policy``, :mod:`kdray.train.on_policy`): how many
    trained on the student's samples, their largest staleness, the pool's generation time and
    the live teacher pool's grading time (``teacher_signal: topk``)."""
    marked = [m for m in metrics if "on_policy" in m]
    if not marked:
        return []
    sampled = [m for m in marked if _num(m["on_policy"]) == 1.0]
    stale = max((_num(m.get("staleness")) for m in sampled), default=float("nan"))
    gen = [v for v in (_num(m.get("generate_s")) for m in sampled) if not math.isnan(v)]
    graded = [v for v in (_num(m.get("teacher_score_s")) for m in sampled) if not math.isnan(v)]
    teacher = f", the teacher pool's grading {statistics.fmean(graded):.3f} s" if graded else ""
    return [["on-policy steps (student samples)",
             f"{len(sampled)} of {len(marked)}; largest staleness {_fmt(stale, '.0f')} (pushes); "
             f"the pool's generation {_fmt(sum(gen) / len(gen) if gen else None, '.3f')} s{teacher} per step (mean)"]]


def _series_keys(metrics: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(loss keys, schedule keys) among the numeric per-step keys, in a stable order."""
    keys: dict[str, None] = {}
    for m in metrics:
        for k, v in m.items():
            if k not in _NOT_PLOTTED and not math.isnan(_num(v)):
                keys.setdefault(k, None)
    loss, schedule = [], []
    for k in keys:
        lossy = k in _LOSS_KEYS or k.endswith(("_loss", "kl")) or k.startswith("loss_")
        (loss if lossy else schedule).append(k)
    loss.sort(key=lambda k: (k != "loss", k))

    def first(k: str) -> tuple[int, str]:
        hits = [i for i, p in enumerate(_SCHEDULE_FIRST) if k == p or k.startswith(p + "_")]
        return (hits[0] if hits else len(_SCHEDULE_FIRST), k)

    schedule.sort(key=first)

    def changes(k: str) -> bool:
        return len({v for v in (_num(m.get(k)) for m in metrics) if not math.isnan(v)}) > 1

    return loss, [k for k in schedule if k not in _COUNTERS or changes(k)]


def _wall(report: dict[str, Any]) -> float:
    """Wall time from started/finished, else the sum of the phase timings."""
    wall = _num(report.get("finished")) - _num(report.get("started"))
    timings = _dict(report.get("timings_s"))
    return sum(_num(v) for v in timings.values()) if math.isnan(wall) and timings else wall


def empty_answers_note(mean_lengths: dict[str, float]) -> str:
    """A sentence naming the models whose every held-out answer was empty (mean length 0 by
    label), or ``""``: their scores are 0 because they stop at once, which the table alone
    does not say."""
    empty = [label.replace("_", " ") for label, n in mean_lengths.items() if n == 0]
    if not empty:
        return ""
    return (f"Every held-out answer of {', '.join(empty)} was empty: the model ends its answer at once (its first "
            "token ends the sequence). Its answers are in samples/; a student trained longer, or the prompt "
            "encoding the model was trained for (data.chat_template), may answer.")


def _markdown(report: dict[str, Any], plots: dict[str, str | None]) -> str:
    def plot(name: str, what: str) -> list[str]:
        return ["", f"![{what}]({name})" if plots[name] is None else f"_No {name}: {plots[name]}._"]

    spec = _dict(report.get("spec"))
    name = report.get("name") or spec.get("name") or "?"
    out = [f"# kdray job `{name}`", "", f"- **status:** {report.get('status', 'unknown')}",
           f"- **duration:** {_duration(_wall(report))}"]
    if report.get("error"):
        out.append(f"- **error:** {_cell(report['error'])}")
    if obj := _dict(spec.get("objective")):
        params = ", ".join(f"{k}={v}" for k, v in obj.items() if k != "kind")
        out.append(f"- **objective:** {obj.get('kind', '?')} ({params})")
    out += [f"- **{role}:** `{spec[role].get('model', '?')}`" for role in ("teacher", "student")
            if isinstance(spec.get(role), dict)]
    if report.get("student_dir"):
        out.append(f"- **distilled student:** `{report['student_dir']}`")

    out += ["", "## Held-out evaluation", ""]
    if entries := _evaluation(report):
        out += _table(["model", "ROUGE-L", "exact match", "mean length", "n"],
                      [[label.replace("_", " "), score(s, "rougeL"), score(s, "exact_match"),
                        _fmt(s.get("mean_length"), ".2f"), _fmt(s.get("n"), ".0f")] for label, s in entries])
        out += ["", STDERR_NOTE] if has_stderr(s for _, s in entries) else []
        if differences := paired(report.get("paired_differences")):  # the same prompts: the paired errors
            out += ["", "Differences prompt by prompt, over the same held-out prompts:", ""]
            out += [f"- {line}" for line in differences]
        out += ["", note] if (note := empty_answers_note(
            {label: _num(s.get("mean_length")) for label, s in entries if _num(s.get("n")) > 0})) else []
    else:
        out.append("No evaluation results in report.json (evaluation disabled or not reached).")
    out += plot("evaluation.png", "held-out evaluation per model and round")
    if plots.get("evaluation_rounds.png", "") is None:
        out += plot("evaluation_rounds.png", "held-out evaluation of the student after each round")
    if judge := _dict(report.get("judge")):
        out += _judge_lines(judge)

    out += ["", "## Training", ""]
    if metrics := report["train_metrics"]:
        tps = [v for v in (_num(m.get("tokens_per_s")) for m in metrics) if not math.isnan(v)]
        last = metrics[-1]
        out += _table(["quantity", "value"], [
            ["optimizer steps", f"{_fmt(last.get('step'), '.0f')} of {_fmt(last.get('total_steps'), '.0f')}"],
            ["first loss", _fmt(metrics[0].get("loss"), ".4f")], ["last loss", _fmt(last.get("loss"), ".4f")],
            ["mean tokens/s", _fmt(sum(tps) / len(tps), ".1f") if tps else "—"],
            *_on_policy_row(metrics), *_replay_row(metrics), *_step_time_row(metrics)])
    else:
        out.append("No training metrics in train_metrics.jsonl (training did not log any step).")
    out += plot("loss.png", "loss and its parts per step")
    out += plot("schedule.png", "schedule values per step")

    out += ["", "## Timings", ""]
    if timings := _dict(report.get("timings_s")):
        total = sum(_num(v) for v in timings.values())
        out += _table(["phase", "seconds", "share"], [
            [k, _fmt(v, ".1f"), f"{100 * _num(v) / total:.0f}%" if total > 0 else "—"] for k, v in timings.items()])
    else:
        out.append("No timings in report.json.")

    out += ["", "## Data rows", ""]
    if rows := _dict(report.get("rows")):
        table, reasons = [], []  # bad: {reason: {"count": n, "first_ids": [...]}}
        for split, r in ((k, v) for k, v in rows.items() if isinstance(v, dict)):
            counts = {k: _dict(v).get("count", len(v) if isinstance(v, list) else v)
                      for k, v in _dict(r.get("bad")).items()}
            table.append([split, _fmt(r.get("total"), ".0f"), _fmt(r.get("kept"), ".0f"),
                          _fmt(sum(_num(c) for c in counts.values()), ".0f")])
            reasons += [f"- {split}: {count} {reason}" for reason, count in counts.items()]
        out += _table(["split", "total", "kept", "bad"], table)
        if reasons:
            out += ["", "Bad rows:", *reasons]
    else:
        out.append("No row counts in report.json.")
    out += ["", "The resolved spec and every metric are in `report.json`, the per-step history in "
            "`train_metrics.jsonl`.", ""]
    return "\n".join(out)


def render_report(out_dir: Path) -> list[Path]:
    """Write ``report.md`` and the PNG plots next to ``out_dir/report.json``; return the paths
    written. A plot without data is skipped (a stale copy removed) and report.md says why."""
    out_dir = Path(out_dir)
    report = load_report(out_dir, with_steps=True)
    if out_dir.name == "report.json":
        out_dir = out_dir.parent
    title, metrics, entries = str(report.get("name") or "job"), report["train_metrics"], _evaluation(report)
    loss_keys, schedule_keys = _series_keys(metrics)
    plots: dict[str, str | None] = {
        "loss.png": None if loss_keys else "no per-step training metrics in train_metrics.jsonl",
        "schedule.png": None if schedule_keys else "no per-step schedule values in train_metrics.jsonl",
        "evaluation.png": None if entries else "no evaluation results in report.json",
        "evaluation_rounds.png": None if (rounds := _rounds(entries)) else "no per-round evaluation in report.json",
    }
    draw = {"loss.png": lambda p: plot_loss(metrics, loss_keys, p, title),
            "schedule.png": lambda p: plot_schedule(metrics, schedule_keys, p, title),
            "evaluation.png": lambda p: plot_evaluation(entries, p, title),
            "evaluation_rounds.png": lambda p: plot_evaluation_rounds(rounds, dict(entries), p, title,
                                                                      _round_unit(report))}
    written = [draw[name](out_dir / name) for name, reason in plots.items() if reason is None]
    for name in (n for n, reason in plots.items() if reason is not None):
        (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier render would mislead
    md = _write_atomic(out_dir / "report.md", _markdown(report, plots).encode("utf-8"))
    return [md, *written]


def _change(before: dict[str, Any], after: dict[str, Any], key: str, paired: Any = None) -> str:
    """``before → after (+change)``; the change with its standard error where the report holds
    the paired difference (``paired``: its ``student_after - student_before``)."""
    b, a = _num(before.get(key)), _num(after.get(key))
    change = score(paired, key, "+.3f") if key in _dict(paired) else f"{a - b:+.3f}"
    return f"{_fmt(b)} → {_fmt(a)}" + (f" ({change})" if not math.isnan(a - b) else "")


def compare_reports(dirs: list[Path], out: Path | None = None) -> tuple[str, list[Path]]:
    """A markdown table with one row per job (in the given order) and ``out/compare.png``."""
    if not dirs:
        raise KdrayError("compare needs at least one job directory")
    reports = [load_report(Path(d)) for d in dirs]
    names = [str(r.get("name") or Path(d).name) for r, d in zip(reports, dirs)]
    labels = [n if names.count(n) == 1 else f"{n} ({Path(d).resolve().name})" for n, d in zip(names, dirs)]
    rows = []
    for label, report in zip(labels, reports):
        spec, ev = _dict(report.get("spec")), dict(_evaluation(report))
        before, after, teacher = ev.get("student_before", {}), ev.get("student_after", {}), ev.get("teacher", {})
        kind = _dict(spec.get("objective")).get("kind", "?")
        if curriculum := _dict(spec.get("curriculum")).get("kind"):
            kind += f" + {curriculum}"
        models = " → ".join(str(_dict(spec.get(r)).get("model", "?")) for r in ("teacher", "student"))
        steps = _fmt(last_step(report), ".0f")
        paired = _dict(report.get("paired_differences")).get("student_after - student_before")
        rows.append([label, kind, models, _change(before, after, "rougeL", paired),
                     _change(before, after, "exact_match", paired),
                     f"{_fmt(teacher.get('rougeL'))} / {_fmt(teacher.get('exact_match'))}",
                     steps, _duration(_wall(report))])
    header = ["job", "objective", "teacher → student", "ROUGE-L before → after", "EM before → after",
              "teacher ROUGE-L / EM", "steps", "wall time"]
    table = "\n".join(_table(header, rows, right_from=3)) + "\n"
    heldout = {label: (str(_dict(_dict(r.get("spec")).get("data")).get("heldout") or "—"),
                       _fmt(dict(_evaluation(r)).get("student_after", {}).get("n"), ".0f"))
               for label, r in zip(labels, reports) if _evaluation(r)}
    if len(set(heldout.values())) > 1:  # scores over other prompts differ by more than the models
        table += ("\nThe jobs were scored on different held-out sets, so their scores are not comparable: "
                  + "; ".join(f"{label}: {source} ({n} prompts)" for label, (source, n) in heldout.items()) + ".\n")
    out_dir = Path(out) if out is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_compare(labels, [dict(_evaluation(r)) for r in reports], out_dir / "compare.png")
    return table, [png]


def cmd_report(args: argparse.Namespace) -> int:
    for path in render_report(Path(args.dir)):
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    table, paths = compare_reports([Path(d) for d in args.dirs], Path(args.out) if args.out else None)
    sys.stdout.write(table)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="(re-)render report.md and PNG plots from a job's report.json")
    p.add_argument("dir", help="job output directory (holds report.json)")
    p.set_defaults(fn=cmd_report)

    p = subparsers.add_parser("compare", help="put several jobs side by side: a markdown table and compare.png")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="job output directories, in table order")
    p.add_argument("--out", default=None, help="directory for compare.png (default: current directory)")
    p.set_defaults(fn=cmd_compare)
