"""Closed-form value + gradient of every divergence for one chunk of rows.

Used by the fused path (:mod:`kdray.losses.fused`) instead of building an autograd
graph per chunk: the analytic gradient needs a handful of ``[C, V]`` buffers, mostly
updated in place, where autograd keeps every intermediate alive (about 2-3x the memory
and elementwise passes). The dense path keeps plain autograd; the tests check that the
two agree (and ``gradcheck`` the fused path in float64).

Notation: ``lq``/``lp`` student/teacher log-probs ``[C, V]``, ``q``/``p`` their
exponentials. Each kernel returns the per-row value ``v [C]`` and ``G = ∂v/∂lq``
(treating ``lq`` as a free variable; ``None`` when no gradient is wanted). The chain
rule through ``lq = log_softmax(z / T)`` is applied once in :func:`value_and_grad`::

    ∂v/∂z = (G - q · Σ_V G) / T

``0 · log 0 = 0`` is enforced by zeroing, with ``masked_fill_``, the log-ratio wherever
the weighting probability is 0 -- the same convention as the dense path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdray.losses._core import Spec, adaptive_weights


def _log_mix(la: Tensor, lb: Tensor, log_wa, log_wb) -> Tensor:
    """``log(wa e^la + wb e^lb)`` without autograd: ``-inf`` where both terms vanish.

    ``torch.logaddexp`` is one fused, stable pass (it returns ``-inf`` for two ``-inf``
    inputs); written into the first temporary, so only two buffers are ever live.
    """
    xa = la + log_wa
    return torch.logaddexp(xa, lb + log_wb, out=xa)


def _weighted_log_ratio(w: Tensor, la: Tensor, lb: Tensor) -> Tensor:
    """``w · (la - lb)`` with 0 wherever ``w == 0`` (a fresh tensor)."""
    d = la - lb
    d.masked_fill_(w <= 0, 0.0)
    return d.mul_(w)


def _kl(w: Tensor, la: Tensor, lb: Tensor) -> Tensor:
    return _weighted_log_ratio(w, la, lb).sum(-1)


def _rkl_parts(q: Tensor, lq: Tensor, lb: Tensor, need_grad: bool):
    """Value ``Σ q (lq - lb)`` and its ``∂/∂lq`` with ``lb`` held fixed: ``q (lq - lb) + q``."""
    qd = _weighted_log_ratio(q, lq, lb)
    v = qd.sum(-1)
    return v, (qd.add_(q) if need_grad else None)


def kernel(spec: Spec, lq: Tensor, lp: Tensor, q: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``(v [C], G [C, V] or None)`` for ``spec`` on one chunk; ``q = exp(lq)``."""
    kind, prm = spec.kind, spec.params
    if kind == "jsd" and prm["beta"] in (0.0, 1.0):
        kind = "forward_kl" if prm["beta"] == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        p = lp.exp()
        return _kl(p, lp, lq), (p.neg_() if need_grad else None)
    if kind == "reverse_kl":
        return _rkl_parts(q, lq, lp, need_grad)
    if kind == "skew_forward_kl":
        lm = _log_mix(lp, lq, prm["log_a"], prm["log_1ma"])
        p = lp.exp()
        v = _kl(p, lp, lm)
        if not need_grad:
            return v, None
        # ∂lm/∂lq = (1 - α) q / m = exp(log(1 - α) + lq - lm)
        g = lq.sub(lm).add_(prm["log_1ma"]).exp_().mul_(p)
        return v, g.masked_fill_(p <= 0, 0.0).neg_()
    if kind == "skew_reverse_kl":
        lm = _log_mix(lp, lq, prm["log_1ma"], prm["log_a"])
        v, g = _rkl_parts(q, lq, lm, need_grad)
        if need_grad and not prm["detach"]:
            # gradient through the student inside the mixture: -q · α q / m
            r = lq.sub(lm).add_(prm["log_a"]).exp_().mul_(q)
            g.sub_(r.masked_fill_(q <= 0, 0.0))
        return v, g
    if kind == "jsd":
        beta = prm["beta"]
        lm = _log_mix(lp, lq, math.log(beta), math.log1p(-beta))
        v_p = _kl(lp.exp(), lp, lm)
        qd = _weighted_log_ratio(q, lq, lm)
        v = beta * v_p + (1.0 - beta) * qd.sum(-1)
        # β p + (1 - β) q = m makes the mixture terms cancel: G = (1 - β) q (lq - lm)
        return v, (qd.mul_(1.0 - beta) if need_grad else None)
    if kind == "tvd":
        diff = lp.exp().sub_(q)
        v = 0.5 * diff.abs().sum(-1)
        return v, (diff.sign_().mul_(q).mul_(-0.5) if need_grad else None)
    if kind == "adaptive_kl":
        w = adaptive_weights(lq, lp, prm["mu"]).to(lq.dtype)
        p = lp.exp()
        v_f = _kl(p, lp, lq)
        v_r, g_r = _rkl_parts(q, lq, lp, need_grad)
        v = w * v_f + (1.0 - w) * v_r
        if not need_grad:
            return v, None
        g = g_r.mul_((1.0 - w).unsqueeze(-1))
        return v, g.addcmul_(p, w.unsqueeze(-1), value=-1.0)
    raise ValueError(f"unknown divergence {kind!r}")


def value_and_grad_in_parts(spec: Spec, logits: list[Tensor], temperature: float, upstream: Tensor | None,
                            rows: int) -> tuple[Tensor, Tensor | None]:
    """:func:`value_and_grad` over ``rows``-row parts of a chunk's logits, each part's gradient
    written over its student logits (returned whole): the eager kernel's ~8 buffers at the
    size of a part, where a chunk was sized for the compiled kernel's two and its compilation
    failed. The list is emptied."""
    zs, zt = logits
    logits.clear()
    values = []
    for start in range(0, zs.shape[0], rows):
        part = slice(start, start + rows)
        v, g = value_and_grad(spec.take(part), [zs[part], zt[part]], temperature,
                              upstream[part] if upstream is not None else None)
        values.append(v)
        if g is not None:
            zs[part] = g
    return torch.cat(values), (zs if upstream is not None else None)


def value_and_grad(
    spec: Spec, logits: list[Tensor], temperature: float, upstream: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-row values and ``upstream[:, None] · ∂v/∂z_student`` for one chunk.

    ``logits = [z_student, z_teacher]``, each ``[C, V]`` in the compute dtype. The list
    is emptied and the tensors modified in place: handing them over in a list lets each
    be freed as soon as its log-softmax exists (a plain argument would stay referenced
    by the caller). ``upstream [C]`` weights each row's gradient.
    """
    z = logits.pop(0)
    if temperature != 1.0:
        z.div_(temperature)
    lq = torch.log_softmax(z, dim=-1)
    z = logits.pop(0)
    if temperature != 1.0:
        z.div_(temperature)
    lp = torch.log_softmax(z, dim=-1)
    del z
    q = lq.exp()
    v, g = kernel(spec, lq, lp, q, upstream is not None)
    if g is None:
        return v, None
    del lq, lp
    g.addcmul_(q, g.sum(-1, keepdim=True), value=-1.0)
    return v, g.mul_((upstream.to(g.dtype) / temperature).unsqueeze(-1))
