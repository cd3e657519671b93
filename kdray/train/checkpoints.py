"""A training worker's checkpoints: what every rank saves (its ZeRO partition, its schedule
state; rank 0 the progress and, at a segment's end, the exported student), how a run resumes
from them, and the reports to Ray Train that carry them with the steps' metrics.

A checkpoint directory (Ray Train merges the ranks' directories into one):
``deepspeed/<tag>/`` (DeepSpeed's ``save_checkpoint``), ``schedule-rank<r>.json`` (each rank's
objective schedule and replay buffer), ``progress.json`` (step, epoch, micro-batch in the epoch,
segment, the steps' metrics since the previous checkpoint, the DeepSpeed tag) and, at a
segment's end, ``student/`` (an HF checkpoint for the next round's pool and for evaluation).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from kdray.errors import KdrayError
from kdray.models import load_tokenizer
from kdray.train.setup import save_student

if TYPE_CHECKING:
    from kdray.train.worker import WorkerConfig

#: Rank 0's journal of every step's metrics, one JSON line a step, in its Ray Train run's
#: directory. A driver killed before it recorded some steps recovers them from here however far
#: its workers got before they died: the checkpoints carry only the steps since the one before,
#: and Ray Train keeps only the last few.
STEPS_JOURNAL = "steps.jsonl"


def read_steps_journal(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The steps of ``run_dir``'s journal (:data:`STEPS_JOURNAL`), read a line at a time in the
    order written (a step trained again after a restore comes again); none when there is no
    journal. A line cut short by a kill is skipped."""
    try:
        fh = open(run_dir / STEPS_JOURNAL, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return
    with fh:
        for line in fh:
            try:
                step = json.loads(line)
            except ValueError:
                continue
            if isinstance(step, dict) and "step" in step:
                yield step


def load_state(engine: Any, root: Path, rank: int, *, module_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint directory written by this module: (progress, this rank's schedule state)."""
    progress = json.loads((root / "progress.json").read_text())
    engine.load_checkpoint(str(root / "deepspeed"), tag=progress["tag"], load_module_only=module_only,
                           load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
    schedule = root / f"schedule-rank{rank}.json"
    return progress, json.loads(schedule.read_text()) if schedule.exists() else {}


def final_steps(unreported: list[dict[str, Any]], last: dict[str, Any], restored: list[dict[str, Any]],
                marker: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps the segment's final report carries: those not reported yet; else the last step
    trained, once more; else, for a run that trained none (Ray Train restarted the worker group
    from the segment's final checkpoint, after its final report), that checkpoint's own last
    step, as it was trained. A step sent once more is marked ``resent``: the driver records it
    only if it never got it (:meth:`kdray.pipeline.job.Job._record_metrics`), so a resumed job's
    history holds each step once. Only a segment that never trains a step sends the bare
    ``marker`` (step, total_steps, round): a marker must not stand in for a trained step's
    metrics, which the driver's history (and the trackers) would then lose."""
    if unreported:
        return unreported
    if last:
        return [{**last, "resent": True}]
    if restored and restored[-1].get("step") == marker["step"]:
        return [{**restored[-1], "resent": True}]
    return [marker]


def restore(engine: Any, wc: WorkerConfig, checkpoint: Any,
             rank: int) -> tuple[int, int, int, dict[str, Any], list[dict[str, Any]]]:
    """Where this run starts: (step, epoch, micro-batches to skip, schedule state, the metrics
    of the steps the restored Ray Train checkpoint carries).

    A checkpoint from Ray Train (a restarted worker group) resumes mid-segment with the
    optimizer; otherwise the previous segment's final state starts this one (weights only
    when the segment restarts the optimizer); otherwise training starts fresh.
    """
    seg = wc.segment
    if checkpoint is not None:
        with checkpoint.as_directory() as root:
            progress, state = load_state(engine, Path(root), rank)
        return progress["step"], progress["epoch"], progress["micro_in_epoch"], state, progress.get("metrics", [])
    if wc.init_checkpoint is not None:
        progress, state = load_state(engine, Path(wc.init_checkpoint), rank, module_only=seg.restart_optimizer)
        if progress["step"] != seg.start_step:
            raise KdrayError(f"segment {seg.index} starts at step {seg.start_step}, but its initial checkpoint "
                             f"{wc.init_checkpoint} is at step {progress['step']}: the output directory holds "
                             "another run's state; run the job again with --restart")
        return seg.start_step, 0, 0, state, []
    return 0, 0, 0, {}, []


def save_state(engine: Any, root: str, progress: dict[str, Any], schedule: dict[str, Any], rank: int) -> None:
    tag = f"step{progress['step']}"
    engine.save_checkpoint(os.path.join(root, "deepspeed"), tag=tag)
    # Per rank: a replay buffer holds that rank's own samples (the rest is equal on all ranks).
    (Path(root) / f"schedule-rank{rank}.json").write_text(json.dumps(schedule))
    if rank == 0:
        (Path(root) / "progress.json").write_text(json.dumps({**progress, "tag": tag}))


def _marked(steps: list[dict[str, Any]], flag: str) -> dict[str, Any]:
    """The report of ``steps``, the last one marked with ``flag`` (``checkpoint``, ``final``)."""
    return {"steps": [*steps[:-1], {**steps[-1], flag: True}]}


def report_checkpoint(engine: Any, steps: list[dict[str, Any]], progress: dict[str, Any],
                       schedule: dict[str, Any], rank: int) -> None:
    """Every rank saves its ZeRO partition; Ray Train merges the ranks' directories. The
    report carries the unreported ``steps``, the last one the checkpoint's."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_state(engine, tmp, progress, schedule, rank)
        ray.train.report(_marked(steps, "checkpoint"), checkpoint=ray.train.Checkpoint.from_directory(tmp))


def report_final(engine: Any, wc: WorkerConfig, steps: list[dict[str, Any]], progress: dict[str, Any],
                  schedule: dict[str, Any], rank: int) -> None:
    """Report the segment's end: the student as an HF checkpoint (ZeRO-3 gathered) for the
    next round's student pool and for evaluation, plus the DeepSpeed state that the next
    segment continues from (or that a re-run restores if the driver died before recording the
    segment as finished)."""
    import deepspeed
    import ray.train

    model = engine.module
    params = list(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        save_state(engine, tmp, progress, schedule, rank)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=wc.spec.training.zero_stage == 3):
            if rank == 0:
                out = os.path.join(tmp, "student")
                save_student(model, wc.spec, out)  # LoRA merged into the base weights
                load_tokenizer(wc.spec.student.model).save_pretrained(out)
        ray.train.report(_marked(steps, "final"), checkpoint=ray.train.Checkpoint.from_directory(tmp))
