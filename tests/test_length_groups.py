"""``training.group_by_length``: micro-batches of rows of similar length
(:mod:`kdray.data.length_groups`), and the worker's pass over a real Ray Data iterator with it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdray.data.length_groups import group_by_length, pad_fraction, row_lengths

B = 4  # rows per micro-batch


def rows_of(lengths, s_lengths=None):
    """Compact examples: row i's ids start with its id ``1000 + i``, then ``length - 1`` ones."""
    out = {"input_ids": _ragged([[1000 + i] + [1] * (n - 1) for i, n in enumerate(lengths)]),
           "prompt_len": np.ones(len(lengths), dtype=np.int32)}
    if s_lengths is not None:
        out["s_input_ids"] = _ragged([[2000 + i] + [1] * (n - 1) for i, n in enumerate(s_lengths)])
        out["s_prompt_len"] = np.ones(len(lengths), dtype=np.int32)
    return out


def _ragged(seqs):
    out = np.empty(len(seqs), dtype=object)
    out[:] = [np.asarray(s, dtype=np.int32) for s in seqs]
    return out


def chunks(rows, size):
    """The stream in chunks of ``size`` rows, as ``iter_batches(batch_size=size)`` gives it."""
    n = len(rows["input_ids"])
    return [{k: v[i:i + size] for k, v in rows.items()} for i in range(0, n, size)]


def ids(batch):
    return [int(x[0]) - 1000 for x in batch["input_ids"]]


def mixed_lengths(n, seed=0):
    return np.random.default_rng(seed).integers(8, 97, size=n).tolist()


def grouped(rows, *, group=8, seed=0, chunk=B):
    return list(group_by_length(chunks(rows, chunk), B, group, seed=seed))


def test_every_row_once_in_micro_batches_of_the_configured_size():
    rows = rows_of(mixed_lengths(64))
    out = grouped(rows)
    assert [len(b["input_ids"]) for b in out] == [B] * 16
    assert sorted(i for b in out for i in ids(b)) == list(range(64))
    assert all(len(b["prompt_len"]) == B for b in out)  # every column follows its rows


def test_a_short_last_window_drops_only_the_stream_last_partial_micro_batch():
    n = 8 * B + 2 * B + 3  # a full window, then 11 rows
    out = grouped(rows_of(mixed_lengths(n)))
    assert len(out) == n // B  # as many micro-batches as drop_last gives without grouping
    assert sorted(i for b in out for i in ids(b)) == list(range(n - 3))  # the stream's last 3 rows dropped


def test_micro_batches_hold_neighbouring_lengths():
    rows = rows_of(mixed_lengths(32))
    out = grouped(rows, group=8)
    spans = sorted((min(row_lengths(b)), max(row_lengths(b))) for b in out)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # no two micro-batches overlap


def test_grouping_cuts_padding():
    rows = rows_of(mixed_lengths(256))
    plain = [{k: v[i:i + B] for k, v in rows.items()} for i in range(0, 256, B)]  # the stream's order
    without, with_groups = pad_fraction(plain), pad_fraction(grouped(rows))
    assert with_groups < without
    assert with_groups < 0.5 * without  # lengths 8..96 at random: most of the padding goes


def test_pad_fraction_counts_padded_positions():
    batch = rows_of([2, 4])
    assert pad_fraction([batch]) == pytest.approx(1 - 6 / 8)
    two_sided = rows_of([2, 4], s_lengths=[8, 2])  # both sides padded to 8
    assert pad_fraction([two_sided]) == pytest.approx(1 - 16 / 32)


def test_the_order_comes_from_the_seed():
    rows = rows_of(mixed_lengths(128))
    first, again, other = grouped(rows, seed=3), grouped(rows, seed=3), grouped(rows, seed=4)
    assert [ids(b) for b in first] == [ids(b) for b in again]
    assert [ids(b) for b in first] != [ids(b) for b in other]
    # another seed orders the same micro-batches differently (the groups are the window's)
    assert sorted(map(sorted, map(ids, first))) == sorted(map(sorted, map(ids, other)))


def test_resume_skipping_k_micro_batches_gives_the_same_rest():
    rows = rows_of(mixed_lengths(96))
    full = [ids(b) for b in grouped(rows, seed=11)]
    k = 5  # a checkpoint after 5 micro-batches, inside the first window
    resumed = [ids(b) for b in itertools.islice(group_by_length(chunks(rows, B), B, 8, seed=11), k, None)]
    assert resumed == full[k:] and len(resumed) == len(full) - k


def test_distillm2_rows_group_by_their_longer_side():
    teacher = [10] * 16                                  # alone, no grouping to do
    student = mixed_lengths(16, seed=5)                  # the student's responses decide
    rows = rows_of(teacher, s_lengths=student)
    assert row_lengths(rows).tolist() == [max(a, b) for a, b in zip(teacher, student)]
    out = list(group_by_length([rows], B, 4, seed=0))
    longer = np.maximum(teacher, student)
    expected = sorted(sorted(chunk) for chunk in np.argsort(-longer, kind="stable").reshape(-1, B).tolist())
    assert sorted(sorted(ids(b)) for b in out) == expected
    assert all((b["s_input_ids"][j][0] - 2000) == i for b in out for j, i in enumerate(ids(b)))  # sides stay paired
    plain = [{k: v[i:i + B] for k, v in rows.items()} for i in range(0, 16, B)]
    assert pad_fraction(out) < pad_fraction(plain)


def test_windows_come_from_the_rows_not_from_how_the_stream_is_chunked():
    rows = rows_of(mixed_lengths(101))
    sizes = np.random.default_rng(2).integers(1, 14, size=40)  # chunks of 1..13 rows, as Ray may give
    cuts = np.cumsum(sizes)[np.cumsum(sizes) < 101]
    ragged_chunks = [{k: v[a:b] for k, v in rows.items()} for a, b in zip([0, *cuts], [*cuts, 101])]
    expected = [ids(b) for b in grouped(rows, seed=9)]
    assert [ids(b) for b in group_by_length(ragged_chunks, B, 8, seed=9)] == expected
    assert [ids(b) for b in grouped(rows, seed=9, chunk=101)] == expected


def test_a_chunk_of_equal_lengths_as_a_2d_array_mixes_with_ragged_ones():
    ragged = rows_of([3, 9, 4, 8])
    flat = {"input_ids": np.array([[1004, 1, 1, 1, 1], [1005, 1, 1, 1, 1]], dtype=np.int32),
            "prompt_len": np.ones(2, dtype=np.int32)}  # how Ray Data gives a chunk whose rows have one length
    out = list(group_by_length([ragged, flat], 2, 3, seed=0))
    assert sorted(sorted(ids(b)) for b in out) == [[0, 2], [1, 3], [4, 5]]  # by length: 9 8 | 5 5 | 4 3
    assert all(b["prompt_len"].dtype == np.int32 and b["input_ids"].dtype == object for b in out)


def test_list_columns_and_bad_sizes():
    rows = {"input_ids": [[1] * n for n in (3, 9, 4, 8)], "prompt_len": [1, 1, 1, 1]}
    out = list(group_by_length([rows], 2, 2, seed=0))
    assert sorted(len(b["input_ids"][0]) for b in out) == [4, 9]  # (9, 8) and (4, 3)
    for size, group in ((0, 2), (2, 0)):
        with pytest.raises(ValueError, match="must be at least 1"):
            list(group_by_length([rows], size, group, seed=0))


# ----------------------------------------------------------------------------- the worker's pass


def test_the_worker_pass_over_a_ray_data_iterator_groups_by_length(ray_cpus):
    """Through Ray Data's iterator with its local shuffle, over 13 blocks: the same rows as without
    grouping (the off path's drop_last drops 2 of the 122), fewer padded positions, and the same
    micro-batches again for the same seed. (Asked for 40-row batches here, Ray 2.60's local
    shuffle gives 40, 40, 24, 18: windows taken from Ray as they come lost 5 rows.)"""
    import ray

    from kdray.data.examples import CollateExamples
    from kdray.spec import TrainingSpec
    from kdray.train.worker import micro_batches

    n, mb = 122, 5
    lengths = mixed_lengths(n, seed=1)
    items = [{"input_ids": np.asarray([1000 + i] + [1] * (m - 1), dtype=np.int32), "prompt_len": 1}
             for i, m in enumerate(lengths)]
    shard = ray.data.from_items(items, override_num_blocks=13).iterator()
    collate = CollateExamples(pad_id=0)

    def run(group: bool, seed: int = 7):
        t = TrainingSpec(num_workers=1, global_batch_size=mb, micro_batch_size_per_worker=mb,
                         group_by_length=group, length_group_size=8)
        out = []
        for batch in micro_batches(shard, t, seed, collate):
            mask = batch["attention_mask"]
            out.append(([int(x) - 1000 for x in batch["input_ids"][:, 0]], mask.numel(), int(mask.sum())))
        return out

    plain, on, again = run(False), run(True), run(True)
    assert len(on) == len(plain) == n // mb
    assert sorted(i for rows, _, _ in on for i in rows) == sorted(i for rows, _, _ in plain for i in rows)
    assert len({i for rows, _, _ in on for i in rows}) == n - n % mb
    pad = [1 - sum(real for *_, real in r) / sum(pos for _, pos, _ in r) for r in (plain, on)]
    assert pad[1] < 0.5 * pad[0]
    assert on == again  # the same seed, the same micro-batches: what a resumed worker skips through
