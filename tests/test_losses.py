"""Dense divergences, reductions and composite objectives of kdray.losses.

Every divergence is checked against a float64 reference written here from the plain
softmax/log formulas (no library code), for values and gradients, plus analytic
identities, masks, temperature, bf16 inputs and extreme / -inf-masked logits.
Sparse and fused paths: tests/test_losses_sparse.py, tests/test_losses_fused.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kdray.losses as L

F64 = torch.float64


# The tensors here are tiny: run single-threaded (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ reference (float64)


def _pq(s, t, temperature):
    return torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref(kind, s, t, temperature=1.0, **kw):
    p, q = _pq(s, t, temperature)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        a = torch.as_tensor(kw["alpha"], dtype=F64)
        if a.dim() == 1:
            a = a.view(-1, 1, 1)
        elif a.dim() == 2:
            a = a.unsqueeze(-1)
        if kind == "skew_forward_kl":
            return (p * (p.log() - (a * p + (1 - a) * q).log())).sum(-1)
        q_mix = q.detach() if kw["detach_mixture_student"] else q
        return (q * (q.log() - ((1 - a) * p + a * q_mix).log())).sum(-1)
    if kind == "jsd":
        b = kw["beta"]
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "adaptive_kl":
        mu = kw.get("mu", 0.5)
        pd, qd = p.detach(), q.detach()
        order = torch.argsort(pd, dim=-1, descending=True)
        cum = torch.cumsum(torch.gather(pd, -1, order), -1)
        rank = torch.argsort(order, dim=-1)  # rank of each vocab entry in the sorted order
        head = (torch.gather(cum, -1, rank) <= mu) | (rank == 0)
        gap = (pd - qd).abs()
        gh, gt = (gap * head).sum(-1), (gap * ~head).sum(-1)
        return gh / (gh + gt) * _kl(p, q) + gt / (gh + gt) * _kl(q, p)
    raise KeyError(kind)


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.7}),
    ("skew_reverse_kl", {"alpha": 0.1, "detach_mixture_student": True}),
    ("skew_reverse_kl", {"alpha": 0.4, "detach_mixture_student": False}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("adaptive_kl", {"mu": 0.5}),
    ("adaptive_kl", {"mu": 0.2}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in CASES]


def _logits(shape=(2, 3, 11), scale=2.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
    return s, t


# ------------------------------------------------------------------------ divergences


def test_registry_names():
    assert set(L.DIVERGENCES) == {
        "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd", "adaptive_kl"
    }
    assert L.DIVERGENCES["jsd"] is L.jsd and L.DIVERGENCES["adaptive_kl"] is L.adaptive_kl


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_values_and_grads_match_reference(kind, kw, temperature):
    s, t = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = L.DIVERGENCES[kind](s, t, temperature=temperature, **kw)
    want = ref(kind, s, t, temperature, **kw)
    assert got.shape == (2, 3) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.linspace(0.5, 1.5, 6, dtype=F64).view(2, 3)
    g_got = torch.autograd.grad((got * w).sum(), (s, t))
    g_want = torch.autograd.grad((want * w).sum(), (s, t))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


GRADCHECK = [c for c in CASES if c[0] not in ("adaptive_kl",) and c[1].get("detach_mixture_student") is not True]


@pytest.mark.parametrize("kind,kw", GRADCHECK, ids=[f"{k}-{kw}" for k, kw in GRADCHECK])
def test_gradcheck(kind, kw):
    s, t = _logits(shape=(1, 2, 5), scale=1.0, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: L.DIVERGENCES[kind](a, b, temperature=1.3, **kw), (s, t))


ALPHA_CASES = [c for c in CASES if "alpha" in c[1]]


@pytest.mark.parametrize("kind,kw", ALPHA_CASES, ids=[f"{k}-{kw}" for k, kw in ALPHA_CASES])
def test_per_sample_and_per_token_alpha(kind, kw):
    s, t = _logits(shape=(3, 4, 9))
    alphas = torch.tensor([0.0, 0.25, 0.9], dtype=F64)
    fn = L.DIVERGENCES[kind]
    rest = {k: v for k, v in kw.items() if k != "alpha"}
    per_sample = fn(s, t, alpha=alphas, **rest)
    per_token = fn(s, t, alpha=alphas.view(3, 1).expand(3, 4).contiguous(), **rest)
    for b in range(3):
        row = fn(s[b : b + 1], t[b : b + 1], alpha=float(alphas[b]), **rest)[0]
        torch.testing.assert_close(per_sample[b], row)
        torch.testing.assert_close(per_token[b], row)
    torch.testing.assert_close(per_sample, ref(kind, s, t, alpha=alphas, **rest))


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_bf16_inputs(kind, kw):
    s, t = _logits(shape=(2, 4, 64), scale=3.0, seed=5)
    sb, tb = s.bfloat16().requires_grad_(True), t.bfloat16()
    got = L.DIVERGENCES[kind](sb, tb, temperature=1.5, **kw)
    assert got.dtype == torch.float32
    # Same (bf16-rounded) inputs in float64: only float32 rounding separates them.
    want = ref(kind, sb.detach().double(), tb.double(), 1.5, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # Against the unrounded logits: within bf16 input rounding.
    torch.testing.assert_close(got.double(), ref(kind, s, t, 1.5, **kw), rtol=0.05, atol=0.02)
    (grad,) = torch.autograd.grad(got.sum(), sb)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_padded_vocab_with_neg_inf_is_ignored(kind, kw):
    """Entries that are -inf in both models add nothing: value/grad equal the unpadded ones."""
    s, t = _logits(shape=(2, 3, 8))
    pad = torch.full((2, 3, 5), float("-inf"), dtype=F64)
    sp, tp = torch.cat([s, pad], -1).requires_grad_(True), torch.cat([t, pad], -1).requires_grad_(True)
    s.requires_grad_(True)
    got = L.DIVERGENCES[kind](sp, tp, **kw)
    want = L.DIVERGENCES[kind](s, t, **kw)
    torch.testing.assert_close(got, want)
    gs, gt = torch.autograd.grad(got.sum(), (sp, tp))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gs[..., 8:] == 0).all()
    torch.testing.assert_close(gs[..., :8], torch.autograd.grad(want.sum(), s)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_extreme_logits_finite(kind, kw, dtype):
    s = torch.tensor([[[1e4, -1e4, 0.0, 5.0, float("-inf")], [-1e4, 1e4, 1e4, -3.0, float("-inf")]]], dtype=dtype)
    t = torch.tensor([[[-1e4, 1e4, 2.0, 0.0, float("-inf")], [1e4, -1e4, 1e4, 7.0, float("-inf")]]], dtype=dtype)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for temperature in (1.0, 0.5, 3.0):
        v = L.DIVERGENCES[kind](s, t, temperature=temperature, **kw)
        assert torch.isfinite(v).all(), (temperature, v)
        assert (v >= -1e-6).all()
        gs, gt = torch.autograd.grad(v.sum(), (s, t))
        assert torch.isfinite(gs.float()).all() and torch.isfinite(gt.float()).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_identical_distributions_give_zero(kind, kw):
    s, _ = _logits(shape=(2, 3, 10))
    s = s.clone().requires_grad_(True)
    v = L.DIVERGENCES[kind](s, s.detach() + 3.0, **kw)  # a logit shift does not change the softmax
    torch.testing.assert_close(v, torch.zeros_like(v), atol=1e-12, rtol=0)
    if kind != "tvd":  # |x| has no gradient at 0 to compare
        (g,) = torch.autograd.grad(v.sum(), s)
        torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-10, rtol=0)


def test_skew_identities():
    s, t = _logits()
    s.requires_grad_(True)
    fkl, rkl = L.forward_kl(s, t), L.reverse_kl(s, t)
    torch.testing.assert_close(L.skew_forward_kl(s, t, alpha=0.0), fkl)
    torch.testing.assert_close(L.skew_reverse_kl(s, t, alpha=0.0, detach_mixture_student=False), rkl)
    torch.testing.assert_close(L.jsd(s, t, beta=0.0), fkl)
    torch.testing.assert_close(L.jsd(s, t, beta=1.0), rkl)
    torch.testing.assert_close(L.skew_forward_kl(s, t, alpha=1.0), torch.zeros_like(fkl))
    g_skl = torch.autograd.grad(L.skew_forward_kl(s, t, alpha=0.0).sum(), s)[0]
    torch.testing.assert_close(g_skl, torch.autograd.grad(fkl.sum(), s)[0])
    # skewing bounds the divergence: SKL(α) <= FKL and decreases in α
    assert (L.skew_forward_kl(s, t, alpha=0.3) <= fkl + 1e-12).all()
    assert (L.skew_forward_kl(s, t, alpha=0.6) <= L.skew_forward_kl(s, t, alpha=0.3) + 1e-12).all()


def test_srkl_detached_same_value_different_gradient():
    s, t = _logits()
    s.requires_grad_(True)
    det = L.skew_reverse_kl(s, t, alpha=0.3, detach_mixture_student=True)
    full = L.skew_reverse_kl(s, t, alpha=0.3, detach_mixture_student=False)
    torch.testing.assert_close(det, full)
    g_det = torch.autograd.grad(det.sum(), s)[0]
    g_full = torch.autograd.grad(full.sum(), s)[0]
    assert (g_det - g_full).abs().max() > 1e-3


def _logits_from_probs(probs):
    return torch.tensor(probs, dtype=F64).log().view(1, 1, -1)


def test_akl_is_fkl_when_tail_agrees_and_rkl_when_head_agrees():
    p = [0.30, 0.25, 0.15, 0.12, 0.10, 0.08]  # mu = 0.6: head = {0, 1} (cum 0.30, 0.55)
    t = _logits_from_probs(p)
    s_head_differs = _logits_from_probs([0.35, 0.20, 0.15, 0.12, 0.10, 0.08])
    s_tail_differs = _logits_from_probs([0.30, 0.25, 0.30, 0.05, 0.05, 0.05])
    akl = L.adaptive_kl(s_head_differs, t, mu=0.6)
    torch.testing.assert_close(akl, L.forward_kl(s_head_differs, t))
    assert (L.forward_kl(s_head_differs, t) - L.reverse_kl(s_head_differs, t)).abs().max() > 1e-4
    assert (L.forward_kl(s_tail_differs, t) - L.reverse_kl(s_tail_differs, t)).abs().max() > 1e-4
    torch.testing.assert_close(L.adaptive_kl(s_tail_differs, t, mu=0.6), L.reverse_kl(s_tail_differs, t))
    # mu = 0: the head is only the top-1 token
    s_top_only = _logits_from_probs([0.20, 0.35, 0.15, 0.12, 0.10, 0.08])
    v = L.adaptive_kl(s_top_only, t, mu=0.0)
    torch.testing.assert_close(v, ref("adaptive_kl", s_top_only, t, mu=0.0))


@pytest.mark.parametrize(
    "fn,kw,match",
    [
        (L.skew_forward_kl, {"alpha": 1.5}, "alpha"),
        (L.skew_forward_kl, {"alpha": torch.tensor([0.1, 0.2, 0.3])}, "alpha"),
        (L.skew_forward_kl, {"alpha": torch.tensor([0.1, -0.2])}, "alpha"),
        (L.skew_reverse_kl, {"alpha": 0.1, "detach_mixture_student": "yes"}, "detach_mixture_student"),
        (L.jsd, {"beta": 1.2}, "beta"),
        (L.adaptive_kl, {"mu": -0.1}, "mu"),
        (L.forward_kl, {"temperature": 0.0}, "temperature"),
        (L.forward_kl, {"temperature": float("nan")}, "temperature"),
    ],
)
def test_argument_validation(fn, kw, match):
    s, t = _logits()
    with pytest.raises(ValueError, match=match):
        fn(s, t, **kw)


def test_shape_validation():
    s, t = _logits()
    with pytest.raises(ValueError, match="same shape"):
        L.forward_kl(s, t[..., :-1])
    with pytest.raises(ValueError, match="floating"):
        L.forward_kl(s.long(), t)


# ------------------------------------------------------------------------ reductions


def test_masked_token_mean_and_sequence_mean():
    v = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(L.masked_token_mean(v, mask), torch.tensor(10.0 / 4))
    torch.testing.assert_close(L.sequence_then_batch_mean(v, mask), torch.tensor((2.0 + 4.0) / 2))
    (g,) = torch.autograd.grad(L.sequence_then_batch_mean(v, mask), v)
    torch.testing.assert_close(g, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [0.5, 0, 0, 0]]))
    # an empty sequence is left out of the batch mean
    mask2 = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(L.sequence_then_batch_mean(v, mask2), torch.tensor(2.0))


@pytest.mark.parametrize("reduce", [L.masked_token_mean, L.sequence_then_batch_mean])
def test_empty_mask_is_zero_not_nan(reduce):
    v = torch.randn(2, 3, requires_grad=True)
    out = reduce(v, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, v)
    assert torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError, match="mask"):
        reduce(v, torch.ones(3, 2))


def test_token_cross_entropy():
    s, _ = _logits(shape=(2, 3, 7))
    labels = torch.tensor([[0, 6, -100], [3, -100, 2]])
    ce = L.token_cross_entropy(s, labels)
    logp = torch.log_softmax(s, -1)
    for b in range(2):
        for i in range(3):
            want = 0.0 if labels[b, i] == -100 else -float(logp[b, i, labels[b, i]])
            assert ce[b, i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        L.token_cross_entropy(s, labels.float())


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_kd_objective_mixes_kd_and_ce(reduction):
    s, t = _logits(shape=(2, 4, 9))
    s.requires_grad_(True)
    labels = torch.tensor([[1, 2, -100, 4], [5, 6, 7, -100]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, parts = L.kd_objective(
        s, t, mask=mask, labels=labels, divergence="skew_forward_kl", kd_ratio=0.7, kd_temperature=2.0,
        divergence_kwargs={"alpha": 0.1}, reduction=reduction,
    )
    red = L.masked_token_mean if reduction == "token_mean" else L.sequence_then_batch_mean
    kd = red(ref("skew_forward_kl", s, t, 2.0, alpha=0.1), mask)
    ce_tok = -torch.log_softmax(s, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = red(ce_tok, mask & (labels != -100))
    torch.testing.assert_close(loss, 0.7 * kd + 0.3 * ce)
    torch.testing.assert_close(parts["kd"], kd.detach())
    torch.testing.assert_close(parts["ce"], ce.detach())  # CE on raw logits: kd_temperature not applied
    assert set(parts) == {"loss", "kd", "ce"} and not parts["loss"].requires_grad and loss.requires_grad
    loss_pure, parts_pure = L.kd_objective(s, t, mask=mask, divergence=L.forward_kl, kd_ratio=1.0)
    assert "ce" not in parts_pure
    torch.testing.assert_close(loss_pure, L.masked_token_mean(ref("forward_kl", s, t), mask))
    # kd_scale (T² under a KD temperature) weighs the KD term only, in the value and the gradient;
    # parts["kd"] stays the divergence itself
    scaled, parts_scaled = L.kd_objective(
        s, t, mask=mask, labels=labels, divergence="skew_forward_kl", kd_ratio=0.7, kd_temperature=2.0,
        divergence_kwargs={"alpha": 0.1}, reduction=reduction, kd_scale=4.0,
    )
    torch.testing.assert_close(scaled, 0.7 * 4.0 * kd + 0.3 * ce)
    torch.testing.assert_close(parts_scaled["kd"], kd.detach())
    (grad,) = torch.autograd.grad(scaled, s)
    (expected,) = torch.autograd.grad(0.7 * 4.0 * kd + 0.3 * ce, s)
    torch.testing.assert_close(grad, expected)


def test_kd_objective_validation():
    s, t = _logits()
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="labels"):
        L.kd_objective(s, t, mask=mask, divergence="forward_kl", kd_ratio=0.5)
    with pytest.raises(ValueError, match="kd_ratio"):
        L.kd_objective(s, t, mask=mask, divergence="forward_kl", kd_ratio=1.5)
    with pytest.raises(ValueError, match="divergence"):
        L.kd_objective(s, t, mask=mask, divergence="kl", kd_ratio=1.0)
    with pytest.raises(ValueError, match="alpha"):
        L.kd_objective(s, t, mask=mask, divergence="skew_forward_kl", kd_ratio=1.0)


def test_distillm2_loss():
    s1, t1 = _logits(shape=(2, 5, 9), seed=1)
    s2, t2 = _logits(shape=(2, 4, 9), seed=2)
    s1.requires_grad_(True)
    s2.requires_grad_(True)
    m1 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m2 = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    a1 = torch.tensor([0.1, 0.3], dtype=F64)
    loss, parts = L.distillm2_loss(s1, t1, m1, s2, t2, m2, beta=0.8, skl_alpha=a1, srkl_alpha=0.2)
    skl = L.sequence_then_batch_mean(ref("skew_forward_kl", s1, t1, alpha=a1), m1)
    srkl = L.sequence_then_batch_mean(ref("skew_reverse_kl", s2, t2, alpha=0.2, detach_mixture_student=True), m2)
    torch.testing.assert_close(loss, 1.2 * skl + 0.8 * srkl)
    torch.testing.assert_close(parts["skl"], skl.detach())
    torch.testing.assert_close(parts["srkl"], srkl.detach())
    g_det = torch.autograd.grad(loss, s2)[0]
    loss_v1, _ = L.distillm2_loss(
        s1, t1, m1, s2, t2, m2, beta=0.8, skl_alpha=a1, srkl_alpha=0.2, detach_mixture_student=False
    )
    torch.testing.assert_close(loss_v1, loss)
    assert (torch.autograd.grad(loss_v1, s2)[0] - g_det).abs().max() > 1e-4
    with pytest.raises(ValueError, match="beta"):
        L.distillm2_loss(s1, t1, m1, s2, t2, m2, beta=2.5, skl_alpha=0.1, srkl_alpha=0.1)


def test_importable_without_ray_vllm_deepspeed():
    code = (
        "import sys, kdray.losses; "
        "bad = [m for m in ('ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
