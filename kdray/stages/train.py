"""Stage 5, train: one segment of the plan as one Ray Train run (TorchTrainer, DeepSpeed ZeRO).

The rows are tokenized by a Ray Data actor (:class:`kdray.data.examples.TokenizeForTraining`)
and sharded to the workers; the workers run :func:`kdray.train.worker.train_loop_per_worker`.
Each optimizer step's metrics travel from rank 0 through ``ray.train.report`` to the Ray
Train controller, where a callback forwards them to a :func:`progress_hub` actor that the
driver drains while the run goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from kdray.curriculum.plan import Segment, total_steps
from kdray.data.records import signal_key
from kdray.data.examples import TokenizeForTraining
from kdray.errors import KdrayError, user_error
from kdray.stages.context import StageContext
from kdray.train.worker import WorkerConfig, train_loop_per_worker

#: Ray Train checkpoints kept per run: the latest (to resume from) and the one before it (in
#: case the latest was being written when a worker died).
CHECKPOINTS_TO_KEEP = 2
#: The CPU share of each tokenizing actor (it is light next to the workers).
TOKENIZE_NUM_CPUS = 0.25
#: Seconds between two drains of the training metrics while the run goes on.
DRAIN_INTERVAL_S = 0.5


def progress_hub() -> Any:
    """A Ray actor (no CPU) that buffers events from the Ray Train controller for the driver."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressHub:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def record(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def drain(self) -> list[dict[str, Any]]:
            out, self.events = self.events, []
            return out

    return ProgressHub.remote()


def train_metrics_callback(hub: Any) -> Any:
    """A ``ray.train.UserCallback`` forwarding rank 0's reported metrics to ``hub``."""
    from ray.train import UserCallback

    class TrainMetricsCallback(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                hub.record.remote(dict(metrics[0]))

    return TrainMetricsCallback()


def tokenized_dataset(ctx: StageContext, rows: list[dict[str, Any]], columns: list[str], signal: Any = None) -> Any:
    """A materialised Ray dataset of ``rows`` as compact training examples (unpadded token ids,
    teacher records in their stored bytes: :class:`kdray.data.examples.TokenizeForTraining`); each
    worker pads its micro-batches (:class:`kdray.data.examples.CollateExamples`).

    Args:
        rows: rows holding every name in ``columns``.
        columns: the text columns the trainer reads (``prompt``, ``response``, ...).
        signal: ``(meta, records by key)`` of teacher records; each row then carries its own.

    Raises:
        KdrayError: a row lacks one of ``columns``.
    """
    import ray.data

    spec = ctx.spec
    table = []
    for r in rows:
        missing = [c for c in columns if c not in r]
        if missing:
            raise KdrayError(f"training row {r.get('id')!r} has no {missing}: the stage that made the rows "
                             "did not fill them; run the job with --restart to make them again")
        item = {c: r[c] for c in columns}
        if signal is not None:
            item.update(signal[1][signal_key(r)])
        table.append(item)
    ds = ray.data.from_items(table)
    # Several tokenizing actors finish batches in any order; the blocks keep the rows' order, so
    # every run of the job (a resumed one too) sees the same data order and skips exactly the
    # micro-batches an earlier run trained.
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        TokenizeForTraining,
        fn_constructor_kwargs=dict(tokenizer_ref=spec.student.model, max_seq_len=spec.training.max_seq_len,
                                   encoding=ctx.prompt_encoding(),  # the pools' encoding
                                   signal_meta=signal[0] if signal is not None else None),
        batch_size=spec.training.tokenize_batch_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=spec.training.tokenize_actors or spec.training.num_workers),
        num_cpus=TOKENIZE_NUM_CPUS,
    ).materialize()


def train_segment(ctx: StageContext, rows: list[dict[str, Any]], segment: Segment, plan: list[Segment], *,
                  init_checkpoint: str | None, run_name: str, signal: Any, heldout: list[dict[str, Any]],
                  on_metrics: Callable[[dict[str, Any]], None]) -> tuple[Path, str | None]:
    """Run one segment of the plan on ``rows``.

    Args:
        rows: the segment's training rows (``prompt``, ``response``, ``finish_reason``, and the
            ``student_*`` pair in a DistiLLM-2 round).
        segment, plan: the segment and the whole plan (:mod:`kdray.curriculum.plan`).
        init_checkpoint: the previous segment's final state, if any.
        run_name: the Ray Train run's name; a name used before (a resumed job) makes Ray Train
            restore that run's latest checkpoint.
        signal: teacher records (``teacher_signal`` topk / hidden) or None.
        heldout: held-out rows; replay's validation loss uses the first ones.
        on_metrics: called with every event the workers report, in order.

    Returns:
        (exported student directory, checkpoint directory to continue from or None).

    Raises:
        KdrayError: training failed through a user's error (:func:`kdray.errors.user_error`:
            the worker's message), or ended without a final checkpoint. Any other failure is re-raised as is.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec, t = ctx.spec, ctx.spec.training
    columns = ["prompt", "response", "finish_reason"]
    if rows and "response_token_ids" in rows[0]:  # a pool's responses train on its own ids
        columns.append("response_token_ids")
    if segment.regenerate_student:
        columns += ["student_response", "student_finish_reason", "student_response_token_ids"]
    datasets = {"train": tokenized_dataset(ctx, rows, columns, signal)}
    replay = spec.curriculum_of("replay")
    if replay is not None:  # DistiLLM's validation loss: held-out prompts, reference responses
        validation = [dict(r, finish_reason="stop") for r in heldout[: replay.validation_samples]]
        datasets["validation"] = tokenized_dataset(ctx, validation, columns[:3])
    hub = progress_hub()
    worker = WorkerConfig(spec=spec, segment=segment, total_steps=total_steps(plan), num_segments=len(plan),
                          init_checkpoint=init_checkpoint, signal_meta=signal[0] if signal is not None else None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(ctx.out / "ray_train"),
            callbacks=[train_metrics_callback(hub)],
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
        datasets=datasets,
    )
    result_box: dict[str, Any] = {}

    def fit() -> None:
        try:
            result_box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the driver thread below
            result_box["error"] = exc

    def drain() -> None:
        import ray

        for event in ray.get(hub.drain.remote()):
            on_metrics(event)

    label = segment.label(len(plan))
    detail = f"{t.num_workers} workers, ZeRO-{t.zero_stage}" + (f", {label}" if label else "")
    with ctx.phase("train", segment.end_step, detail):
        if segment.start_step:  # the bar counts the job's optimizer steps
            ctx.reporter.advance("train", segment.start_step)
        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=DRAIN_INTERVAL_S)
            drain()
        drain()
        if "error" in result_box:
            error = result_box["error"]
            user = user_error(error)
            if user is None:
                raise error  # a kdray bug: its traceback says where
            raise KdrayError(f"training failed: {user}") from None
        result = result_box["result"]
        if result.checkpoint is None:
            raise KdrayError("training finished without a final checkpoint")
        # storage_path is a local directory, so the checkpoint's path is readable here (and
        # by the next segment's workers on this node; multi-node needs shared storage).
        ckpt = Path(result.checkpoint.path)
    return ckpt / "student", str(ckpt) if (ckpt / "progress.json").exists() else None
