"""Length-grouped micro-batches: ``training.group_by_length``.

Each micro-batch is padded to its own longest row (:class:`kdray.data.examples.CollateExamples`);
a short row next to a long one is still mostly padding. Grouping rows of similar length into the
same micro-batch cuts that padding further. The idea is Hugging Face transformers'
``group_by_length`` training argument (its ``LengthGroupedSampler``: "megabatches" of 50 × the
batch size, each sorted by length). kdray applies it to a stream, one window of rows at a time,
since a worker reads its shard of the data set as it goes and never holds all of it.

:func:`group_by_length` is pure (numpy only): the Ray Train worker feeds it the batches its
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


def group_by_length(batches: Iterable[dict[str, Any]], micro_batch_size: int, group_size: int, *,
                    seed: int) -> Iterator[dict[str, Any]]:
    """Micro-batches of rows of similar length, one window of the stream at a time.

    The rows of ``batches`` (chunks of the stream of any sizes) are gathered into windows of
    ``group_size × micro_batch_size`` rows in stream order. Each window's rows are sorted by
    :func:`row_lengths`, longest first (ties keep stream order), cut into micro-batches of
    ``micro_batch_size`` rows, and those are yielded in a random order. The stream's last window
    may be short: its first ``micro_batch_size × ⌊n / micro_batch_size⌋`` rows are grouped and the
    rest is dropped, as ``drop_last`` drops the stream's last partial micro-batch; so a pass yields
    ⌊rows / micro_batch_size⌋ micro-batches from the same rows as without grouping, each row in
    exactly one of them. The windows and their order depend only on the rows' order and ``seed``,
    not on how the stream is chunked: the same rows with the same seed give the same micro-batches
    in the same order, so a resumed worker that skips the micro-batches it trained before its
    checkpoint lands on the same rows.

    Unlike Hugging Face's ``LengthGroupedSampler``, which yields a megabatch's batches from the
    longest to the shortest, the micro-batches of a window are shuffled, so an optimizer step
    (its gradient-accumulation micro-batches) does not gather only long or only short rows. Grouping
    does not change how the objective weighs rows: a step's loss divides every micro-batch's sum by
    the whole step's items (:func:`kdray.train.step.step_items`), not by each micro-batch's own.

    Args:
        batches: dicts of columns, one item per row: numpy arrays (ragged columns as object
            arrays of 1-D arrays, or a 2-D array when a chunk's rows have one length) or lists,
            as Ray Data's ``iter_batches(batch_format="numpy")`` gives them.
        micro_batch_size: rows per micro-batch (``training.micro_batch_size_per_worker``).
        group_size: micro-batches per window (``training.length_group_size``); 1 groups nothing.
        seed: seed of the micro-batches' order (any int; the worker passes the pass's
            :func:`kdray.train.worker.shuffle_seed`).

    Yields:
        Dicts of the same columns with ``micro_batch_size`` rows each, uncollated (numeric
        scalar columns as numpy arrays, the others as object arrays of the rows' items): the worker
        collates them with :class:`kdray.data.examples.CollateExamples`.

    Raises:
        ValueError: ``micro_batch_size`` or ``group_size`` is below 1.
    """
    if micro_batch_size < 1 or group_size < 1:
        raise ValueError(f"micro_batch_size and group_size must be at least 1, got {micro_batch_size} and {group_size}")
    rng = np.random.default_rng(seed % 2**64)
    window = micro_batch_size * group_size
    pending: dict[str, list[Any]] = {}  # the rows not yet in a window, per column
    for batch in batches:
        for column, values in batch.items():
            pending.setdefault(column, []).extend(values)  # a 2-D array extends by its rows
        while _n_rows(pending) >= window:
            yield from _grouped(_cut(pending, window), micro_batch_size, rng)
    n = _n_rows(pending)
    yield from _grouped(_cut(pending, n - n % micro_batch_size), micro_batch_size, rng)


def _n_rows(columns: dict[str, list[Any]]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _cut(pending: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    """The first ``n`` pending rows, taken out of ``pending``."""
    out = {column: values[:n] for column, values in pending.items()}
    for values in pending.values():
        del values[:n]
    return out


def _grouped(rows: dict[str, list[Any]], micro_batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """One window (a multiple of ``micro_batch_size`` rows) → its micro-batches, in ``rng``'s order."""
    if _n_rows(rows) == 0:
        return
    order = np.argsort(-row_lengths(rows), kind="stable")  # longest first
    chunks = order.reshape(-1, micro_batch_size)
    for c in rng.permutation(len(chunks)):
        yield {column: _stack([values[i] for i in chunks[c]]) for column, values in rows.items()}


def _stack(items: list[Any]) -> np.ndarray:
    """A micro-batch's column: numeric scalars as a numpy array, anything else (a row's token
    ids, a teacher record's bytes, a string) as an object array of the items."""
    if all(isinstance(x, (int, float, np.number, np.bool_)) for x in items):
        return np.asarray(items)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # one item per slot, whatever its shape
        out[i] = item
    return out


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

