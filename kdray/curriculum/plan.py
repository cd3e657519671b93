"""The training plan of a job: a list of segments, each one Ray Train run.

A segment trains on one fixed set of rows with fixed schedule values, continuing from the
previous segment's DeepSpeed state (model, optimizer, LR schedule, DistiLLM-2 running means):

* plain training: one segment over all rows for ``training.epochs`` epochs;
* DistiLLM-2 rounds: one segment per round; the student's responses are regenerated before
  each (``regenerate_student``) with the student the previous segment exported;
* POCL: one segment per stage, on the easiest ``i/n_stages`` of the rows (the first
  ``n_rows`` of the easy → hard order), with that stage's KD temperature and ``kd_ratio``.
  With DistiLLM-2 as well, each stage is also a round.

The optimizer-step counter and the LR schedule run across segments (one cosine over the
whole job) unless POCL's ``restart_optimizer_each_stage`` asks for a fresh optimizer and
schedule per stage. ``training.max_steps`` cuts the plan short. Pure: this module needs
only the spec, so the plan can be printed (and tested) before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kdray.errors import KdrayError
from kdray.spec import JobSpec


@dataclass(frozen=True)
class Segment:
    """One Ray Train run of the plan."""

    index: int                  # 0-based position in the plan
    round: int                  # 0-based DistiLLM-2 round (equals index when rounds exist)
    stage: int | None           # 1-based POCL stage, None without POCL
    n_rows: int                 # rows trained on: all, or the easiest n for a POCL stage
    steps_per_epoch: int        # optimizer steps per pass over those rows
    start_step: int             # optimizer steps of the job done before this segment
    steps: int                  # optimizer steps in this segment
    kd_temperature: float
    kd_ratio: float
    regenerate_student: bool    # regenerate the student's responses before training
    restart_optimizer: bool     # fresh optimizer and LR schedule (POCL per-stage restart)

    @property
    def end_step(self) -> int:
        """The job's optimizer step this segment ends at (exclusive of the next segment's)."""
        return self.start_step + self.steps

    @property
    def epochs(self) -> int:
        """Passes over the rows needed for ``steps`` (the last one may stop early)."""
        return math.ceil(self.steps / self.steps_per_epoch)

    def label(self, plan_length: int) -> str:
        """``"stage i/n"``, ``"round i/n"`` or ``""`` (a one-segment plan), for progress lines."""
        if self.stage is not None:
            return f"stage {self.stage}/{plan_length}"
        return f"round {self.round + 1}/{plan_length}" if plan_length > 1 else ""

    def as_dict(self) -> dict[str, Any]:
        """The segment as JSON types (report.json's ``plan``)."""
        return asdict(self)


def _steps_per_epoch(spec: JobSpec, n_rows: int, what: str) -> int:
    gb = spec.training.global_batch_size
    if n_rows < gb:
        raise KdrayError(
            f"{what} has {n_rows} training rows, fewer than training.global_batch_size ({gb}); "
            "lower training.global_batch_size or add data (data.max_train_samples)"
        )
    return n_rows // gb


def plan_segments(spec: JobSpec, n_rows: int) -> list[Segment]:
    """The segments of ``spec`` over ``n_rows`` training rows (see the module docstring)."""
    from kdray.curriculum import POCLScheduler, pocl_stage_size

    pocl = spec.curriculum_of("pocl")
    d2 = spec.curriculum_of("distillm2")
    obj = spec.objective
    raw: list[dict[str, Any]] = []
    if pocl is not None:
        schedule = POCLScheduler(n_stages=pocl.n_stages, stage_interval=pocl.stage_interval,
                                 interval_unit=pocl.interval_unit, t_start=pocl.t_start,
                                 t_end=pocl.t_end, kd_ratio_start=pocl.kd_ratio_start,
                                 kd_ratio_end=pocl.kd_ratio_end, order=list(range(n_rows)))
        for stage in range(1, pocl.n_stages + 1):
            n = pocl_stage_size(stage, pocl.n_stages, n_rows)
            spe = _steps_per_epoch(spec, n, f"POCL stage {stage} (the easiest {n} of {n_rows})")
            steps = pocl.stage_interval * (spe if pocl.interval_unit == "epochs" else 1)
            raw.append(dict(round=stage - 1, stage=stage, n_rows=n, steps_per_epoch=spe, steps=steps,
                            kd_temperature=schedule.temperature, kd_ratio=schedule.kd_ratio,
                            regenerate_student=d2 is not None,
                            restart_optimizer=pocl.restart_optimizer_each_stage))
            for _ in range(pocl.stage_interval):  # walk the state machine to the next stage
                schedule.end_epoch() if pocl.interval_unit == "epochs" else schedule.step()
    else:
        rounds = d2.rounds if d2 is not None else 1
        spe = _steps_per_epoch(spec, n_rows, "the training set")
        for r in range(rounds):
            raw.append(dict(round=r, stage=None, n_rows=n_rows, steps_per_epoch=spe,
                            steps=spe * spec.training.epochs, kd_temperature=obj.kd_temperature,
                            kd_ratio=obj.kd_ratio, regenerate_student=d2 is not None,
                            restart_optimizer=False))
    segments: list[Segment] = []
    done = 0
    budget = spec.training.max_steps
    for i, seg in enumerate(raw):
        steps = seg.pop("steps")
        if budget is not None:
            steps = min(steps, budget - done)
        if steps <= 0:
            break
        segments.append(Segment(index=i, start_step=done, steps=steps, **seg))
        done += steps
    return segments


def total_steps(segments: list[Segment]) -> int:
    """Optimizer steps of the whole plan (the LR schedule's length)."""
    return segments[-1].end_step if segments else 0
