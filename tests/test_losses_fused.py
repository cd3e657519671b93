"""Fused chunked lm-head + divergence path: kdray.losses.fused_linear_divergence.

The reference ("naive path") is the dense divergence on full logits ``h @ W^T + b``.
Float32 agreement is asserted at 1e-5 relative (atol = 1e-5 · max |reference|).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdray.losses as L

KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3, "detach_mixture_student": True}),
    ("skew_reverse_kl", {"alpha": 0.3, "detach_mixture_student": False}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("tvd", {}),
    ("adaptive_kl", {"mu": 0.5}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in KINDS]
B, T, HS, HT, V = 4, 9, 16, 24, 50  # N = 36 tokens


# The tensors here are tiny: run single-threaded (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    hs = mk(B, T, HS).requires_grad_(True)
    ws = mk(V, HS, scale=0.5).requires_grad_(True)
    bs = mk(V, scale=0.3).requires_grad_(True) if bias else None
    ht, wt = mk(B, T, HT), mk(V, HT, scale=0.5)
    bt = mk(V, scale=0.3) if bias else None
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    return hs, ws, bs, ht, wt, bt, mask


def _naive(kind, kw, hs, ws, bs, ht, wt, bt, temperature):
    zs = hs @ ws.t() + (bs if bs is not None else 0)
    zt = ht @ wt.t() + (bt if bt is not None else 0)
    return L.DIVERGENCES[kind](zs, zt, temperature=temperature, **kw)


def _close(got, want, rtol=1e-5):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-12)


@pytest.mark.parametrize("chunk_size", [6, 7, None])  # divides N = 36, does not, auto
@pytest.mark.parametrize("kind,kw", KINDS, ids=IDS)
def test_fused_matches_naive_float32(kind, kw, chunk_size):
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    params = (hs, ws, bs)
    naive_tok = _naive(kind, kw, hs, ws, bs, ht, wt, bt, 1.3)
    upstream = torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    naive = {
        "none": torch.where(mask, naive_tok, 0.0),
        "token_mean": L.masked_token_mean(naive_tok, mask),
        "sequence_mean": L.sequence_then_batch_mean(naive_tok, mask),
        "sum": torch.where(mask, naive_tok, 0.0).sum(),
    }
    for reduction, want in naive.items():
        got = L.fused_linear_divergence(
            hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence=kind, reduction=reduction,
            temperature=1.3, mask=mask, chunk_size=chunk_size, **kw,
        )
        assert got.shape == want.shape and got.dtype == torch.float32
        _close(got.detach(), want.detach())
        scale = upstream if reduction == "none" else 1.0
        g_got = torch.autograd.grad((got * scale).sum(), params)
        g_want = torch.autograd.grad((want * scale).sum(), params, retain_graph=True)
        for a, b in zip(g_got, g_want):
            _close(a, b)


GRADCHECK = [c for c in KINDS if c[0] != "adaptive_kl" and c[1].get("detach_mixture_student") is not True]


@pytest.mark.parametrize("reduction", ["none", "token_mean"])
@pytest.mark.parametrize("kind,kw", GRADCHECK, ids=[f"{k}-{kw}" for k, kw in GRADCHECK])
def test_fused_gradcheck_float64(kind, kw, reduction):
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1])

    def fn(h, w, b):
        return L.fused_linear_divergence(
            h, w, ht, wt, student_bias=b, divergence=kind, reduction=reduction, temperature=0.8,
            mask=mask, chunk_size=2, **kw,
        )

    assert torch.autograd.gradcheck(fn, (hs, ws, bs), fast_mode=True)


@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
def test_fused_per_sample_and_per_token_alpha(kind):
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    extra = {"detach_mixture_student": True} if kind == "skew_reverse_kl" else {}
    for alpha in (torch.tensor([0.0, 0.2, 0.5, 0.9]), torch.rand(B, T, generator=torch.Generator().manual_seed(3))):
        got = L.fused_linear_divergence(
            hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence=kind, reduction="none",
            mask=mask, chunk_size=5, alpha=alpha, **extra,
        )
        want = torch.where(mask, _naive(kind, {"alpha": alpha, **extra}, hs, ws, bs, ht, wt, bt, 1.0), 0.0)
        _close(got.detach(), want.detach())
        g_got = torch.autograd.grad(got.sum(), (hs, ws))
        g_want = torch.autograd.grad(want.sum(), (hs, ws))
        for a, b in zip(g_got, g_want):
            _close(a, b)


def test_fused_bf16():
    hs, ws, bs, ht, wt, bt, mask = _inputs(dtype=torch.bfloat16)
    got = L.fused_linear_divergence(
        hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence="jsd", beta=0.5,
        reduction="token_mean", mask=mask, chunk_size=7,
    )
    want = L.masked_token_mean(_naive("jsd", {"beta": 0.5}, hs, ws, bs, ht, wt, bt, 1.0), mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
    g_got = torch.autograd.grad(got, (hs, ws))
    g_want = torch.autograd.grad(want, (hs, ws))
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * float(b.float().abs().max()))


@pytest.mark.parametrize("kind,kw", KINDS, ids=IDS)
def test_fused_neg_inf_padded_vocab(kind, kw):
    """Padding rows of the lm_head with a -inf bias (both models) changes nothing."""
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    pad = 3
    ws_p = torch.cat([ws.detach(), torch.randn(pad, HS)]).requires_grad_(True)
    wt_p = torch.cat([wt, torch.randn(pad, HT)])
    ninf = torch.full((pad,), float("-inf"))
    bs_p, bt_p = torch.cat([bs.detach(), ninf]), torch.cat([bt, ninf])
    got = L.fused_linear_divergence(
        hs, ws_p, ht, wt_p, student_bias=bs_p, teacher_bias=bt_p, divergence=kind,
        reduction="token_mean", temperature=0.5, mask=mask, chunk_size=8, **kw,
    )
    want = L.fused_linear_divergence(
        hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence=kind,
        reduction="token_mean", temperature=0.5, mask=mask, chunk_size=8, **kw,
    )
    assert torch.isfinite(got)
    _close(got.detach(), want.detach())
    gh, gw = torch.autograd.grad(got, (hs, ws_p))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert (gw[V:] == 0).all()
    _close(gw[:V], torch.autograd.grad(want, ws)[0])


def test_masked_rows_get_no_gradient_and_empty_mask_is_zero():
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    out = L.fused_linear_divergence(hs, ws, ht, wt, divergence="forward_kl", reduction="token_mean", mask=mask)
    (gh,) = torch.autograd.grad(out, hs)
    assert (gh[~mask] == 0).all() and (gh[mask].abs().sum(-1) > 0).all()
    empty = torch.zeros(B, T, dtype=torch.bool)
    for reduction in ("token_mean", "sequence_mean", "sum", "none"):
        out = L.fused_linear_divergence(hs, ws, ht, wt, divergence="tvd", reduction=reduction, mask=empty)
        assert (out == 0).all()
        (gh,) = torch.autograd.grad(out.sum(), hs)
        assert (gh == 0).all()


def test_no_grad_forward_gives_values():
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    with torch.no_grad():
        got = L.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", reduction="sum", mask=mask)
        want = torch.where(mask, _naive("reverse_kl", {}, hs, ws, None, ht, wt, None, 1.0), 0.0).sum()
    assert not got.requires_grad
    _close(got, want)


def test_fused_validation():
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    with pytest.raises(ValueError, match="teacher_weight"):
        L.fused_linear_divergence(hs, ws, ht, wt.requires_grad_(True), divergence="tvd", reduction="sum")
    wt.requires_grad_(False)
    with pytest.raises(ValueError, match="student_weight"):
        L.fused_linear_divergence(hs, ws[:, :3], ht, wt, divergence="tvd", reduction="sum")
    with pytest.raises(ValueError, match="vocabulary"):
        L.fused_linear_divergence(hs, ws[:10], ht, wt, divergence="tvd", reduction="sum")
    with pytest.raises(ValueError, match="sequence_mean"):
        L.fused_linear_divergence(hs[0], ws, ht[0], wt, divergence="tvd", reduction="sequence_mean")
    with pytest.raises(ValueError, match="reduction"):
        L.fused_linear_divergence(hs, ws, ht, wt, divergence="tvd", reduction="mean")
    with pytest.raises(ValueError, match="chunk_size"):
        L.fused_linear_divergence(hs, ws, ht, wt, divergence="tvd", reduction="sum", chunk_size=0)
    with pytest.raises(ValueError, match="alpha"):
        L.fused_linear_divergence(hs, ws, ht, wt, divergence="skew_forward_kl", reduction="sum")
    with pytest.raises(ValueError, match="alpha"):
        L.fused_linear_divergence(
            hs, ws, ht, wt, divergence="skew_forward_kl", reduction="sum", alpha=torch.full((5,), 0.1)
        )
    with pytest.raises(ValueError, match="alpha"):
        L.fused_linear_divergence(
            hs, ws, ht, wt, divergence="skew_forward_kl", reduction="sum", alpha=torch.full((B, T), 1.1)
        )
    with pytest.raises(ValueError, match="mask"):
        L.fused_linear_divergence(hs, ws, ht, wt, divergence="tvd", reduction="sum", mask=mask[0])


class _LargestLogits(TorchDispatchMode):
    """Records the largest leading dim of any [rows, V] tensor an op produces."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # views (e.g. W.t()) allocate nothing
            if t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_fused_never_materialises_full_logits(reduction):
    n, hs_dim, ht_dim, vocab, chunk = 64, 12, 20, 301, 8
    hs = torch.randn(n, hs_dim, requires_grad=True)
    ws = torch.randn(vocab, hs_dim, requires_grad=True)
    ht, wt = torch.randn(n, ht_dim), torch.randn(vocab, ht_dim)
    with _LargestLogits(vocab) as probe:
        out = L.fused_linear_divergence(
            hs, ws, ht, wt, divergence="jsd", beta=0.5, reduction=reduction, chunk_size=chunk
        )
        out.sum().backward()
    assert probe.rows <= chunk
    with _LargestLogits(vocab) as probe:  # the probe does see the naive path's [N, V] logits
        L.jsd(hs @ ws.t(), ht @ wt.t(), beta=0.5).sum().backward()
    assert probe.rows >= n
