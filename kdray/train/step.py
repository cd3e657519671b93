"""One optimizer step's forward and backward passes: the one training step of kdray.

The Ray Train worker (:mod:`kdray.train.worker`, under DeepSpeed) and the local loop
(:class:`kdray.train.loop.LocalLoop`: ``kdray bench train``, ``kdray repro``) both run
:func:`accumulate_step` over the micro-batches of a step; they differ only in what
``backward`` does with each micro-batch's loss.

Why the step counts first. A step's objective is a mean over the whole step: every label token
(or, for DistiLLM-2's per-response reduction, every response) of every micro-batch on every
rank weighs the same, however the step is split into micro-batches and ranks. Normalising each
micro-batch by its own count and then averaging micro-batches (as gradient accumulation does)
over-weights short responses: with 36, 30, 2 and 3 label tokens, one micro-batch of four gives
each token a weight of 1/71, two micro-batches of two give the short pair's tokens 1/10. So the
step's items are counted over all its micro-batches and all-reduced over the ranks first
(:func:`step_items`), and every micro-batch's loss is its *sum* divided by that count, the
``num_items_in_batch`` of Hugging Face transformers' gradient-accumulation fix (Oct 2024). The
micro-batch losses of the step then add up, over micro-batches and ranks, to the step's
objective, and so do their gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from kdray.errors import ClusterError, first_line, node

T = TypeVar("T")


class StepClock:
    """Where an optimizer step's wall time goes on this rank, in seconds (``time.perf_counter``).

    Parts (each step's metrics carry them as ``<part>_s``, :meth:`take`):

    - ``data_wait``: waiting on the data iterator for the step's micro-batches (the first step
      of a segment includes the data pipeline's start-up);
    - ``sampling``: fresh student samples made in the worker (DistiLLM's replay), or waited
      for from the live student pool (the trainer's idle time there);
    - ``forward``: the objective's forward passes (student, and teacher where it runs here);
    - ``backward``: the backward passes, and the gradient reduction a runner does in them
      (DeepSpeed ZeRO-2 reduces gradient buckets as the backward fills them);
    - ``optimizer``: the update (clipping, the optimizer, the schedule; under DeepSpeed its
      ``engine.step``, with ZeRO's last reduction and the all-gather of the updated parameters);
    - ``report``: the previous step's hop to the driver (``ray.train.report``, with the
      checkpoint it carried), so step k shows step k-1's;
    - ``weight_sync``: a push of the student's weights to the live student pool (gathered,
      merged, loaded by every replica): on-policy's after the previous step, so step k shows
      step k-1's; replay's (``sampler: pool``) at the start of a fresh step, its own.

    The parts do not overlap; what they leave out of a step's wall time (the Ray Train worker's
    ``step_s``, from the previous step's end) is the runner's own bookkeeping (the item counts'
    all-reduce, which carries the previous step's metrics; the schedule; replay's validation).

    :meth:`lap` times whole steps: wall time, and the CPU time this process spent in it, all its
    threads (``time.process_time``). Their ratio tells computing from waiting: a rank whose
    ``cpu_s`` is well under its ``step_s`` waited (on its peers at a collective, on the data, or
    for a core), where a slower step at full CPU is slower code."""

    PARTS = ("data_wait", "sampling", "forward", "backward", "optimizer", "report", "weight_sync")
    #: What :meth:`lap` measures of a whole step (``step_s``, ``cpu_s``).
    LAPS = ("step", "cpu")
    #: Every time a step's metrics carry: ``<part>_s`` of :data:`PARTS`, then of :data:`LAPS`.
    KEYS = tuple(f"{name}_s" for name in (*PARTS, *LAPS))

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._last_lap = (time.perf_counter(), time.process_time())

    def lap(self) -> dict[str, float]:
        """``{"step_s": wall seconds, "cpu_s": this process's CPU seconds}`` since the previous
        lap (or since the clock was made): a step's, when called at each step's end."""
        now = (time.perf_counter(), time.process_time())
        (wall0, cpu0), self._last_lap = self._last_lap, now
        return {"step_s": now[0] - wall0, "cpu_s": now[1] - cpu0}

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        """Add the ``with`` block's wall time to ``part``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, with the time spent waiting for each added to ``data_wait``."""
        it = iter(items)
        while True:
            with self.timing("data_wait"):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def take(self) -> dict[str, float]:
        """The parts so far as ``{"<part>_s": seconds}``, then start again from zero."""
        out = {f"{part}_s": value for part, value in self.seconds.items()}
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        return out


def collective_device() -> Any:
    """The device a tensor must be on for a collective of torch.distributed's default process
    group: the CPU when its backend takes CPU tensors (gloo), else the device type it serves
    (NCCL's ``cuda``: the current GPU). NCCL takes no CPU tensors: an ``all_reduce`` of one
    raises ``No backend type associated with device type cpu``.

    Raises:
        ValueError: torch.distributed is not initialised (``torch.distributed.get_backend_config``).
    """
    import torch
    import torch.distributed as dist

    devices = [pair.split(":")[0] for pair in dist.get_backend_config().split(",")]
    return torch.device("cpu" if "cpu" in devices else devices[0])


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """``values`` summed over every rank of torch.distributed's default process group, in
    float64, by one ``all_reduce`` on :func:`collective_device` (every rank must call this
    at the same point with as many values, in the same order); ``values`` themselves when
    torch.distributed is not initialised or has one rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class RankSums:
    """This rank's share of values to sum over the ranks, carried by the next collective kdray
    makes anyway: a step's metrics travel with the next step's item counts (:func:`step_items`),
    one all-reduce per step instead of two. On a 2-core host a gloo all-reduce of a few floats
    between two idle ranks took 1.0-1.3 ms (2026-12-04), ~2% of the toy job's step.

    Args:
        values: ``{name: this rank's value}``; every rank must carry the same names.
    """

    def __init__(self, values: dict[str, float]):
        self.values = dict(values)
        #: ``{name: sum over the ranks}`` once a collective carried them; None until then.
        self.summed: dict[str, float] | None = None

    def sum_now(self) -> RankSums:
        """Sum the values in a collective of their own (every rank must call this at the same
        point), where no step follows to carry them: a checkpoint's step, a segment's last.
        Returns ``self``."""
        keys = sorted(self.values)
        self.summed = dict(zip(keys, sum_over_ranks([self.values[k] for k in keys])))
        return self


def step_items(objective: Any, micro_batches: Iterable[dict[str, Any]],
               carry: RankSums | None = None) -> dict[str, float]:
    """Items of each term of ``objective`` in one optimizer step, over all of this step's
    ``micro_batches`` on every rank (:func:`sum_over_ranks`; every rank must call this once per
    step, all with ``carry`` or all without).

    Args:
        carry: values summed over the ranks in the same all-reduce (the previous step's
            metrics), into ``carry.summed``.

    Returns:
        ``{term: count}`` as ``objective.items(batch)`` names them (e.g. ``kd``, ``ce``; for
        DistiLLM-2 ``skl``, ``srkl``, ``ce``), as floats.
    """
    totals: dict[str, float] = {}
    for batch in micro_batches:
        for key, value in objective.items(batch).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    keys = sorted(totals)
    carried = sorted(carry.values) if carry is not None else []
    summed = sum_over_ranks([totals[k] for k in keys] + [carry.values[k] for k in carried])
    if carry is not None:
        carry.summed = dict(zip(carried, summed[len(keys):]))
    return dict(zip(keys, summed[:len(keys)]))


def accumulate_step(objective: Any, model: Any, teacher: Any, micro_batches: list[dict[str, Any]],
                    backward: Callable[[Any], None], clock: StepClock | None = None,
                    carry: RankSums | None = None) -> dict[str, float]:
    """Forward and backward every micro-batch of one optimizer step (not the update itself).

    Args:
        objective: a step objective (:func:`kdray.train.objectives.make_step_objective`).
        model: the student (a DeepSpeed engine or the model).
        teacher: what the objective needs of the teacher.
        micro_batches: this rank's micro-batches of the step, tensors on the model's device.
        backward: called with each micro-batch's loss, which is already normalised by the whole
            step's items (:func:`step_items`): the runner adds the gradients up (undoing any
            averaging its gradient reduction does over micro-batches or ranks).
        clock: where the forward passes' time goes (``forward``); the runner times its own
            ``backward`` and update.
        carry: summed over the ranks with the step's item counts (:func:`step_items`).

    Returns:
        This rank's sums: ``loss`` and the objective's parts (summing them over the ranks gives
        the step's values), ``tokens`` (label tokens), ``positions`` and ``attended`` (padded
        and real positions); :func:`step_metrics` turns them into the step's metrics.

    Raises:
        ClusterError: the GPU ran out of memory (``torch.OutOfMemoryError``), naming the node,
            the micro-batch's shape and the settings that take less. A KdrayError, so Ray Train
            does not retry it (:func:`kdray.stages.train.worker_user_error`): the same batch
            after the same checkpoint needs the same memory.
    """
    import torch

    items = step_items(objective, micro_batches, carry)
    sums: dict[str, float] = {}
    clock = clock or StepClock()
    for batch in micro_batches:
        try:
            with clock.timing("forward"):
                loss, parts, n_tokens = objective(model, teacher, batch, num_items_in_batch=items)
            backward(loss)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, batch) from None
        for key, value in {"loss": float(loss.detach()), **parts, "tokens": n_tokens, **_positions(batch)}.items():
            sums[key] = sums.get(key, 0.0) + value
    objective.end_micro_batches()
    return sums


def out_of_memory(exc: BaseException, batch: dict[str, Any]) -> ClusterError:
    """What a user reads when a training step's micro-batch ``batch`` did not fit the GPU: what
    torch said, where, the batch's shape (rows × padded tokens per side) and what takes less."""
    shape = " and ".join(f"{ids.shape[0]} × {ids.shape[-1]}" for ids in
                         (batch.get("input_ids"), batch.get("s_input_ids")) if ids is not None)
    said = first_line(exc, typed=False)  # torch's first line has the sizes
    return ClusterError(
        f"a training worker ran out of GPU memory on node {node()} ({said}), in a micro-batch of "
        f"{shape or 'its'} (sequences × tokens). Lower training.micro_batch_size_per_worker (the step "
        "accumulates more micro-batches for the same global_batch_size) or training.max_seq_len, set "
        "training.gradient_checkpointing: true, a higher training.zero_stage or offload_optimizer: true; "
        "`kdray validate SPEC` estimates what a worker holds, and training.gpu_memory_gb checks it before "
        "the job starts. Then run the job again (it resumes from its latest checkpoint)")


def _positions(batch: dict[str, Any]) -> dict[str, int]:
    """A micro-batch's positions (rows × padded length, both response sides) and how many of
    them are real tokens: their ratio is what padding costs."""
    masks = [batch[k] for k in ("attention_mask", "s_attention_mask") if k in batch]
    return {"positions": sum(m.numel() for m in masks), "attended": sum(int(m.sum()) for m in masks)}


def step_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The step's metrics from :func:`accumulate_step`'s sums over every rank: ``loss`` and the
    objective's parts, ``tokens`` (label tokens) and ``pad_fraction`` (the share of the step's
    micro-batch positions that are padding)."""
    out = {k: v for k, v in sums.items() if k not in ("tokens", "positions", "attended")}
    out["tokens"] = int(sums.get("tokens", 0))
    out["pad_fraction"] = 1.0 - sums.get("attended", 0.0) / max(sums.get("positions", 0.0), 1.0)
    return out
