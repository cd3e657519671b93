"""The Markdown pieces of kdray's report files (report.md, ``kdray compare``'s table, the model
cards): table cells and rows, numbers, durations, and held-out scores with their standard errors."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kdray.data.text_scores import STDERR_SCORES
from kdray.report.plots import _num

#: What a score's ``±`` means, said under each table that shows one.
STDERR_NOTE = ("± is the standard error of the mean over the held-out prompts (as lm-evaluation-harness "
               "reports it): two scores less than about three of it apart are not told apart (the 95% bound "
               "of a difference of two independent means: 1.96 √2 ≈ 2.8 standard errors); the differences "
               "prompt by prompt, where shown, are the sharper test. More prompts (data.heldout) narrow both "
               "as one over their square root.")


def cell(value: Any) -> str:
    """``value`` as one table cell: a ``|`` escaped, a newline made a space."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: Iterable[list[Any]], right_from: int = 1) -> list[str]:
    """A Markdown table's lines; the columns from ``right_from`` on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number in ``spec``; ``—`` for anything that is not one (None, NaN, a string, a bool)."""
    return "—" if math.isnan(v := _num(value)) else format(v, spec)


def score(scores: dict[str, Any], key: str, spec: str = ".3f") -> str:
    """A held-out score with its standard error where the report holds one (``KEY_stderr``,
    :func:`kdray.data.text_scores.stderr_of_mean`): ``0.484 ± 0.031``."""
    stderr = _num(scores.get(f"{key}_stderr"))
    return fmt(scores.get(key), spec) + ("" if math.isnan(stderr) else f" ± {format(stderr, spec.lstrip('+'))}")


def has_stderr(entries: Iterable[dict[str, Any]]) -> bool:
    """Whether any of these score dicts holds a standard error (then :data:`STDERR_NOTE` goes under its table)."""
    return any(not math.isnan(_num(s.get(f"{key}_stderr"))) for s in entries for key in STDERR_SCORES)


def paired(differences: Any) -> list[str]:
    """One sentence per entry of report.json's ``paired_differences`` (``{"A - B": {"rougeL",
    "rougeL_stderr", "exact_match", ...}}``, :func:`kdray.stages.evaluate.paired_scores`):
    ``student after − student before: ROUGE-L +0.119 ± 0.015, exact match +0.065 ± 0.018 (400
    prompts)``."""
    out = []
    for pair, d in (differences.items() if isinstance(differences, dict) else ()):
        if isinstance(d, dict):
            a, _, b = (name.replace("_", " ") for name in pair.partition(" - "))
            out.append(f"{a} − {b}: ROUGE-L {score(d, 'rougeL', '+.3f')}, exact match "
                       f"{score(d, 'exact_match', '+.3f')} ({fmt(d.get('n'), '.0f')} prompts)")
    return out


def duration(seconds: Any) -> str:
    """Seconds as ``1h 02m 03s``, ``2m 15s`` or ``4.5s``; ``—`` for no number."""
    if math.isnan(s := _num(seconds)):
        return "—"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s" if minutes else f"{s:.1f}s"
