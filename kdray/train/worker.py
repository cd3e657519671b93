"""The Ray Train worker loop: DeepSpeed ZeRO distillation of the student.

``train_loop_per_worker`` runs on every Ray Train worker. It receives everything through its
config (a :class:`WorkerConfig`), never from module globals, so the same function serves the
demo, the tests and a cluster. Every optimizer step's metrics reach the driver through
``ray.train.report`` (a collective of all ranks), batched: the steps since the last report go
together at a checkpoint, at the segment's end, or one step after the first step
:data:`REPORT_INTERVAL_S` after the last report (a step's metrics are summed over the ranks with
the next step's item counts, :class:`kdray.train.step.RankSums`); the driver's callback
forwards them, one event per step, to the job's progress.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.curriculum.plan import Segment
from kdray.data.examples import CollateExamples
from kdray.data.length_groups import group_by_length
from kdray.models import load_tokenizer
from kdray.spec import JobSpec, TrainingSpec
from kdray.train.checkpoints import final_steps, report_checkpoint, report_final, restore
from kdray.train.setup import deepspeed_config, load_student, make_optimizer, peak_rss_mb, reset_peak_rss
from kdray.train.step import RankSums, StepClock, accumulate_step, step_metrics


#: Seconds between two metric-only reports at most (a report is due one step after the first
#: step after it).
#: Every ``ray.train.report`` waits for all ranks and the controller: 46 ms median per step on
#: the 2-core bench host (``kdray bench train``, 2026-12-03), about half the toy job's step. Rank
#: 0's clock decides, and the decision travels with the step's metrics in their all-reduce, so
#: every rank reports at the same step.
REPORT_INTERVAL_S = 1.0

#: Seconds between two checks for a preemption notice at most: Ray Train's watcher polls Ray's
#: node drains every 5 s (``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S``), and each check
#: (``ray.train.get_preemption_info``) is a collective of all ranks through Ray Train's actors.
#: Rank 0's clock decides, carried with the step's metrics as a report is.
PREEMPTION_CHECK_S = 5.0
#: After a notice the workers checkpoint again this many seconds before its deadline at least
#: (more where a step and a checkpoint take long: :func:`_last_checkpoint_at`), so that the
#: steps trained since the notice are not lost with the node.
PREEMPTION_MARGIN_S = 15.0

#: Rows each worker's local shuffle buffer holds, in micro-batches: Ray Data shuffles within the
#: buffer as it streams the shard (a full shuffle would materialise the shard per epoch).
SHUFFLE_BUFFER_MICRO_BATCHES = 4


def shuffle_seed(seed: int, *, epoch: int, segment: int, rank: int) -> int:
    """The local-shuffle seed of one worker's pass over its shard: ``training.seed`` plus a
    distinct offset per (epoch, segment, rank), so no two passes share an order while a
    re-run (or a restored run) repeats every order exactly. Epochs < 100, ranks < 1000."""
    return seed + 1000 * epoch + 100_000 * segment + rank


def micro_batches(shard: Any, t: TrainingSpec, seed: int, collate: CollateExamples) -> Iterable[dict[str, Any]]:
    """One pass over a worker's shard (a Ray ``DataIterator``): micro-batches of
    ``t.micro_batch_size_per_worker`` rows, shuffled by Ray Data's local shuffle buffer with
    ``seed``, each collated (padded to its own longest row) by ``collate``; the last partial
    micro-batch is dropped. With ``t.group_by_length`` the same rows in the same order are
    gathered into windows of ``t.length_group_size`` micro-batches and grouped by length
    (:func:`kdray.data.length_groups.group_by_length`): as many micro-batches, less padding.

    The rows are read in micro-batch-sized batches either way, and windows are built from them:
    asked for batches over half its buffer, Ray Data's local shuffle yields short ones mid-stream
    (Ray 2.60 takes at most the rows left in its shuffled generation)."""
    mb = t.micro_batch_size_per_worker
    shuffle = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_MICRO_BATCHES * mb, "local_shuffle_seed": seed}
    if not t.group_by_length:
        return shard.iter_torch_batches(batch_size=mb, drop_last=True, collate_fn=collate, **shuffle)
    rows = shard.iter_batches(batch_size=mb, batch_format="numpy", **shuffle)
    return map(collate, group_by_length(rows, mb, t.length_group_size, seed=seed))


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs for one segment of the plan, built by the driver."""

    spec: JobSpec
    segment: Segment
    total_steps: int            # optimizer steps of the whole plan
    num_segments: int
    init_checkpoint: str | None = None  # the previous segment's state (a directory), if any
    signal_meta: dict[str, Any] | None = None  # the teacher records' layout (topk / hidden modes)
    student_pool: tuple[Any, ...] = ()  # the on-policy curriculum's live pool (kdray.pools.live)
    teacher_pool: tuple[Any, ...] = ()  # its live teacher pool (teacher_signal topk), if any
    teacher_pool_meta: dict[str, Any] | None = None  # the records layout the teacher pool answers in
    steps_journal: str | None = None  # rank 0's journal of the steps (kdray.train.checkpoints.STEPS_JOURNAL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: one DeepSpeed rank training one segment of the plan.

    ``config["worker"]`` is the :class:`WorkerConfig`; the datasets are Ray Train's shards
    ``train`` (and ``validation`` with the replay curriculum). Each optimizer step's metrics go
    to ``ray.train.report`` as ``{"steps": [metrics, ...]}`` (batched: see the module), with a
    checkpoint every ``training.checkpoint_every_steps`` and at the end of the segment (the
    exported student, :func:`kdray.train.checkpoints.report_final`)."""
    import ray.train

    wc: WorkerConfig = config["worker"]
    spec, t, seg = wc.spec, wc.spec.training, wc.segment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, scheduler, teacher = _setup_engine(wc, rank)
    reset_peak_rss()  # peak_rss_mb: the peak of training, not the checkpoint files' mapped pages
    device = engine.device

    step, start_epoch, skip_micro, state, restored = restore(engine, wc, ray.train.get_checkpoint(), rank)
    from kdray.train.objectives import make_step_objective

    objective = make_step_objective(spec, seg, total_steps=wc.total_steps,
                                    num_segments=wc.num_segments, state=state.get("objective"))
    replay = _make_replay(spec, rank, state.get("replay"), wc.student_pool)
    validation = ray.train.get_dataset_shard("validation") if replay is not None else None
    validate_every = (spec.curriculum_of("replay").validate_every_steps or seg.steps_per_epoch) if replay else 0
    if replay is not None and replay.needs_initial_validation:  # DistiLLM validates before training
        replay.validate(engine, validation, device)
    shard = ray.train.get_dataset_shard("train")
    pad_id = load_tokenizer(spec.student.model).pad_token_id
    collate = CollateExamples(pad_id, wc.signal_meta)
    on_policy = None
    if wc.student_pool and spec.curriculum_of("on_policy") is not None:
        from kdray.train.on_policy import OnPolicySource

        on_policy = OnPolicySource(spec, rank=rank, replicas=list(wc.student_pool), pad_id=pad_id, end_step=seg.end_step,
                                   teachers=list(wc.teacher_pool), signal_meta=wc.teacher_pool_meta)
        on_policy.push(engine, step)  # the pool serves the weights this run starts from
    micro_per_epoch = seg.steps_per_epoch * t.gradient_accumulation_steps
    metrics: dict[str, Any] = {}
    group: list[dict[str, Any]] = []  # the micro-batches of the step being gathered
    since_checkpoint: list[dict[str, Any]] = []
    unreported: list[dict[str, Any]] = []  # the steps the next report carries
    last_report = last_check = time.monotonic()
    noticed = False  # a preemption notice came, and this run checkpointed at once
    deadline_at: float | None = None  # the notice's deadline (time.time())
    last_at: float | None = None  # rank 0: when to checkpoint again before that deadline (None: not again)
    # The last step's sums, summed over the ranks with the next step's item counts (one collective
    # a step, :class:`RankSums`), and its rank-local metrics; None where the step summed its own.
    pending: tuple[RankSums, dict[str, Any]] | None = None

    journal = None
    if rank == 0 and wc.steps_journal:  # appended a line a step (tens of µs); shared storage, as the checkpoints
        Path(wc.steps_journal).parent.mkdir(parents=True, exist_ok=True)
        journal = open(wc.steps_journal, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole loop

    def record(sums: RankSums, local: dict[str, Any]) -> tuple[bool, bool]:
        """A step's metrics, its sums now over every rank, to the reports to come and rank 0's
        journal; whether rank 0 found a report due, and a preemption check (every rank gets the
        same answers)."""
        nonlocal metrics
        metrics, due, check = _step_metrics(sums, local)
        since_checkpoint.append(metrics)
        unreported.append(metrics)
        if journal is not None:
            journal.write(json.dumps(metrics, default=float) + "\n")
            journal.flush()
        return due, check

    boundaries: list[bool] = []
    clock = StepClock()  # where each step's time goes: its metrics' *_s; a step runs from the previous one's end

    def backward(loss: Any) -> None:
        # The loss is already normalised by the whole step's items: DeepSpeed must neither divide
        # it by the accumulation steps nor, in effect, by the ranks (it averages their gradients).
        with clock.timing("backward"):
            engine.backward(loss * world, scale_wrt_gas=False)
        boundaries.append(engine.is_gradient_accumulation_boundary())
        with clock.timing("optimizer"):
            engine.step()  # an optimizer step only at the accumulation boundary

    for epoch in range(start_epoch, seg.epochs):
        batches = micro_batches(shard, t, shuffle_seed(t.seed, epoch=epoch, segment=seg.index, rank=rank), collate)
        for micro, batch in enumerate(clock.iterate(batches)):
            if micro >= micro_per_epoch or step >= seg.end_step:
                break
            if epoch == start_epoch and micro < skip_micro:
                continue  # trained before the checkpoint this run resumed from
            batch = {k: v.to(device) for k, v in batch.items()}
            if replay is not None:
                if not group:
                    replay.begin_step(step, wc.total_steps)
                    if replay.push_due:  # sampler: pool, a fresh step
                        with clock.timing("weight_sync"):
                            replay.push(engine)
                with clock.timing("sampling"):
                    batch = replay.batch(engine, batch)
            if on_policy is not None:
                if not group:
                    on_policy.begin_step(step + 1)
                batch = on_policy.batch(batch, len(group), clock)
            group.append(batch)
            if len(group) < t.gradient_accumulation_steps:
                continue
            lr = float(scheduler.get_last_lr()[0])  # the rate this optimizer step applies
            window = accumulate_step(objective, engine, teacher, group, backward, clock,
                                     carry=pending[0] if pending is not None else None)
            if boundaries != [False] * (len(group) - 1) + [True]:
                raise RuntimeError(f"rank {rank}: DeepSpeed's accumulation boundaries {boundaries} do not match "
                                   f"the step's {len(group)} micro-batches (step {step + 1})")
            group, boundaries[:] = [], []
            step += 1
            schedule = objective.metrics()  # the values this step used
            objective.optimizer_step()
            if replay is not None:
                schedule.update(replay.metrics())
                if step % validate_every == 0:
                    schedule["val_loss"] = replay.validate(engine, validation, device)
            if on_policy is not None:
                schedule.update(on_policy.metrics())
            report_due, check_due = record(*pending) if pending is not None else (False, False)  # the last step's
            local = {"step": step, "epoch": epoch, "lr": lr, **schedule, **_rank_metrics(engine, wc, clock.lap()),
                     **clock.take()}
            checkpoint = bool(t.checkpoint_every_steps) and step % t.checkpoint_every_steps == 0
            if check_due and step < seg.end_step and noticed:  # the deadline is near: save the steps since
                checkpoint, last_at = True, None
                local["preemption"] = {"before_deadline_s": round(deadline_at - time.time(), 1)} if deadline_at else {}
            elif check_due and step < seg.end_step:
                with clock.timing("report"):
                    notice = _preemption_notice()
                last_check = time.monotonic()
                if notice is not None:  # checkpoint at once: the steps since the last one are saved
                    noticed = checkpoint = True
                    local["preemption"] = notice
                    if notice["deadline_s"] is not None:
                        deadline_at = time.time() + notice["deadline_s"]
            pending = None
            if checkpoint or step >= seg.end_step:  # no step to carry this one's sums: their own collective
                record(RankSums({**window, "report_due": 0.0, "check_due": 0.0}).sum_now(), local)
            if step >= seg.end_step:
                break
            if checkpoint:
                # The steps since the last checkpoint travel with it: a driver killed before it
                # drained their metrics recovers them from here when the job is run again.
                progress = {"step": step, "epoch": epoch, "micro_in_epoch": micro + 1, "segment": seg.index,
                            "metrics": since_checkpoint}
                saving = time.monotonic()
                with clock.timing("report"):
                    report_checkpoint(engine, unreported, progress, _state(objective, replay), rank)
                since_checkpoint, unreported, last_report = [], [], time.monotonic()
                if "nodes" in local.get("preemption", {}) and deadline_at is not None and rank == 0:
                    last_at = _last_checkpoint_at(deadline_at, last_report - saving, local["step_s"])
            elif report_due:
                with clock.timing("report"):
                    ray.train.report({"steps": unreported})
                unreported, last_report = [], time.monotonic()
            if not checkpoint:  # with whether rank 0 finds a report or a check due, decided after this step's
                now = time.monotonic()
                due = rank == 0 and now - last_report >= REPORT_INTERVAL_S
                check = rank == 0 and (now - last_check >= PREEMPTION_CHECK_S if not noticed
                                       else last_at is not None and time.time() >= last_at)
                pending = (RankSums({**window, "report_due": float(due), "check_due": float(check)}), local)
            if on_policy is not None:
                on_policy.after_step(engine, step, clock)
        if step >= seg.end_step:
            break
    if pending is not None:  # fewer batches than planned: no step carried the last one's sums
        record(pending[0].sum_now(), pending[1])
    if journal is not None:
        journal.close()
    # The end of the segment (or fewer batches than planned): export what was trained.
    unreported = final_steps(unreported, metrics, restored,
                             {"step": step, "total_steps": wc.total_steps, "round": seg.round})
    report_final(engine, wc, unreported, {"step": step, "epoch": 0, "micro_in_epoch": 0, "segment": seg.index,
                                        "metrics": since_checkpoint}, _state(objective, replay), rank)


def _setup_engine(wc: WorkerConfig, rank: int) -> tuple[Any, Any, Any]:
    """(DeepSpeed engine, its LR scheduler, the teacher on the engine's device) for one rank."""
    import torch

    from kdray.train.setup import training_deepspeed

    from kdray.train.teacher import partitioned, worker_teacher

    spec = wc.spec
    deepspeed = training_deepspeed()
    torch.manual_seed(spec.training.seed + rank)
    student = load_student(spec)  # with training.lora: peft adapters, base frozen
    # The model (online; a ZeRO-3 engine of its own under ZeRO-3), its lm_head (hidden), or None (topk)
    teacher = worker_teacher(spec)
    optimizer, scheduler = make_optimizer(spec, student, total_steps=wc.total_steps, segment=wc.segment)
    engine, _, _, scheduler = deepspeed.initialize(
        model=student, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    if teacher is not None and not partitioned(teacher):
        teacher.to(engine.device)
    return engine, scheduler, teacher


def _rank_metrics(engine: Any, wc: WorkerConfig, lap: dict[str, float]) -> dict[str, Any]:
    """This rank's part of an optimizer step's metrics, at the step's end: where in the plan the
    step is, its wall time ``step_s`` (from the previous step's end: its data wait and the
    previous report included; a worker group's first step from its start) and the CPU time its
    process spent in it (``cpu_s``, :meth:`kdray.train.step.StepClock.lap`), the grad norm
    before clipping (over every rank already), this rank's peak memory."""
    seg = wc.segment
    grad_norm = engine.get_global_grad_norm()
    return {
        "total_steps": wc.total_steps,
        "round": seg.round,
        **({"stage": seg.stage, "n_active": seg.n_rows} if seg.stage is not None else {}),
        **lap,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "peak_rss_mb": peak_rss_mb(),  # since the models were loaded (reset_peak_rss)
    }


def _step_metrics(sums: RankSums, local: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """An optimizer step's metrics: ``local`` (:func:`_rank_metrics`) with the loss and its parts
    (each rank's share from :func:`kdray.train.step.accumulate_step`, summed over the ranks in
    ``sums``: the step's objective), label tokens per second of rank 0's step and the share of
    padding; and whether rank 0 found a report due and a preemption check due (``sums``'
    ``report_due``, ``check_due``)."""
    if sums.summed is None:
        raise RuntimeError(f"step {local['step']}: its metrics were never summed over the ranks")
    summed = dict(sums.summed)
    due, check = summed.pop("report_due") > 0, summed.pop("check_due") > 0
    totals = step_metrics(summed)
    return {
        **local,
        **{k: v for k, v in totals.items() if k != "tokens"},
        "tokens_per_s": totals["tokens"] / max(local["step_s"], 1e-9),
    }, due, check


def _last_checkpoint_at(deadline_at: float, checkpoint_s: float, step_s: float) -> float | None:
    """When (``time.time()``) to checkpoint again before a notice's deadline ``deadline_at``:
    :data:`PREEMPTION_MARGIN_S` before it, or three checkpoints (``checkpoint_s``, the notice's
    own) and two steps (``step_s``) before it where those take longer; None where that moment
    has passed (the notice came late: its own checkpoint is the last)."""
    at = deadline_at - max(PREEMPTION_MARGIN_S, 3 * checkpoint_s + 2 * step_s)
    return at if at > time.time() else None


def _preemption_notice() -> dict[str, Any] | None:
    """Whether Ray drains a node of this worker group for a preemption (a spot instance's
    reclaim notice; ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``), from Ray Train's
    ``get_preemption_info``: the same answer on every rank, which must all call it at the same
    step. None, or the notice as the step's metrics keep it: the drained ``nodes`` (ids), the
    ``ranks`` on them and ``deadline_s``, the seconds left before the reclaim (None: unknown).

    The caller checkpoints at once, and again shortly before the deadline
    (:func:`_last_checkpoint_at`). Ray Train restarts the group from the latest checkpoint once
    the node goes; it counts that as a preemption (``max_preemption_failures``: unlimited) only
    when it let the node go first, and a node taken at its deadline counted against
    ``training.max_failures`` here (docs/guide.md, "Checkpoints and failures")."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    deadline = info.deadline_ms / 1000 - time.time() if info.deadline_ms else None
    return {"nodes": info.preempted_node_ids, "ranks": info.preempted_ranks,
            "deadline_s": round(deadline, 1) if deadline is not None else None}


def _make_replay(spec: JobSpec, rank: int, state: dict[str, Any] | None, pool: tuple[Any, ...]) -> Any:
    if spec.curriculum_of("replay") is None:
        return None
    from kdray.train.replay import ReplaySource

    tok = load_tokenizer(spec.student.model)
    return ReplaySource(spec, rank=rank, state=state, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        replicas=list(pool))


def _state(objective: Any, replay: Any) -> dict[str, Any]:
    """This rank's schedule state: the objective's (DistiLLM-2) and the replay buffer's."""
    return {"objective": objective.state_dict(), "replay": replay.state_dict() if replay is not None else None}
