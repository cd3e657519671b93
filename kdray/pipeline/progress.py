"""Progress of a job: phases, counts and training metrics, as durable events.

The driver tells a :class:`Reporter` what happens (a phase starts, advances, ends; a training
step's metrics arrive). Every event is appended to ``events.jsonl`` in the job's output
directory, so anything that reads the job later (the CLI, the service) sees the same history.
:class:`ConsoleReporter` also draws one progress bar per phase.

Training metrics reach the reporter from the Ray Train workers through the train stage
(:mod:`kdray.stages.train`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, an infinity) made None, through
    dicts and lists: what strict JSON can hold (Python writes a NaN as ``NaN``, which JSON
    readers, ijson and JavaScript's among them, refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


#: The last event of a job that failed, in its ``events.jsonl``: ``{"kind": "job_failed", "error": ...}``
#: (:meth:`Reporter.failed`; ``kdray report`` and ``compare`` read it).
FAILED_EVENT = "job_failed"
#: The last event of a job stopped before it finished (Ctrl-C; SIGTERM: the service's cancel,
#: ``ray job stop``): ``{"kind": "job_stopped"}`` (:meth:`Reporter.stopped`).
STOPPED_EVENT = "job_stopped"


class Reporter:
    """Records job events to ``events_path`` (JSON lines, appended and flushed per event)."""

    def __init__(self, events_path: Path | None = None):
        self.events_path = events_path
        self._lock = threading.Lock()
        #: Called with every event too (``kdray run --store``: the service's job store).
        self.sinks: list[Any] = []

    def emit(self, kind: str, **fields: Any) -> None:
        event = {"time": time.time(), "kind": kind, **{k: finite(v) for k, v in fields.items()}}
        with self._lock:
            if self.events_path is not None:
                with self.events_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(event) + "\n")
            for sink in self.sinks:
                sink(event)

    def phase_start(self, phase: str, total: int | None = None, detail: str = "") -> None:
        self.emit("phase_start", phase=phase, total=total, detail=detail)

    def advance(self, phase: str, n: int = 1) -> None:
        self.emit("advance", phase=phase, n=n)

    def phase_end(self, phase: str, detail: str = "") -> None:
        self.emit("phase_end", phase=phase, detail=detail)

    def train_metrics(self, metrics: dict[str, Any]) -> None:
        self.emit("train_step", **metrics)

    def message(self, text: str) -> None:
        self.emit("message", text=text)

    def failed(self, error: str) -> None:
        self.emit(FAILED_EVENT, error=error)

    def stopped(self) -> None:
        self.emit(STOPPED_EVENT)

    def close(self) -> None:
        pass


class EventClock:
    """Wall-clock seconds for the progress bars, or, while :attr:`at` is set, the time of the
    event being replayed (``kdray watch``): a phase that ended before the watch began shows the
    time it took, not the moments its replay took."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


class ConsoleReporter(Reporter):
    """A :class:`Reporter` that also shows one rich progress bar per phase; its times are read
    from ``clock`` (seconds; default: the monotonic clock)."""

    def __init__(self, events_path: Path | None = None, console: Any = None, clock: Any = None):
        super().__init__(events_path)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column

        self.console = console or Console(stderr=True)
        whole = Column(no_wrap=True)  # on a narrow console (80 columns: a log file) the description wraps
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<9}", table_column=whole),
            BarColumn(),
            MofNCompleteColumn(table_column=whole),
            TimeElapsedColumn(table_column=whole),
            TextColumn("{task.description}", table_column=Column(ratio=1, overflow="fold")),
            console=self.console,
            get_time=clock,
        )
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def phase_start(self, phase: str, total: int | None = None, detail: str = "") -> None:
        super().phase_start(phase, total, detail)
        self.tasks[phase] = self.progress.add_task(detail, total=total, phase=phase)

    def advance(self, phase: str, n: int = 1) -> None:
        super().advance(phase, n)
        if phase in self.tasks:
            self.progress.advance(self.tasks[phase], n)

    def phase_end(self, phase: str, detail: str = "") -> None:
        super().phase_end(phase, detail)
        task = self.tasks.get(phase)
        if task is not None:
            total = self.progress.tasks[task].total
            self.progress.update(task, completed=total if total is not None else 1,
                                 total=total if total is not None else 1, description=detail)
            self.progress.stop_task(task)  # its time: from its start to its end, not to its last count
            self.progress.tasks[task].finished_time = self.progress.tasks[task].elapsed

    def train_metrics(self, metrics: dict[str, Any]) -> None:
        super().train_metrics(metrics)
        task = self.tasks.get("train")
        if task is not None and "step" in metrics:
            desc = f"loss {metrics.get('loss', float('nan')):.4f}" if "loss" in metrics else ""
            self.progress.update(task, completed=metrics["step"], description=desc)

    def message(self, text: str) -> None:
        super().message(text)
        self.progress.console.print(text, markup=False)  # a path or an error's text may hold [...]

    def close(self) -> None:
        self.progress.stop()
