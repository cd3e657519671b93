"""Stage 5, train: one segment of the plan as one Ray Train run (TorchTrainer, DeepSpeed ZeRO).

The compact examples of a committed dataset (:mod:`kdray.stages.generate`,
:mod:`kdray.stages.teacher_signal`) stream from storage into the workers through Ray Data
(``read_parquet`` → ``get_dataset_shard``); the workers pad each micro-batch
(:class:`kdray.data.examples.CollateExamples`) and run
:func:`kdray.train.worker.train_loop_per_worker`. Each optimizer step's metrics travel from
rank 0 through ``ray.train.report`` (batched) to the Ray Train controller, where a callback forwards them
to a :func:`~kdray.stages.context.progress_hub` actor that the driver drains while the run goes on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from kdray.curriculum.plan import Segment, total_steps
from kdray.data.artifacts import READ_NUM_CPUS, Artifact
from kdray.data.examples import EXAMPLE_COLUMNS, TokenizeForTraining
from kdray.data.light_tasks import map_light
from kdray.data.records import SIGNAL_COLUMNS
from kdray.errors import ClusterError, KdrayError, first_line, last_error_line, user_error
from kdray.pools import live as live_pools
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.ray_setup import wait_for_free_gpus
from kdray.stages.context import StageContext, progress_hub, run_draining
from kdray.stages.teacher_signal import records_layout
from kdray.train.checkpoints import STEPS_JOURNAL
from kdray.train.worker import WorkerConfig, train_loop_per_worker

#: Ray Train checkpoints kept per run: the latest (to resume from) and the one before it (in
#: case the latest was being written when a worker died).
CHECKPOINTS_TO_KEEP = 2


#: Seconds within which Ray Train's calls of a callback with the same errors are one failure:
#: it polls a failed group every couple of seconds until it decides (up to the deadline of a
#: preemption); a group it restarted takes longer than this to start and fail again.
SAME_FAILURE_S = 3.0


def train_metrics_callback(hub: Any, max_failures: int = -1) -> Any:
    """A ``ray.train.UserCallback`` forwarding rank 0's reported metrics to ``hub``, and ending
    the run at once on an error a worker raised that a retry would raise again
    (:func:`worker_user_error`) instead of retrying it ``training.max_failures`` times: Ray
    Train takes an error in a callback for the controller's own, which it does not retry.

    It also tells the driver, through ``hub`` (``{"message": text}`` events), when the worker
    group failed (after which step; the rank whose worker died, else the lowest, and the line
    that says why; what Ray Train does next, as far as ``max_failures``, the run's, tells) and,
    when steps come again from before the last one (a restart from a checkpoint), from which
    step the workers trained again: Ray Train restarts the group by itself and says so only in
    its controller's log."""
    from ray.train import UserCallback

    class TrainMetricsCallback(UserCallback):
        def __init__(self) -> None:
            self.last_step: Any = None
            self.failures = 0  # counted against max_failures (a preemption's are not)
            self.failed: tuple[str, float] | None = None  # the last failure's errors, and when last polled

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            steps = metrics[0]["steps"] if metrics else []  # rank 0's steps since its last report (kdray.train.worker)
            trained = [step.get("step") for step in steps if "loss" in step and not step.get("resent")]
            if trained and self.failed is not None:
                if self.last_step is not None and trained[0] <= self.last_step:  # from a checkpoint
                    hub.record.remote({"message": f"train: the restarted workers trained from step {trained[0]} on"})
                self.failed = None
            for step in steps:
                hub.record.remote(dict(step))
                self.last_step = step.get("step", self.last_step)

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for error in worker_exceptions.values():
                user = worker_user_error(error)
                if user is not None:
                    raise user
            if not worker_exceptions:
                return
            said = repr(sorted((rank, str(error)) for rank, error in worker_exceptions.items()))
            now = time.monotonic()
            if self.failed is not None and self.failed[0] == said and now - self.failed[1] < SAME_FAILURE_S:
                self.failed = (said, now)  # the same failure, polled again
                return
            self.failed = (said, now)
            hub.record.remote({"message": self.describe(worker_exceptions)})

        def describe(self, errors: dict[int, Exception]) -> str:
            preempted = any(_preempted(error) for error in errors.values())
            self.failures += not preempted
            rank = min(errors, key=lambda r: (not _died(errors[r]), r))
            others = f" and {len(errors) - 1} other rank{'s' if len(errors) > 2 else ''}" if len(errors) > 1 else ""
            after = "before its first step" if self.last_step is None else f"after step {self.last_step}"
            if preempted:
                then = "a preemption: Ray Train restarts it from the latest checkpoint without counting it"
            elif 0 <= max_failures < self.failures:
                then = f"training.max_failures ({max_failures}) is used up: the segment fails"
            else:
                limit = "unlimited" if max_failures < 0 else max_failures
                then = (f"Ray Train restarts it from the latest checkpoint "
                        f"(failure {self.failures} of training.max_failures {limit})")
            return f"train: the worker group failed {after} (rank {rank}{others}: {last_error_line(errors[rank])}); {then}"

    return TrainMetricsCallback()


def _died(error: BaseException) -> bool:
    """Whether a worker's error says its process or node died (rather than a collective broken
    by another rank's death): Ray's actor death, or Ray Train's failed health check."""
    return hasattr(error, "health_check_failure") or any(
        c.__name__ in ("RayActorError", "ActorDiedError") for c in type(error).__mro__)


def _preempted(error: BaseException) -> bool:
    """Whether a worker died with a node Ray drained for a preemption (``RayActorError.preempted``,
    also behind Ray Train's health check error)."""
    return bool(getattr(getattr(error, "health_check_failure", error), "preempted", False))


#: Seconds without a training step before the driver says so, once per stall (:class:`StallWatch`),
#: and before the first step (loading the models, DeepSpeed's setup, a restore).
STALL_WARN_S, FIRST_STEP_WARN_S = 600.0, 1800.0


class StallWatch:
    """Says, once per stall, that no training step came for :data:`STALL_WARN_S` seconds
    (:data:`FIRST_STEP_WARN_S` before the first), with what the cluster has free: a restarted
    worker group that cannot be placed, or whose reads have no CPU left
    (:func:`check_ingest_cpus`), waits without an end or a word. A long checkpoint (steps are
    reported with it once it is saved) stalls as long."""

    def __init__(self, message: Callable[[str], None], clock: Callable[[], float], free: Callable[[], str]):
        self.message, self.clock, self.free = message, clock, free
        self.since, self.step, self.said = clock(), None, False

    def seen(self, event: dict[str, Any]) -> None:
        """A step came (or another event of the workers)."""
        self.since, self.said = self.clock(), False
        self.step = event.get("step", self.step)

    def check(self) -> None:
        waited = self.clock() - self.since
        if waited < (FIRST_STEP_WARN_S if self.step is None else STALL_WARN_S) or self.said:
            return
        self.said = True
        try:
            free = f"the cluster has {self.free()} free"
        except Exception as exc:  # the GCS busy or restarting: the message without it
            free = f"the cluster's free resources are unknown: {first_line(exc)}"
        if self.step is None:
            self.message(f"train: no training step yet after {waited / 60:.0f} min; the workers may still be "
                         f"loading the models or restoring a checkpoint, or wait for resources ({free}; "
                         "`ray status` shows what waits)")
        else:
            self.message(f"train: no training step for {waited / 60:.0f} min since step {self.step}; the workers "
                         "may be saving a checkpoint, or Ray Train restarting them or waiting for resources "
                         f"({free}; `ray status` shows what waits)")


def free_resources() -> str:
    """The cluster's free CPUs and GPUs, for a message: ``3 of 8 CPUs, 0 of 4 GPUs``."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(r, 0):g} of {total[r]:g} {r}s" for r in ("CPU", "GPU") if total.get(r))


def worker_user_error(error: BaseException) -> KdrayError | None:
    """The :class:`KdrayError` a training worker raised (bad data, a model that does not load:
    the same on every retry), as the controller receives it (the object) or in a traceback's
    text (raised in a Ray task the worker ran), else None: a lost node, a killed process, a
    collective broken by either, or a kdray bug, which Ray Train retries from the latest
    checkpoint."""
    if isinstance(error, KdrayError):
        return error
    return user_error(error) if "kdray.errors." in str(error) else None


def select_keys(batch: dict[str, Any], keys: list[Any]) -> dict[str, Any]:
    """The rows of ``batch`` whose ``key`` is in the array ``ray.get(keys[0])`` (an object ref in a
    list, so Ray Data passes it as is; each read task gets the driver's array zero-copy)."""
    import numpy as np
    import ray

    wanted = ray.get(keys[0])
    mask = np.isin(np.asarray(batch["key"], dtype=object), wanted)
    return {k: v[mask] for k, v in batch.items()}


def rows_of(data: Artifact, keys: Any = None, columns: list[str] | None = None) -> Any:
    """The rows of the committed dataset ``data`` as a lazy Ray dataset, in their stored order:
    only those whose key is in ``keys`` when given (a POCL stage), only ``columns`` when given."""
    import ray

    if keys is None:
        return data.read(columns)
    ds = data.read(None if columns is None else [*columns, "key"])
    ds = ds.map_batches(select_keys, fn_kwargs={"keys": [ray.put(keys)]}, batch_format="numpy", num_cpus=READ_NUM_CPUS)
    # a read's share of a CPU, as the map's: the workers hold theirs (check_ingest_cpus)
    return ds if columns is None else ds.select_columns(columns, num_cpus=READ_NUM_CPUS)


#: Largest block the training ingest reads (Ray Data's ``target_max_block_size``, 128 MiB by
#: default): the blocks queued for the workers and prefetched by their iterators are held in
#: the object store, and smaller ones hold less at once. ``kdray bench scale`` (512 MiB store,
#: the ingest phase's own peak at 8N): hidden, 1,000 rows, 299-352 MiB with 128 MiB blocks and
#: 248-262 MiB with 8 MiB blocks (three runs each); top-k, 64,000 rows, 308-322 -> 174-186 MiB
#: (two runs each); ingest rows/s within the runs' noise.
INGEST_BLOCK_BYTES = 8 * 2**20


def training_dataset(data: Artifact, keys: Any = None, signal_meta: dict[str, Any] | None = None) -> Any:
    """The lazy Ray dataset a segment streams into its workers: the compact examples of the
    committed dataset ``data`` (teacher responses, a round's student responses, or teacher
    records), only the rows whose key is in ``keys`` when given (a POCL stage), and only the
    columns the workers read, in blocks of at most :data:`INGEST_BLOCK_BYTES`. Nothing is
    materialised: each epoch reads the files again, in their stored order."""
    columns = [c for c in (*EXAMPLE_COLUMNS, *(f"s_{c}" for c in EXAMPLE_COLUMNS)) if c in data.info["columns"]]
    if signal_meta is not None:
        columns += ["n_tokens", *SIGNAL_COLUMNS[signal_meta["mode"]]]
    ds = rows_of(data, keys, columns)
    ds.context.target_max_block_size = INGEST_BLOCK_BYTES  # this dataset's context, not the driver's
    return ds


def validation_dataset(ctx: StageContext, heldout: Artifact, n_rows: int) -> Any:
    """Replay's validation rows: the first ``n_rows`` committed held-out rows (prompts and
    reference responses, complete) as compact examples, made by Ray Data tasks
    (:class:`kdray.data.examples.TokenizeForTraining`: :func:`kdray.data.light_tasks.map_light`)
    once and kept in the object store: the workers read them at every validation."""
    from kdray.stages.generate import with_dataset_responses

    encoder = dict(tokenizer_ref=ctx.spec.student.model, max_seq_len=ctx.spec.training.max_seq_len,
                   encoding=ctx.prompt_encoding())
    rows = heldout.read(["id", "prompt", "response"]).limit(n_rows)
    return map_light(rows.map_batches(with_dataset_responses, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS),
                     TokenizeForTraining, encoder, num_cpus=LIGHT_NUM_CPUS, batch_format="numpy").materialize()


def check_ingest_cpus(num_workers: int, pool_cpus: float = 0.0) -> None:
    """Refuse a job whose training workers (one CPU each, Ray Train's default), with the live
    pools' ``pool_cpus`` (:func:`kdray.pools.live.live_pool_cpus`), would take every CPU of the
    cluster: the read tasks that stream the data to them could never be scheduled, and the run
    would wait forever. The job checks it when it plans, before any work.

    Raises:
        ClusterError: with the cluster's CPUs, what the run needs and the fixes.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus - num_workers - pool_cpus < READ_NUM_CPUS:
        pool = f" and the live pools reserve {pool_cpus:g} CPU" if pool_cpus else ""
        raise ClusterError(
            f"training.num_workers is {num_workers}{pool} and the Ray cluster has {cpus:g} CPUs: they would hold "
            f"all of them, and the reads that stream the training data to the workers need {READ_NUM_CPUS:g} CPU "
            "more. Lower training.num_workers" + (" or the pools' replicas or num_cpus_per_replica (the "
                                                  "curriculum's; generation's for the teacher pool)" if pool else "")
            + ", or add a CPU to the cluster (ray start --num-cpus on a node)")


def ordered_ingest() -> Any:
    """Ray Data options for a dataset the workers stream: Ray Train's defaults, with the rows in
    their stored order (every run of the job, a resumed one too, sees the same data order)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options  # what Ray Train's defaults copy, less the
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,  # deprecated
                            verbose_progress=current.verbose_progress)  # exclude_resources


def train_segment(ctx: StageContext, data: Artifact, segment: Segment, plan: list[Segment], *,
                  keys: Any = None, init_checkpoint: str | None, run_name: str,
                  signal_meta: dict[str, Any] | None, heldout: Artifact,
                  on_metrics: Callable[[dict[str, Any]], None]) -> tuple[Path, str | None]:
    """Run one segment of the plan on the examples of ``data`` (:func:`training_dataset`).

    Args:
        data: the committed dataset of the segment's examples (teacher responses, teacher
            records, or a DistiLLM-2 round's pairs).
        segment, plan: the segment and the whole plan (:mod:`kdray.curriculum.plan`).
        keys: the keys of the rows the segment trains on (a POCL stage), or None for all.
        init_checkpoint: the previous segment's final state, if any.
        run_name: the Ray Train run's name; a name used before (a resumed job) makes Ray Train
            restore that run's latest checkpoint.
        signal_meta: the layout of the teacher records ``data`` holds (``teacher_signal`` topk /
            hidden), or None.
        heldout: the committed held-out rows; replay's validation loss uses the first ones.
        on_metrics: called with every event the workers report, in order.

    Returns:
        (exported student directory, checkpoint directory to continue from or None).

    Raises:
        KdrayError: training failed through a user's error (:func:`kdray.errors.user_error`:
            the worker's message), or ended without a final checkpoint. Any other failure is re-raised as is.
    """
    spec, t = ctx.spec, ctx.spec.training
    live = live_pools.live_pool_of(spec)  # the curriculum entry that samples from a live student pool, if any
    if t.use_gpu:  # one GPU per worker; a pool that just ended may still be handing its GPUs back
        waited = wait_for_free_gpus(t.num_workers)
        if waited >= 1:
            ctx.reporter.message(f"train: waited {waited:.0f}s for {t.num_workers} free GPUs")
    datasets = {"train": training_dataset(data, keys, signal_meta)}
    replay = spec.curriculum_of("replay")
    if replay is not None:  # DistiLLM's validation loss: held-out prompts, reference responses
        datasets["validation"] = validation_dataset(ctx, heldout, replay.validation_samples)
    hub = progress_hub()
    # The live pools (none without one of the on-policy curricula); the teacher's answers in the
    # records stage's layout.
    teacher_meta = records_layout(ctx) if live_pools.live_teacher_of(spec) else None
    pools = live_pools.start_live_pools(spec, version=segment.start_step, teacher_meta=teacher_meta)
    if live is not None:
        ctx.reporter.message(f"train: the {live.kind.replace('_', '-')} student pool runs: "
                             f"{_replicas(pools.student, 'vLLM ')} beside the workers")
    if pools.teachers:
        ctx.reporter.message(f"train: the teacher pool scores the student's samples: {_replicas(pools.teachers)} "
                             f"({spec.teacher.backend}, top-{spec.teacher_signal.k})")
    try:
        return _fit(ctx, segment, plan, datasets, hub, run_name, on_metrics, WorkerConfig(
            spec=spec, segment=segment, total_steps=total_steps(plan), num_segments=len(plan),
            init_checkpoint=init_checkpoint, signal_meta=signal_meta, student_pool=tuple(pools.student),
            teacher_pool=tuple(pools.teachers), teacher_pool_meta=teacher_meta,
            steps_journal=str(ctx.out / "ray_train" / run_name / STEPS_JOURNAL)))
    finally:
        pools.stop()


def _replicas(actors: list[Any], kind: str = "") -> str:
    return f"{len(actors)} {kind}replica{'s' if len(actors) > 1 else ''}"


def _fit(ctx: StageContext, segment: Segment, plan: list[Segment], datasets: dict[str, Any], hub: Any,
         run_name: str, on_metrics: Callable[[dict[str, Any]], None], worker: WorkerConfig) -> tuple[Path, str | None]:
    """Run the segment's Ray Train run (:func:`train_segment`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = ctx.spec.training
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(ctx.out / "ray_train"),
            callbacks=[train_metrics_callback(hub, t.max_failures)],
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options={name: ordered_ingest() for name in datasets}),
    )
    label = segment.label(len(plan))
    detail = f"{t.num_workers} worker{'s' if t.num_workers != 1 else ''}, ZeRO-{t.zero_stage}" + (f", {label}" if label else "")
    with ctx.phase("train", segment.end_step, detail):
        if segment.start_step:  # the bar counts the job's optimizer steps
            ctx.reporter.advance("train", segment.start_step)
        watch = StallWatch(ctx.reporter.message, time.monotonic, free_resources)

        def on_event(event: dict[str, Any]) -> None:
            watch.seen(event)
            if "message" in event:  # from the callback: the group failed, or trains again
                ctx.reporter.message(event["message"])
            else:
                on_metrics(event)

        try:
            result = run_draining(trainer.fit, hub, on_event, on_tick=watch.check)
        except Exception as error:
            user = user_error(error)
            if user is None:
                raise  # a kdray bug: its traceback says where
            raise KdrayError(f"training failed: {user}") from None
        if result.checkpoint is None:
            raise KdrayError("training finished without a final checkpoint")
        # storage_path is a local directory, so the checkpoint's path is readable here (and
        # by the next segment's workers on this node; multi-node needs shared storage).
        ckpt = Path(result.checkpoint.path)
    return ckpt / "student", str(ckpt) if (ckpt / "progress.json").exists() else None
