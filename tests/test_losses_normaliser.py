"""``num_items_in_batch``: one normaliser for the whole optimizer step.

The property (float64): split a batch into micro-batches -- any split, micro-batches
with zero items included -- compute each piece's reduced loss with the *whole* batch's
``num_items_in_batch`` and sum them: that is the whole batch's value and gradient, for
both reductions, ``kd_objective`` (KD and CE parts), ``distillm2_loss``, the sparse path
and the fused path. Without it (each piece normalised by its own items and the pieces
averaged, as a data-parallel engine does) short responses are over-weighted.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdray.losses as L

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

V, T, HS, HT, K = 5, 36, 3, 4, 2
LENGTHS = [36, 30, 2, 3, 0]  # the responses, plus an empty one
B = len(LENGTHS)
SPLITS = [
    [[0, 1], [2, 3], [4]],  # [4] has no item
    [[4, 2], [], [0], [3, 1]],  # any order, an empty micro-batch
    [[0], [1], [2], [3], [4]],
]
REDUCTIONS = ("token_mean", "sequence_mean")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def make_mask(lengths=LENGTHS, offset=0):
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, T - n - offset: T - offset] = True  # responses after a prompt, left of right padding
    return mask


MASK = make_mask()


def grad_of(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def check_splits(loss, leaves, items, *, rtol=1e-12):
    """``loss(leaves, idx, n)`` on the rows ``idx``; pieces with the whole ``items`` add up."""
    every = list(range(B))
    whole, whole_grads = grad_of(lambda *ls: loss(ls, every, None), *leaves)
    for split in SPLITS:
        value, grads = grad_of(lambda *ls: sum(loss(ls, idx, items) for idx in split), *leaves)
        torch.testing.assert_close(value, whole, rtol=rtol, atol=1e-14, msg=str(split))
        for g, w in zip(grads, whole_grads):
            torch.testing.assert_close(g, w, rtol=rtol, atol=1e-14, msg=str(split))
    return whole


def step_items(mask, reduction):
    """What the trainer does: sum each micro-batch's items over the split."""
    n = L.num_items(mask, reduction)
    for split in SPLITS:
        assert sum(L.num_items(mask[idx], reduction) for idx in split) == n
    return n


def test_num_items_counts_tokens_and_nonempty_sequences():
    assert L.num_items(MASK, "token_mean") == sum(LENGTHS) == 71
    assert L.num_items(MASK.long() * 3, "sequence_mean") == 4
    assert L.num_items(torch.zeros(0, T), "sequence_mean") == 0
    assert L.num_items(MASK.reshape(-1), "token_mean") == 71  # [N] masks of the fused path
    for bad, match in [((MASK, "sum"), "reduction"), ((MASK.reshape(-1), "sequence_mean"), r"\[B, T\]"),
                       (([1, 0], "token_mean"), "tensor")]:
        with pytest.raises(ValueError, match=match):
            L.num_items(*bad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_num_items_in_batch_is_the_divisor(reduction):
    x = torch.randn(B, T, generator=_g(0), dtype=F64)
    if reduction == "token_mean":
        total = sum(float(x[b, T - n:].sum()) for b, n in enumerate(LENGTHS) if n)
    else:
        total = sum(float(x[b, T - n:].mean()) for b, n in enumerate(LENGTHS) if n)
    own = 71 if reduction == "token_mean" else 4
    assert math.isclose(float(L.reduce_per_token(x, MASK, reduction)), total / own, rel_tol=1e-12)
    for n, divisor in [(100, 100), (7.5, 7.5), (torch.tensor(9), 9), (torch.tensor(9.0, dtype=F64), 9),
                       (0, 1), (0.25, 1), (-3, 1), (torch.tensor(0), 1)]:
        got = float(L.reduce_per_token(x, MASK, reduction, n))
        assert math.isclose(got, total / divisor, rel_tol=1e-12), n
    # a micro-batch with no item: 0 with a zero gradient, whatever the step's count
    value, (grad,) = grad_of(lambda y: L.reduce_per_token(y, torch.zeros_like(MASK), reduction, 50), x)
    assert float(value) == 0.0 and bool((grad == 0).all())
    for bad in [True, "3", [3], torch.tensor([3]), math.nan, math.inf, torch.tensor(True)]:
        with pytest.raises(ValueError, match="num_items_in_batch"):
            L.reduce_per_token(x, MASK, reduction, bad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_add_up_over_micro_batches(reduction):
    x = torch.randn(B, T, generator=_g(1), dtype=F64)
    n = step_items(MASK, reduction)
    whole = check_splits(lambda ls, idx, items: L.reduce_per_token(ls[0][idx], MASK[idx], reduction, items), [x], n)
    # the fault being fixed: each micro-batch normalised by its own items, then averaged
    pieces = [L.reduce_per_token(x[idx], MASK[idx], reduction) for idx in ([0, 1, 2], [3, 4])]
    assert not math.isclose(float(sum(pieces)) / 2, float(whole), rel_tol=1e-3)


@pytest.mark.parametrize("kd_ratio", [0.7, 0.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_objective_adds_up_over_micro_batches(reduction, kd_ratio):
    s = torch.randn(B, T, V, generator=_g(2), dtype=F64)
    t = torch.randn(B, T, V, generator=_g(3), dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=_g(4))
    labels[0, -5:] = L.IGNORE_INDEX  # CE's items differ from KD's
    labels[2, :] = L.IGNORE_INDEX  # a sequence with KD items but no CE item
    n_kd = step_items(MASK, reduction)
    n_ce = step_items(MASK & (labels != L.IGNORE_INDEX), reduction)
    assert n_ce < n_kd

    def loss(part):
        def fn(ls, idx, items):
            out, parts = L.kd_objective(
                ls[0][idx], t[idx], mask=MASK[idx], divergence="jsd", divergence_kwargs={"beta": 0.4},
                kd_ratio=kd_ratio, kd_temperature=2.0, labels=labels[idx], reduction=reduction,
                num_items_in_batch=None if items is None else n_kd,
                ce_num_items_in_batch=None if items is None else n_ce)
            return out if part == "loss" else parts[part]
        return fn

    check_splits(loss("loss"), [s], n_kd)
    for part in ("kd", "ce"):  # the logged parts add up too (they carry no gradient)
        whole = loss(part)([s], list(range(B)), None)
        for split in SPLITS:
            torch.testing.assert_close(sum(loss(part)([s], idx, True) for idx in split), whole, rtol=1e-12, atol=0)


def test_kd_objective_needs_the_ce_items_with_the_kd_items():
    """The CE term's items (mask & labels != -100) differ from the KD term's where a label is
    -100 inside the mask: one count for both would silently divide CE by the wrong number."""
    s = torch.randn(B, T, V, generator=_g(5), dtype=F64)
    t = torch.randn(B, T, V, generator=_g(6), dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=_g(7))
    labels[0, :3] = -100
    with pytest.raises(ValueError, match="pass ce_num_items_in_batch too"):
        L.kd_objective(s, t, mask=MASK, divergence="forward_kl", kd_ratio=0.5, labels=labels, num_items_in_batch=200)
    ce_keep = MASK & (labels != -100)
    _, parts = L.kd_objective(s, t, mask=MASK, divergence="forward_kl", kd_ratio=0.5, labels=labels,
                              num_items_in_batch=200, ce_num_items_in_batch=150)
    ce_sum = -torch.log_softmax(s, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[ce_keep].sum()
    torch.testing.assert_close(parts["ce"], ce_sum / 150, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distillm2_loss_adds_up_over_micro_batches(reduction):
    s1, t1, s2, t2 = (torch.randn(B, T, V, generator=_g(10 + i), dtype=F64) for i in range(4))
    mask2 = make_mask([3, 0, 20, 7, 1], offset=2)
    items = (step_items(MASK, reduction), step_items(mask2, reduction))

    def loss(ls, idx, n):
        return L.distillm2_loss(ls[0][idx], t1[idx], MASK[idx], ls[1][idx], t2[idx], mask2[idx], beta=0.6,
                                skl_alpha=0.1, srkl_alpha=torch.linspace(0.1, 0.5, B, dtype=F64)[idx],
                                detach_mixture_student=False, reduction=reduction, num_items_in_batch=n)[0]

    check_splits(loss, [s1, s2], items)
    with pytest.raises(ValueError, match="pair"):
        loss([s1, s2], list(range(B)), 5)


@pytest.mark.parametrize("kind,kw", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("adaptive_kl", {})])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_path_adds_up_over_micro_batches(reduction, kind, kw):
    s = torch.randn(B, T, V, generator=_g(20), dtype=F64)
    lp = torch.log_softmax(torch.randn(B, T, V, generator=_g(21), dtype=F64), -1)
    ids = lp.topk(K, dim=-1).indices
    n = step_items(MASK, reduction)

    def loss(ls, idx, items):
        per_token = L.sparse_divergence(kind, ls[0][idx], ids[idx], lp.gather(-1, ids)[idx], mask=MASK[idx], **kw)
        return L.reduce_per_token(per_token, MASK[idx], reduction, items)

    check_splits(loss, [s], n)


@pytest.mark.parametrize(
    "kind,kw", [("forward_kl", {}), ("skew_reverse_kl", {"alpha": 0.2, "detach_mixture_student": False})])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_path_adds_up_over_micro_batches(reduction, kind, kw):
    g = _g(30)
    hs, ws = torch.randn(B, T, HS, generator=g, dtype=F64), torch.randn(V, HS, generator=g, dtype=F64)
    ht, wt = torch.randn(B, T, HT, generator=g, dtype=F64), torch.randn(V, HT, generator=g, dtype=F64)
    n = step_items(MASK, reduction)

    def loss(ls, idx, items):
        return L.fused_linear_divergence(ls[0][idx], ls[1], ht[idx], wt, divergence=kind, reduction=reduction,
                                         mask=MASK[idx], chunk_size=7, num_items_in_batch=items, **kw)

    check_splits(loss, [hs, ws], n)
    if reduction == "token_mean":
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[1, -4:] = L.IGNORE_INDEX
        n_ce = step_items(MASK & (labels != L.IGNORE_INDEX), "token_mean")
        check_splits(lambda ls, idx, items: L.fused_linear_cross_entropy(
            ls[0][idx], ls[1], labels[idx], mask=MASK[idx], chunk_size=5, num_items_in_batch=items), [hs, ws], n_ce)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fused_rejects_num_items_for_none_and_sum(reduction):
    h, w = torch.randn(2, 3, HS, dtype=F64), torch.randn(V, HS, dtype=F64)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        L.fused_linear_divergence(h, w, h, w, divergence="tvd", reduction=reduction, num_items_in_batch=4)
