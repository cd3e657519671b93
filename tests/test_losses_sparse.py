"""Sparse (top-k + tail bucket) teacher signal: kdray.losses.sparse_*."""

from __future__ import annotations

import pytest
import torch

import kdray.losses as L

F64 = torch.float64
KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2, "detach_mixture_student": True}),
    ("skew_reverse_kl", {"alpha": 0.2, "detach_mixture_student": False}),
    ("jsd", {"beta": 0.5}),
    ("tvd", {}),
    ("adaptive_kl", {"mu": 0.5}),
]
IDS = [f"{k}-{kw}" for k, kw in KINDS]


# The tensors here are tiny: run single-threaded (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(b=2, t=3, v=12, k=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).to(dtype)
    teacher = torch.randn(b, t, v, generator=g, dtype=F64) * 2
    lp = torch.log_softmax(teacher, -1)
    topk_lp, topk_ids = lp.topk(k, dim=-1)
    return student, teacher, topk_ids, topk_lp


def _bucket_reference(student, topk_ids, topk_lp, temperature=1.0):
    """Dense-over-buckets distributions, from plain probabilities (no log-sum-exp tricks)."""
    q = torch.softmax(student.double() / temperature, -1)
    q_top = q.gather(-1, topk_ids)
    p_top = topk_lp.double().exp()
    p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return p_b, q_b


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_sparse_fkl_is_exact_kl_over_buckets(temperature):
    student, _, ids, lp = _setup()
    student.requires_grad_(True)
    got = L.sparse_forward_kl(student, ids, lp, temperature=temperature)
    p_b, q_b = _bucket_reference(student, ids, lp, temperature)
    want = (p_b * (p_b.log() - q_b.log())).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), student)[0]
    g_want = torch.autograd.grad(want.sum(), student)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)
    # explicit tail mass gives the same answer
    tail = 1 - lp.exp().sum(-1)
    explicit = L.sparse_forward_kl(student, ids, lp, temperature=temperature, teacher_tail_mass=tail)
    torch.testing.assert_close(explicit, got)


@pytest.mark.parametrize("kind,kw", KINDS, ids=IDS)
def test_k_equals_v_matches_dense(kind, kw):
    student, teacher, ids, lp = _setup(k=12)
    student.requires_grad_(True)
    got = L.sparse_divergence(kind, student, ids, lp, temperature=1.3, **kw)
    # the teacher's top-V log-probs came from temperature 1: compare with the dense
    # divergence whose teacher is at temperature 1 too, i.e. teacher logits * 1.3
    want = L.DIVERGENCES[kind](student, teacher * 1.3, temperature=1.3, **kw)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    g_got = torch.autograd.grad(got.sum(), student)[0]
    g_want = torch.autograd.grad(want.sum(), student)[0]
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind,kw", KINDS, ids=IDS)
def test_bucket_value_lower_bounds_dense(kind, kw):
    """Data-processing inequality for the f-divergences; AKL mixes two of them."""
    student, teacher, ids, lp = _setup(k=3, v=20, seed=4)
    sparse = L.sparse_divergence(kind, student, ids, lp, **kw)
    dense = L.DIVERGENCES[kind](student, teacher, **kw)
    assert torch.isfinite(sparse).all() and (sparse >= -1e-12).all()
    if kind != "adaptive_kl":
        assert (sparse <= dense + 1e-10).all()
    assert (sparse < dense - 1e-6).any()  # it is an approximation, not the dense value


def test_per_sample_alpha_sparse():
    student, _, ids, lp = _setup(b=3)
    a = torch.tensor([0.0, 0.3, 0.8], dtype=F64)
    got = L.sparse_divergence("skew_forward_kl", student, ids, lp, alpha=a)
    for b in range(3):
        one = slice(b, b + 1)
        row = L.sparse_divergence("skew_forward_kl", student[one], ids[one], lp[one], alpha=float(a[b]))
        torch.testing.assert_close(got[b], row[0])
    torch.testing.assert_close(got[0], L.sparse_forward_kl(student, ids, lp)[0])


def test_tiny_student_tail_is_stable():
    """Student puts ~1e-40 on its tail: logsumexp keeps it finite where 1 - Σq rounds to 0."""
    v, k = 10, 3
    student = torch.full((1, 1, v), -90.0)
    student[..., :k] = 0.0
    ids = torch.arange(k).view(1, 1, k)
    lp = torch.log(torch.tensor([0.5, 0.3, 0.1])).view(1, 1, k)
    student.requires_grad_(True)
    got = L.sparse_forward_kl(student, ids, lp)
    s64 = student.detach().double()
    log_q_tail = torch.logsumexp(torch.log_softmax(s64, -1)[..., k:], -1)
    q_top = torch.log_softmax(s64, -1)[..., :k]
    p_top = lp.double()
    want = (p_top.exp() * (p_top - q_top)).sum(-1) + 0.1 * (torch.log(torch.tensor(0.1, dtype=F64)) - log_q_tail)
    assert torch.isfinite(got).all() and got.item() > 8.0  # ~0.1 * 88: the tail term dominates
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(torch.autograd.grad(got.sum(), student)[0]).all()


def test_neg_inf_slot_is_padding():
    """A -inf slot (fewer than k tokens recorded) equals dropping it, whatever its id."""
    student, _, ids, lp = _setup(k=4)
    ids_pad, lp_pad = ids.clone(), lp.clone()
    lp_pad[..., -1] = float("-inf")
    ids_pad[..., -1] = ids[..., 0]  # padding slots often repeat an id
    for kind, kw in KINDS:
        got = L.sparse_divergence(kind, student, ids_pad, lp_pad, **kw)
        want = L.sparse_divergence(kind, student, ids[..., :3], lp[..., :3], **kw)
        torch.testing.assert_close(got, want, msg=kind)


def test_neg_inf_slots_and_padded_vocab():
    student, _, ids, lp = _setup(k=4)
    lp = lp.clone()
    lp[..., -1] = float("-inf")  # an unused top-k slot
    pad = torch.full(student.shape[:-1] + (3,), float("-inf"), dtype=F64)
    sp = torch.cat([student, pad], -1).requires_grad_(True)
    for kind, kw in KINDS:
        v = L.sparse_divergence(kind, sp, ids, lp, **kw)
        g = torch.autograd.grad(v.sum(), sp)[0]
        assert torch.isfinite(v).all() and torch.isfinite(g).all(), kind


def test_bf16_student():
    student, _, ids, lp = _setup(v=64, k=8)
    got = L.sparse_forward_kl(student.bfloat16(), ids, lp.float())
    assert got.dtype == torch.float32
    want = L.sparse_forward_kl(student.bfloat16().double(), ids, lp)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s, i, l: (s, i.int(), l, None), "long"),
        (lambda s, i, l: (s, i + 100, l, None), r"\[0, 12\)"),
        (lambda s, i, l: (s, i, l[..., :2], None), "match"),
        (lambda s, i, l: (s, i[:1], l[:1], None), "shape"),
        (lambda s, i, l: (s, i, l, torch.full(s.shape[:-1], 1.5, dtype=F64)), "teacher_tail_mass"),
    ],
)
def test_sparse_validation(mutate, match):
    student, _, ids, lp = _setup()
    s, i, lp2, tail = mutate(student, ids, lp)
    with pytest.raises(ValueError, match=match):
        L.sparse_forward_kl(s, i, lp2, teacher_tail_mass=tail)
    with pytest.raises(ValueError, match="divergence"):
        L.sparse_divergence("kl", student, ids, lp)
