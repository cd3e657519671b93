"""Masked positions are inert: whatever they hold, they add exactly 0 to value and gradient.

For every divergence (+ CE) and every path that takes a mask -- dense (``kd_objective``,
``distillm2_loss``), sparse top-k (``sparse_divergence(mask=)``) and fused
(``fused_linear_divergence`` / ``fused_linear_cross_entropy``) -- the masked positions
are poisoned with NaN, +inf, -inf or 1e30 garbage on the student's side, the teacher's
or both. The value and the gradients must equal, bit for bit, those of the same input
with ordinary numbers there, match a float64 reference computed here from the plain
formulas on the kept positions only, and the masked positions' gradient must be 0.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdray.losses as L

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

B, T, V, K, HS, HT = 2, 5, 7, 3, 4, 3
MASK = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)  # interior and trailing holes
POISONS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "garbage": 1e30}
SIDES = ("student", "teacher", "both")
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2, "detach_mixture_student": True}),
    ("skew_reverse_kl", {"alpha": 0.2, "detach_mixture_student": False}),
    ("jsd", {"beta": 0.3}),
    ("tvd", {}),
    ("adaptive_kl", {"mu": 0.5}),
]
IDS = [f"{k}-{kw.get('detach_mixture_student', '')}" for k, kw in CASES]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def poisoned(x: torch.Tensor, value: float, keep: torch.Tensor = MASK) -> torch.Tensor:
    """``x`` with every masked position's row set to ``value`` (1e30: alternating signs)."""
    x = x.detach().clone()
    row = torch.full(x.shape[keep.dim():], value, dtype=x.dtype)
    if value == 1e30:
        row = row * torch.tensor([(-1.0) ** i for i in range(row.numel())], dtype=x.dtype).reshape(row.shape)
    x[~keep] = row
    return x


def other_numbers(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with ordinary (different) numbers at the masked positions."""
    x = x.detach().clone()
    x[~MASK] = torch.randn(x[~MASK].shape, generator=_g(seed), dtype=x.dtype) * 3
    return x


# ------------------------------------------------------------------ float64 reference


def ref_div(kind: str, kw: dict, p: torch.Tensor, q: torch.Tensor, tail_bucket: bool = False) -> torch.Tensor:
    """Divergence per row from probabilities ``p`` (teacher), ``q`` (student) ``[n, K]``."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "skew_forward_kl":
        a = kw["alpha"]
        return kl(p, a * p + (1 - a) * q)
    if kind == "skew_reverse_kl":
        a = kw["alpha"]
        q_mix = q.detach() if kw["detach_mixture_student"] else q
        return kl(q, (1 - a) * p + a * q_mix)
    if kind == "jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "adaptive_kl":
        weights = []
        for pr, qr in zip(p.detach(), q.detach()):
            n = len(pr) - 1 if tail_bucket else len(pr)
            order = sorted(range(n), key=lambda i: -float(pr[i]))
            head, cum = set(), 0.0
            for rank, i in enumerate(order):
                cum += float(pr[i])
                if cum <= kw["mu"] or rank == 0:
                    head.add(i)
            gaps = [abs(float(pr[i] - qr[i])) for i in range(len(pr))]
            g_head = sum(gaps[i] for i in head)
            weights.append(g_head / sum(gaps))
        w = torch.tensor(weights, dtype=p.dtype)
        return w * kl(p, q) + (1 - w) * kl(q, p)
    raise KeyError(kind)


def ref_reduce(values: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """``values`` holds one entry per kept position, in ``keep``'s row-major order."""
    if reduction == "token_mean":
        return values.sum() / len(values)
    per_seq, start = [], 0
    for row in keep:
        n = int(row.sum())
        if n:
            per_seq.append(values[start: start + n].sum() / n)
        start += n
    return sum(per_seq) / len(per_seq)


def ref_ce(s_kept: torch.Tensor, labels_kept: torch.Tensor) -> torch.Tensor:
    log_z = s_kept.exp().sum(-1).log()
    return log_z - s_kept[torch.arange(len(labels_kept)), labels_kept]


def grad_of(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def check_inert(got, clean, want, *, what: str, keeps=None) -> None:
    """``got``/``clean``/``want`` are ``(value, [grads])``; the masked rows of the ``[B, T, ·]``
    gradients (``keeps``: one mask per gradient, default ``MASK``) must be 0."""
    (v, gs), (v_clean, gs_clean), (v_ref, gs_ref) = got, clean, want
    assert torch.isfinite(v), what
    assert torch.equal(v, v_clean), what
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12, msg=what)
    for i, (g, g_clean, g_ref) in enumerate(zip(gs, gs_clean, gs_ref)):
        assert torch.isfinite(g).all(), f"{what}: grad {i} not finite"
        assert torch.equal(g, g_clean), f"{what}: grad {i} differs from the clean input's"
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12, msg=f"{what}: grad {i}")
        keep = MASK if keeps is None else keeps[i]
        if g.shape[:2] == keep.shape:
            assert bool((g[~keep] == 0).all()), f"{what}: masked positions got a gradient"


# ------------------------------------------------------------------ dense


def dense_inputs(seed=0):
    s = torch.randn(B, T, V, generator=_g(seed), dtype=F64) * 2
    t = torch.randn(B, T, V, generator=_g(seed + 1), dtype=F64) * 2
    labels = torch.randint(0, V, (B, T), generator=_g(seed + 2))
    labels[0, 3] = L.IGNORE_INDEX  # a kept position that CE ignores
    labels[~MASK] = torch.tensor([10**6, -7, V, -100])  # garbage labels where masked
    return s, t, labels


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_kd_objective_masked_positions_are_inert(kind, kw):
    s, t, labels = dense_inputs()
    temp, ratio = 1.5, 0.6
    ce_keep = MASK & (labels != L.IGNORE_INDEX)
    for reduction in ("token_mean", "sequence_mean"):
        def run(s_, t_):
            return grad_of(lambda x: L.kd_objective(
                x, t_, mask=MASK.long(), divergence=kind, kd_ratio=ratio, kd_temperature=temp, labels=labels,
                reduction=reduction, divergence_kwargs=dict(kw))[0], s_)

        def ref(x):
            q, p = torch.softmax(x[MASK] / temp, -1), torch.softmax(t[MASK] / temp, -1)
            kd = ref_reduce(ref_div(kind, kw, p, q), MASK, reduction)
            ce = ref_reduce(ref_ce(x[ce_keep], labels[ce_keep]), ce_keep, reduction)
            return ratio * kd + (1 - ratio) * ce

        want = grad_of(ref, s)
        clean = run(other_numbers(s, 5), other_numbers(t, 6))
        for name, value in POISONS.items():
            for side in SIDES:
                s_ = poisoned(s, value) if side != "teacher" else other_numbers(s, 5)
                t_ = poisoned(t, value) if side != "student" else other_numbers(t, 6)
                check_inert(run(s_, t_), clean, want, what=f"{reduction} {name} {side}")


def test_token_cross_entropy_ignores_poisoned_positions():
    """The issue's CE case: NaN student logits where labels are -100, and a mask on top."""
    s, _, labels = dense_inputs(3)
    labels = labels.clone()
    labels[~MASK] = L.IGNORE_INDEX
    keep = labels != L.IGNORE_INDEX
    want = grad_of(lambda x: ref_ce(x[keep], labels[keep]).mean(), s)
    for name, value in POISONS.items():
        got = grad_of(lambda x: L.masked_token_mean(L.token_cross_entropy(x, labels), keep), poisoned(s, value))
        clean = grad_of(lambda x: L.masked_token_mean(L.token_cross_entropy(x, labels), keep), other_numbers(s, 1))
        check_inert(got, clean, want, what=f"labels -100, {name}")
    # mask= drops positions whose labels are ordinary (here: garbage) ids
    labels_garbage = dense_inputs(3)[2]
    per_token = L.token_cross_entropy(poisoned(s, math.nan), labels_garbage, mask=MASK)
    assert torch.isfinite(per_token).all() and bool((per_token[~MASK] == 0).all())


@pytest.mark.parametrize("detach", [True, False])
def test_distillm2_loss_masked_positions_are_inert(detach):
    s1, t1, _ = dense_inputs(10)
    s2, t2, _ = dense_inputs(20)
    mask2 = MASK.flip(-1)
    beta, a1, a2 = 0.7, 0.1, 0.3

    def run(x1, y1, x2, y2):
        return grad_of(lambda u, w: L.distillm2_loss(
            u, y1, MASK, w, y2, mask2, beta=beta, skl_alpha=a1, srkl_alpha=a2,
            detach_mixture_student=detach)[0], x1, x2)

    def ref(u, w):
        skl = ref_div("skew_forward_kl", {"alpha": a1}, torch.softmax(t1[MASK], -1), torch.softmax(u[MASK], -1))
        srkl = ref_div("skew_reverse_kl", {"alpha": a2, "detach_mixture_student": detach},
                       torch.softmax(t2[mask2], -1), torch.softmax(w[mask2], -1))
        return (2 - beta) * ref_reduce(skl, MASK, "sequence_mean") + beta * ref_reduce(srkl, mask2, "sequence_mean")

    def keep_others(x, keep, seed):
        x = x.detach().clone()
        x[~keep] = torch.randn(x[~keep].shape, generator=_g(seed), dtype=F64)
        return x

    want = grad_of(ref, s1, s2)
    clean = run(keep_others(s1, MASK, 1), keep_others(t1, MASK, 2),
                keep_others(s2, mask2, 3), keep_others(t2, mask2, 4))
    for name, value in POISONS.items():
        for side in SIDES:
            st = side != "teacher"
            te = side != "student"
            x1 = poisoned(s1, value) if st else keep_others(s1, MASK, 1)
            y1 = poisoned(t1, value) if te else keep_others(t1, MASK, 2)
            x2 = poisoned(s2, value, mask2) if st else keep_others(s2, mask2, 3)
            y2 = poisoned(t2, value, mask2) if te else keep_others(t2, mask2, 4)
            check_inert(run(x1, y1, x2, y2), clean, want, what=f"{name} {side}", keeps=[MASK, mask2])


# ------------------------------------------------------------------ sparse


def sparse_inputs(seed=0):
    s = torch.randn(B, T, V, generator=_g(seed), dtype=F64) * 2
    t = torch.log_softmax(torch.randn(B, T, V, generator=_g(seed + 1), dtype=F64) * 2, -1)
    ids = torch.stack([torch.randperm(V, generator=_g(seed + 2 + i))[:K] for i in range(B * T)]).reshape(B, T, K)
    lps = t.gather(-1, ids)
    tail = 1 - lps.exp().sum(-1)
    return s, ids, lps, tail


def poisoned_ids(ids, value):
    ids = ids.clone()
    bad = {"nan": V + 3, "+inf": 10**9, "-inf": -1, "garbage": -(10**9)}[value]
    ids[~MASK] = bad
    return ids


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_sparse_masked_positions_are_inert(kind, kw):
    s, ids, lps, tail = sparse_inputs()
    temp = 1.3

    def ref(x):
        q = torch.softmax(x[MASK] / temp, -1)
        q_top = q.gather(-1, ids[MASK])
        p_top = lps[MASK].exp()
        buckets_q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        buckets_p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        return ref_div(kind, kw, buckets_p, buckets_q, tail_bucket=True)

    fns = [lambda x, i, lp, tm: L.sparse_divergence(
        kind, x, i, lp, temperature=temp, teacher_tail_mass=tm, mask=MASK, **kw)]
    if kind == "forward_kl":
        fns.append(lambda x, i, lp, tm: L.sparse_forward_kl(
            x, i, lp, temperature=temp, teacher_tail_mass=tm, mask=MASK))
    for fn in fns:
        for with_tail in (False, True):
            for reduction in ("token_mean", "sequence_mean"):
                def run(x, i, lp, tm):
                    tm = tm if with_tail else None
                    return grad_of(lambda u: L.reduce_per_token(fn(u, i, lp, tm), MASK, reduction), x)

                want = grad_of(lambda u: ref_reduce(ref(u), MASK, reduction), s)
                clean = run(other_numbers(s, 1), ids, other_numbers(lps, 2), tail)
                for name, value in POISONS.items():
                    for side in SIDES:
                        st, te = side != "teacher", side != "student"
                        got = run(poisoned(s, value) if st else s, poisoned_ids(ids, name) if te else ids,
                                  poisoned(lps, value) if te else lps, poisoned(tail, value) if te else tail)
                        check_inert(got, clean, want, what=f"tail={with_tail} {reduction} {name} {side}")
                        per_token = fn(poisoned(s, value), poisoned_ids(ids, name), poisoned(lps, value), None)
                        assert bool((per_token[~MASK] == 0).all())


@pytest.mark.parametrize("with_tail", [False, True])
def test_sparse_masked_buckets_are_equal_for_both_models_in_bf16(with_tail):
    """The neutral input is exact in any dtype: a masked position's buckets are the same for
    student and teacher (so every divergence is 0 before any output selection), even for
    bf16 records with k = V - 1, where a uniform stand-in would round its tail to 0."""
    vocab, k = 1000, 999
    s = torch.randn(1, 2, vocab, generator=_g(40))
    ids = torch.stack([torch.randperm(vocab, generator=_g(41 + i))[:k] for i in range(2)]).reshape(1, 2, k)
    lps = torch.log_softmax(torch.randn(1, 2, vocab, generator=_g(43)), -1).gather(-1, ids).bfloat16()
    mask = torch.tensor([[True, False]])
    lps[~mask] = math.nan
    tail = torch.tensor([[1e-3, math.nan]]) if with_tail else None
    lq, lp = L.sparse_bucket_logprobs(s, ids, lps, teacher_tail_mass=tail, mask=mask)
    assert torch.equal(lq[~mask], lp[~mask].to(lq.dtype))
    assert not torch.isnan(lq).any() and not torch.isnan(lp).any()
    for kind in ("reverse_kl", "adaptive_kl"):
        x = s.clone().requires_grad_(True)
        L.masked_token_mean(L.sparse_divergence(kind, x, ids, lps, teacher_tail_mass=tail, mask=mask), mask).backward()
        assert torch.isfinite(x.grad).all() and bool((x.grad[~mask] == 0).all())


# ------------------------------------------------------------------ fused


def fused_inputs(seed=0):
    g = _g(seed)
    hs = torch.randn(B, T, HS, generator=g, dtype=F64)
    ws = torch.randn(V, HS, generator=g, dtype=F64)
    ht = torch.randn(B, T, HT, generator=g, dtype=F64)
    wt = torch.randn(V, HT, generator=g, dtype=F64) * 2
    return hs, ws, ht, wt


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_fused_masked_rows_are_inert(kind, kw):
    hs, ws, ht, wt = fused_inputs()
    temp = 0.8
    for reduction in ("token_mean", "sequence_mean", "none"):
        def run(h_s, h_t):
            def f(h, w):
                out = L.fused_linear_divergence(
                    h, w, h_t, wt, divergence=kind, reduction=reduction, temperature=temp, mask=MASK, chunk_size=2,
                    **kw)
                return L.masked_token_mean(out, MASK) if reduction == "none" else out
            return grad_of(f, h_s, ws)

        def ref(h, w):
            q = torch.softmax(h[MASK] @ w.T / temp, -1)
            p = torch.softmax(ht[MASK] @ wt.T / temp, -1)
            return ref_reduce(ref_div(kind, kw, p, q), MASK, "token_mean" if reduction == "none" else reduction)

        want = grad_of(ref, hs, ws)
        clean = run(other_numbers(hs, 1), other_numbers(ht, 2))
        for name, value in POISONS.items():
            for side in SIDES:
                st, te = side != "teacher", side != "student"
                got = run(poisoned(hs, value) if st else other_numbers(hs, 1),
                          poisoned(ht, value) if te else other_numbers(ht, 2))
                check_inert(got, clean, want, what=f"{reduction} {name} {side}")


def test_fused_cross_entropy_masked_rows_are_inert():
    hs, ws, _, _ = fused_inputs(4)
    labels = dense_inputs(4)[2]
    keep = MASK & (labels != L.IGNORE_INDEX)

    def run(h):
        return grad_of(lambda x, w: L.fused_linear_cross_entropy(x, w, labels, mask=MASK, chunk_size=2), h, ws)

    want = grad_of(lambda x, w: ref_ce(x[keep] @ w.T, labels[keep]).mean(), hs, ws)
    clean = run(other_numbers(hs, 1))
    for name, value in POISONS.items():
        check_inert(run(poisoned(hs, value)), clean, want, what=name)
    # nothing kept: the zero must not read the NaN rows either
    empty = torch.zeros_like(MASK)
    v, (gh, gw) = grad_of(
        lambda x, w: L.fused_linear_cross_entropy(x, w, labels, mask=empty), poisoned(hs, math.nan), ws)
    assert float(v) == 0.0 and bool((gh == 0).all()) and bool((gw == 0).all())
