"""Length-grouped micro-batches: ``training.group_by_length``.

Each micro-batch is padded to its own longest row (:class:`kdray.data.examples.CollateExamples`);
a short row next to a long one is still mostly padding. Grouping rows of similar length into the
same micro-batch cuts that padding further. The idea is Hugging Face transformers'
``group_by_length`` training argument (its ``LengthGroupedSampler``: "megabatches" of 50 × the
batch size, each sorted by length). kdray applies it to a stream, one window of rows at a time,
since a worker reads its shard of the data set as it goes and never holds all of it.

:func:`group_by_length` is pure (numpy only): the Ray Train worker feeds it the windows its
shard's iterator yields (:func:`kdray.train.worker.micro_batches`), the tests feed it lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

#: The response sides a row may have: the teacher's (or the data set's) and, in DistiLLM-2
#: rounds, the student's (``s_`` prefix). Both are padded to the same length in a micro-batch.
LENGTH_COLUMNS = ("input_ids", "s_input_ids")


def row_lengths(window: dict[str, Any]) -> np.ndarray:
    """Each row's padded-to length in tokens: ``len(input_ids)``, or for a DistiLLM-2 row the
    longer of ``input_ids`` and ``s_input_ids`` (a micro-batch pads both sides to its longest).

    Args:
        window: columns of ``n`` rows (numpy arrays or lists, as Ray Data's ``numpy`` batch
            format gives them); ``input_ids`` holds one 1-D array of token ids per row.

    Returns:
        ``[n]`` int64.

    Raises:
        KeyError: the window has no ``input_ids`` column.
    """
    sides = [window["input_ids"], *(window[c] for c in LENGTH_COLUMNS[1:] if c in window)]
    return np.asarray([max(len(side[i]) for side in sides) for i in range(len(sides[0]))], dtype=np.int64)


def group_by_length(windows: Iterable[dict[str, Any]], micro_batch_size: int, *, seed: int) -> Iterator[dict[str, Any]]:
    """Micro-batches of rows of similar length, one window of the stream at a time.

    For every window (typically ``training.length_group_size × micro_batch_size`` rows of the
    shuffled stream): keep its first ``micro_batch_size × ⌊n / micro_batch_size⌋`` rows in stream
    order (the rest is dropped, as ``drop_last`` drops the stream's last partial micro-batch: only
    the stream's last window is short, so a pass yields ⌊rows / micro_batch_size⌋ micro-batches, as
    many as without grouping); sort them by :func:`row_lengths`, longest first (ties keep stream
    order); cut them into micro-batches of ``micro_batch_size`` rows; yield those in a random
    order. The order comes from ``seed`` alone, so the same windows with the same seed give the same
    micro-batches in the same order: a resumed worker that skips the micro-batches it trained
    before its checkpoint lands on the same rows. Every row of the kept windows is in exactly one
    micro-batch.

    Unlike Hugging Face's ``LengthGroupedSampler``, which yields a megabatch's batches from the
    longest to the shortest, the micro-batches of a window are shuffled, so an optimizer step
    (its gradient-accumulation micro-batches) does not gather only long or only short rows. Grouping
    does not change how the objective weighs rows: a step's loss divides every micro-batch's sum by
    the whole step's items (:func:`kdray.train.step.step_items`), not by each micro-batch's own.

    Args:
        windows: dicts of columns (numpy arrays of equal length ``n``, ragged columns as object
            arrays of 1-D arrays, as Ray Data's ``iter_batches(batch_format="numpy")`` gives them).
        micro_batch_size: rows per micro-batch (``training.micro_batch_size_per_worker``).
        seed: seed of the micro-batches' order (any int; the worker passes the pass's
            :func:`kdray.train.worker.shuffle_seed`).

    Yields:
        Dicts of the same columns with ``micro_batch_size`` rows each (numpy, uncollated: the
        worker collates them with :class:`kdray.data.examples.CollateExamples`).

    Raises:
        ValueError: ``micro_batch_size`` is below 1.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    rng = np.random.default_rng(seed % 2**64)
    for window in windows:
        lengths = row_lengths(window)
        kept = len(lengths) - len(lengths) % micro_batch_size
        if kept == 0:
            continue
        order = np.argsort(-lengths[:kept], kind="stable")  # longest first
        chunks = order.reshape(-1, micro_batch_size)
        for c in rng.permutation(len(chunks)):
            yield {k: _take(v, chunks[c]) for k, v in window.items()}


def pad_fraction(micro_batches: Iterable[dict[str, Any]]) -> float:
    """The share of padding when every micro-batch is padded to its own longest row (both sides of
    a DistiLLM-2 row to that length, as :class:`kdray.data.examples.CollateExamples` does): 1 −
    real tokens / positions, the ``pad_fraction`` a training step reports, computed on the compact
    examples without collating them."""
    positions = real = 0
    for batch in micro_batches:
        sides = [batch[c] for c in LENGTH_COLUMNS if c in batch]
        length = max(len(ids) for side in sides for ids in side)
        positions += length * sum(len(side) for side in sides)
        real += sum(len(ids) for side in sides for ids in side)
    return 1.0 - real / max(positions, 1)


def _take(column: Any, index: np.ndarray) -> Any:
    if isinstance(column, np.ndarray):
        return column[index]
    return [column[i] for i in index]
