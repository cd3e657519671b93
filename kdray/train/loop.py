"""The one local training loop: a job's optimizer steps in this process, without Ray or DeepSpeed.

:class:`LocalLoop` runs exactly the objective a Ray Train worker runs
(:func:`kdray.train.objectives.make_step_objective`) with the same optimizer and LR schedule
(:func:`kdray.train.setup.make_optimizer`) and the same gradient clipping, and reports the same
metrics, through the same step (:func:`kdray.train.step.accumulate_step`: every micro-batch's
loss is normalised by the whole step's items, so the gradients simply add up). What the worker
gets from DeepSpeed, it does by hand: the gradient norm is taken before clipping (as
``engine.get_global_grad_norm()``), then clipping and the optimizer update. Given the same micro-batches a
step's loss and gradient norm equal the worker's (``tests/test_train_parity.py``).

Its users: ``kdray bench train`` (the bare loop a job's throughput is compared with) and
``kdray repro`` (every method × seed in one Ray task each).
"""

from __future__ import annotations

import math
from typing import Any

from kdray.curriculum.plan import Segment
from kdray.spec import JobSpec
from kdray.train.objectives import make_step_objective
from kdray.train.setup import make_optimizer
from kdray.train.step import StepClock, accumulate_step, step_metrics


class LocalLoop:
    """Train ``student`` segment by segment, one optimizer step per call to :meth:`step`.

    Args:
        spec: the job.
        student: the model to train (``torch.nn.Module``, in train mode).
        teacher: what the objective needs of the teacher (:func:`kdray.train.teacher.load_teacher`).
        total_steps: optimizer steps of the whole plan (the LR schedule's length).
        num_segments: segments in the plan (DistiLLM-2's rounds).
    """

    def __init__(self, spec: JobSpec, student: Any, teacher: Any, *, total_steps: int, num_segments: int):
        self.spec, self.student, self.teacher = spec, student, teacher
        self.total_steps, self.num_segments = total_steps, num_segments
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.objective: Any = None
        self.segment: Segment | None = None
        self.state: dict[str, Any] | None = None  # the objective's schedule, carried between segments
        self.global_step = 0
        #: Where each step's time goes (:class:`~kdray.train.step.StepClock`); a caller may time
        #: its data into ``data_wait`` before :meth:`step`, which returns the parts and resets them.
        self.clock = StepClock()

    def begin_segment(self, segment: Segment) -> None:
        """Start ``segment``: a new optimizer on the first segment or when the segment restarts
        it (POCL's separate runs); the objective continues the previous segment's schedule."""
        if self.optimizer is None or segment.restart_optimizer:
            self.optimizer, self.scheduler = make_optimizer(self.spec, self.student, total_steps=self.total_steps,
                                                            segment=segment)
        self.objective = make_step_objective(self.spec, segment, total_steps=self.total_steps,
                                             num_segments=self.num_segments, state=self.state)
        self.segment = segment
        self.global_step = segment.start_step

    def step(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` (the batch keys of the segment's objective,
        as :class:`kdray.data.examples.TokenizeForTraining` makes them, as torch tensors).

        Returns:
            ``step`` (the job's optimizer step, from 1), ``loss`` and the objective's parts (the
            step's objective, whatever the split into micro-batches), ``tokens`` (label tokens),
            ``lr`` (the rate this step applied), ``grad_norm`` (before clipping), the
            objective's schedule values and where the step's time went (``forward_s``,
            ``backward_s``, ``optimizer_s``, and ``data_wait_s`` as the caller timed it).
        """
        import torch

        if self.objective is None:
            raise RuntimeError("LocalLoop.step before begin_segment")
        clock = self.clock

        def backward(loss: Any) -> None:
            with clock.timing("backward"):
                loss.backward()

        sums = accumulate_step(self.objective, self.student, self.teacher, micro_batches, backward, clock)
        with clock.timing("optimizer"):
            clip = self.spec.training.gradient_clipping or math.inf
            params = [p for p in self.student.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            lr = float(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        schedule = self.objective.metrics()  # the values this step used
        self.objective.optimizer_step()
        self.global_step += 1
        seg = self.segment
        return {"step": self.global_step, **step_metrics(sums), "lr": lr,
                "grad_norm": grad_norm, "round": seg.round,
                **({"stage": seg.stage} if seg.stage is not None else {}), **schedule, **clock.take()}

    def end_segment(self) -> None:
        """Keep the objective's schedule state for the next segment."""
        self.state = self.objective.state_dict()
