"""Driver pieces that need no cluster: POCL's ranks file as people read it, the progress bars."""

from __future__ import annotations

import time
import numpy as np
import pyarrow.parquet as pq

from kdray.curriculum import difficulty_ranks
from kdray.data.difficulty import write_difficulty


def test_the_ranks_file_lists_every_row_easiest_first_with_its_measurements(tmp_path):
    keys = np.asarray(["a#0", "b#0", "c#0"], dtype=object)
    ranks = difficulty_ranks([0.1, 0.5, 0.9], [3.0, 2.0, 1.0])
    path = tmp_path / "curriculum" / "difficulty.parquet"
    write_difficulty(path, keys, ranks, "toy:student")
    rows = pq.read_table(path).to_pylist()
    assert [r["key"] for r in rows] == ["c#0", "b#0", "a#0"]
    assert [r["position"] for r in rows] == [0, 1, 2]
    assert rows[0]["rouge_l"] == 0.9 and rows[0]["ce"] == 1.0 and rows[0]["student"] == "toy:student"
    assert rows[0]["rrf"] == 1 / 61 + 1 / 61
    assert not list(path.parent.glob(".*.tmp"))  # written under another name, then renamed


def test_the_progress_bars_keep_their_counts_whole_on_an_80_column_log():
    """Redirected to a file, rich draws 80 columns: a long phase description wraps instead of
    cutting the counts and times to ``32…`` and ``0:0…``."""
    import io

    from rich.console import Console

    from kdray.pipeline.progress import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(None, console=Console(file=out, width=80))
    reporter.phase_start("evaluate", 7200, "held-out answers, student after stage 1/2 of the curriculum")
    reporter.advance("evaluate", 7200)
    reporter.phase_end("evaluate", "held-out answers, student after stage 1/2 of the curriculum done in 85s")
    reporter.close()
    text = out.getvalue()
    assert "7200/7200" in text and "0:00:" in text and "…" not in text
    assert "curriculum done in 85s" in " ".join(text.split())


def test_kdray_watch_shows_a_phase_that_ended_before_it_began_with_the_time_it_took():
    """``kdray watch`` replays a job's stored events: each at its own time, so a phase that
    took 100 s before the watch began shows 0:01:40, not the instant its replay took."""
    import io

    from rich.console import Console

    from kdray.pipeline.progress import ConsoleReporter, EventClock
    from kdray.service.client import replay

    out, clock = io.StringIO(), EventClock()
    reporter = ConsoleReporter(None, console=Console(file=out, width=100), clock=clock)
    t0 = time.time() - 1000
    for event in [{"kind": "phase_start", "phase": "generate", "total": 4, "time": t0},
                  {"kind": "advance", "phase": "generate", "n": 4, "time": t0 + 60},
                  {"kind": "phase_end", "phase": "generate", "detail": "done", "time": t0 + 100},
                  {"kind": "phase_start", "phase": "train", "total": 9, "time": t0 + 100}]:
        replay(reporter, clock, event)
    assert clock.at is None  # the live clock again, for the phase still running
    reporter.close()
    lines = out.getvalue().splitlines()
    assert "0:01:40" in next(line for line in lines if "generate" in line), lines
    assert "0:15:00" in next(line for line in lines if "train" in line), lines  # running for 900 s


def test_a_training_stall_is_said_once_per_stall_with_the_free_resources():
    """A restarted worker group that cannot be placed, or whose reads have no CPU, waits with
    no end: the driver says so once STALL_WARN_S passed without a step (FIRST_STEP_WARN_S
    before the first: loading big models takes long), and again only after the next step
    starts another stall; the cluster's free resources when they can be read."""
    from kdray.stages.train import FIRST_STEP_WARN_S, STALL_WARN_S, StallWatch

    now, said, free = [0.0], [], ["0 of 2 CPUs"]

    def read_free() -> str:
        if isinstance(free[0], Exception):
            raise free[0]
        return free[0]

    watch = StallWatch(said.append, lambda: now[0], read_free)
    now[0] = FIRST_STEP_WARN_S - 1
    watch.check()
    assert said == []
    now[0] = FIRST_STEP_WARN_S
    watch.check()
    watch.check()
    assert said == ["train: no training step yet after 30 min; the workers may still be loading the models or "
                    "restoring a checkpoint, or wait for resources (the cluster has 0 of 2 CPUs free; `ray status` "
                    "shows what waits)"]
    watch.seen({"step": 7, "loss": 1.0})
    now[0] += STALL_WARN_S - 1
    watch.check()
    assert len(said) == 1
    free[0] = ConnectionError("GCS busy")
    now[0] += 1
    watch.check()
    assert len(said) == 2 and said[1].startswith("train: no training step for 10 min since step 7; the workers may "
                                                 "be saving a checkpoint")
    assert "the cluster's free resources are unknown: ConnectionError: GCS busy" in said[1]


def test_a_message_is_printed_as_written_brackets_and_all():
    """A message holds paths and errors' text, as gloo's ``[/path/pair.cc:553]``: rich markup
    would take it for a closing tag and end the driver (seen when a worker was killed)."""
    import io

    from rich.console import Console

    from kdray.pipeline.progress import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(None, console=Console(file=out, width=200))
    text = "train: the worker group failed (rank 1: RuntimeError: [/gloo/pair.cc:553] Connection closed [bold]x)"
    reporter.message(text)
    reporter.close()
    assert text in out.getvalue()
