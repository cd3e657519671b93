"""A job's per-step training metrics, kept on disk: ``train_metrics.jsonl`` in its output directory.

One JSON object per optimizer step, in step order: ``step``, ``loss`` and its parts, ``lr`` and
the other schedule values, ``tokens_per_s``, the step's time parts (:class:`kdray.train.step.StepClock`).
Steps trained again after a restore from a checkpoint replace the lost ones, so the file always
reads as the job's one history.

The driver writes it as the steps arrive (:class:`StepLog`) and keeps only an index of it in
memory, 16 bytes a step. ``report.json`` names the file (``train_metrics_file``) and sums it up
(``train_summary``); :func:`read_train_metrics` reads it back, or the ``train_metrics`` list
that report.json held itself before 2026-12-06.

Measured with tracemalloc for 120,000 steps of a toy job's 22 fields (2026-12-06): the driver held
301 MiB while they arrived as a list of dicts and peaked at 898 MiB writing them into report.json
(92 MB); with this file it holds 1.9 MiB throughout. Reading them back for the plots peaked at
547 MiB from the old report.json and at 159 MiB from this file (75 MB), whose reader shares the
key strings between steps.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError
from kdray.pipeline.progress import finite
from kdray.report.plots import _num

#: The file's name in the job's output directory.
TRAIN_METRICS_FILE = "train_metrics.jsonl"


def _step_of(event: dict[str, Any]) -> int | None:
    """An event's optimizer step; None where it has none (no ``step``, a bool, a fraction, NaN)."""
    step = event.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step != int(step):
        return None
    return int(step)


def iter_steps(path: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The steps of a ``train_metrics.jsonl`` from byte ``offset`` on, a line at a time; a line
    cut short (a driver killed while writing it) is skipped. The key strings are shared between
    the steps (a 120,000-step history in memory takes about a third less)."""
    keys: dict[str, str] = {}
    try:
        lines = path.open("rb")
    except FileNotFoundError:
        return
    with lines:
        lines.seek(offset)
        for line in lines:
            try:
                step = json.loads(line)
            except ValueError:  # UnicodeDecodeError too
                continue
            if isinstance(step, dict):
                yield {keys.setdefault(k, k): v for k, v in step.items()}


def read_train_metrics(job_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step's metrics of the job in ``job_dir`` whose report.json is ``report``, in step
    order: the list a report.json written before 2026-12-06 held itself, else its
    ``train_metrics_file``; empty when neither is there.

    Raises:
        KdrayError: the file is missing, or holds other steps than the report counts (its
            ``train_summary``): a later run of the job is writing it.
    """
    held = report.get("train_metrics")
    if isinstance(held, list):
        return [m for m in held if isinstance(m, dict)]
    name = report.get("train_metrics_file")
    if not isinstance(name, str) or not name:
        return []
    path, counted = Path(job_dir) / name, (report.get("train_summary") or {}).get("steps")
    if not path.is_file():
        raise KdrayError(f"{path} is missing: the per-step metrics of the report beside it are kept there (copy "
                         "it with report.json), or run the job again: kdray run SPEC")
    steps = list(iter_steps(path))
    if isinstance(counted, int) and counted != len(steps):
        raise KdrayError(f"{path} holds {len(steps)} steps where report.json counts {counted}: a later run of the "
                         "job (a resume, or kdray run --restart) is writing it; its report comes when it ends")
    return steps


def last_step(report: dict[str, Any]) -> int | None:
    """The last step a job's report.json records (its ``train_summary``, or the last entry of
    an older report's ``train_metrics``), without reading the steps; None when it has none."""
    summary, held = report.get("train_summary"), report.get("train_metrics")
    if isinstance(summary, dict):
        return summary.get("last_step")
    return held[-1].get("step") if isinstance(held, list) and held and isinstance(held[-1], dict) else None


class StepLog:
    """The driver's writer of ``train_metrics.jsonl``: appends each step as it arrives, and
    holds only the steps' numbers and where their lines end in the file.

    Args:
        path: the file (``OUT/train_metrics.jsonl``); nothing is written before :meth:`start`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._steps = array("q")  # each line's step, non-decreasing
        self._ends = array("q")  # the byte offset where each line ends
        self._start = 0  # where the first line begins

    def start(self) -> None:
        """Begin an empty history (an earlier run's file is removed)."""
        self.path.unlink(missing_ok=True)
        self.path.touch()
        del self._steps[:], self._ends[:]

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, step: object) -> bool:
        if (step := _step_of({"step": step})) is None:
            return False
        i = bisect_left(self._steps, step)
        return i < len(self._steps) and self._steps[i] == step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter_steps(self.path, self._start)  # its own lines: not what the file held before

    @property
    def last_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def add(self, event: dict[str, Any]) -> None:
        """Append a step's metrics. A step that is not past the last one (a restore from a
        checkpoint) first drops the lines from that step on; an event without a step is
        appended, indexed under the step before it."""
        step = _step_of(event)
        if step is not None and self._steps and self._steps[-1] >= step:
            keep = bisect_left(self._steps, step)
            os.truncate(self.path, self._ends[keep - 1] if keep else self._start)
            del self._steps[keep:], self._ends[keep:]
        line = (json.dumps(finite(event), allow_nan=False, default=str) + "\n").encode("utf-8")
        with self.path.open("ab") as fh:  # flushed at close: a reader sees whole steps
            if not self._steps:
                self._start = fh.tell()
            fh.write(line)
            self._ends.append(fh.tell())
        self._steps.append(step if step is not None else (self._steps[-1] if self._steps else 0))

    def add_missing(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add the steps among ``events`` that the history lacks; return them in step order.
        Steps past the last are appended; one that falls inside the history (rare: a gap left
        by a killed driver) rewrites the file in step order."""
        def order(event: dict[str, Any]) -> int:
            return _step_of(event) or 0

        new = sorted((e for e in events if _step_of(e) is not None and e["step"] not in self), key=order)
        if new and self._steps and order(new[0]) < self._steps[-1]:
            merged = sorted([*self, *new], key=order)
            self.start()
            for event in merged:
                self.add(event)
        else:
            for event in new:
                self.add(event)
        return new

    def summary(self) -> dict[str, Any]:
        """report.json's ``train_summary``: the number of steps recorded, the last step, and the
        first and last step that carry a finite loss (``{"step", "loss"}``, or None), in one
        pass over the file."""
        first = last = None
        for m in self:
            if math.isfinite(_num(m.get("loss"))):
                first = first or {"step": m.get("step"), "loss": m["loss"]}
                last = {"step": m.get("step"), "loss": m["loss"]}
        return {"steps": len(self), "last_step": self.last_step, "first_loss": first, "last_loss": last}
