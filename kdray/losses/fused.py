"""Memory-lean fused path: lm-head projection + divergence, chunked over tokens.

The naive KD step materialises ``[N, V]`` float32 logits for both models plus the
softmax/mixture intermediates and their gradients -- at N = 2048 and V = 128k that is
about a gigabyte per tensor. :func:`fused_linear_divergence` instead takes the final
hidden states and the lm-head weights and walks over the tokens in chunks of
``chunk_size`` rows, so only ``[chunk_size, V]`` tensors ever exist.

How gradients are produced (a custom ``torch.autograd.Function``, no autograd graph
per chunk: each divergence has a closed-form value and gradient in
:mod:`kdray.losses._kernels`, written with in-place updates):

* ``reduction`` in ``{"token_mean", "sequence_mean", "sum"}``: the per-token weights of
  the reduction are known up front, so each chunk's gradient with respect to its
  student logits is computed right away in the forward pass and immediately contracted
  into ``grad_hidden[chunk] = G @ W_s`` and ``grad_weight += G^T @ h[chunk]`` (the
  Liger-Kernel approach). Backward only scales those by the incoming scalar.
* ``reduction="none"`` returns per-token values; the upstream gradient is unknown until
  backward, so the forward computes values only and backward *recomputes* each chunk's
  logits (one extra pair of matmuls, activation-checkpointing style).

Memory bound (beyond the inputs): ``grad_hidden [N, Hs]`` + ``grad_weight [V, Hs]``
(+ ``grad_bias [V]``, accumulated in float32) + ``[N]`` values, plus the working set of
one chunk: about 8 ``[chunk_size, V]`` float32 buffers (both models' logits /
log-probs, ``q``, ``p``, a log-space mixture and its two temporaries, the gradient) and
a few boolean masks (``adaptive_kl`` needs about 4 more for its sort).
``chunk_size=None`` sizes the chunk so that one such buffer holds
``DEFAULT_CHUNK_ELEMENTS`` = 6·2^20 elements (24 MiB in float32), i.e. a working set of
about 150-200 MiB whatever V is (49 tokens per chunk at V = 128,256, 196 at V = 32,000;
:mod:`kdray.losses.chunking` walks the chunks).
Smaller chunks use less memory but re-read the lm-head weights more often and run the
matmuls on thinner matrices.

``compiled`` (default: from ``V >= COMPILE_MIN_VOCAB`` up) runs each chunk through the
compiled kernel of :mod:`kdray.losses._compiled` instead (TorchInductor, built ahead of time
by :mod:`kdray.losses._aot`): the same math in two
fused passes, with two float32 ``[chunk_size, V]`` buffers live instead of about eight (and,
for half-precision weights, one model's half-precision logits while they are upcast). Its
default chunk grows with the model instead: ``3 Hs / 4`` tokens (``COMPILED_CHUNK_PER_HIDDEN``;
192 at Hs = 256; never fewer than the eager chunk), so the buffers hold ``1.5 V·Hs`` float32
values, one and a half times the lm_head gradient. Should compilation fail, each chunk runs eager in parts of the eager size. On the
2-core CPU benchmark at V = 128,256 the compiled kernel takes about half the eager one's time
(docs/benchmarks.md).

Values and gradients match the dense (naive) path to float32 rounding: the tests check
1e-5 relative agreement for every divergence, and ``gradcheck`` the path in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdray.losses._compiled import use_compiled
from kdray.losses._core import check_temperature, compute_dtype, make_spec
from kdray.losses.chunking import Plan, chunk_rows, project, run
from kdray.losses.objectives import IGNORE_INDEX
from kdray.losses.reductions import items_divisor

FUSED_REDUCTIONS = ("none", "token_mean", "sequence_mean", "sum")


class _FusedReduced(torch.autograd.Function):
    """Scalar output; gradients computed during forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, token_weight, plan):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        upstream = token_weight if any(want) else None
        values, gh, gw, gb = run(plan, hs, ws, bs, ht, wt, bt, upstream, want)
        ctx.save_for_backward(gh, gw, gb)
        return (values * token_weight.to(values.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        if not (grad_out.numel() == 1 and float(grad_out) == 1.0):
            gh = gh * grad_out if gh is not None else None
            gw = gw * grad_out if gw is not None else None
            gb = gb * grad_out if gb is not None else None
        return gh, gw, gb, None, None, None, None, None


class _FusedPerToken(torch.autograd.Function):
    """``[N]`` output; backward recomputes each chunk with the incoming gradient."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, plan):
        values, _, _, _ = run(plan, hs, ws, bs, ht, wt, bt, None, (False, False, False))
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
        ctx.plan = plan
        return values

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt = ctx.saved_tensors
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        _, gh, gw, gb = run(ctx.plan, hs, ws, bs, ht, wt, bt, grad_out.contiguous(), want)
        return gh, gw, gb, None, None, None, None


def _check_fused(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, mask):
    named = {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
    }
    for name, x in named.items():
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating torch.Tensor")
    if student_hidden.dim() < 2 or teacher_hidden.dim() < 2:
        raise ValueError("student_hidden and teacher_hidden must be [N, H] or [B, T, H]")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading (token) shape, got "
            f"{tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}"
        )
    for side, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{side}_weight must be [V, {h.shape[-1]}] (lm_head.weight), got {tuple(w.shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must share the vocabulary size, got {student_weight.shape[0]} and "
            f"{teacher_weight.shape[0]}; pad the smaller lm_head with rows and a -inf bias"
        )
    vocab = student_weight.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (vocab,)):
            raise ValueError(f"{name} must be None or a [V={vocab}] tensor")
    if torch.is_grad_enabled():
        teacher = {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
        for name, x in teacher.items():
            if x is not None and x.requires_grad:
                raise ValueError(f"{name} requires grad, but the teacher is frozen here: pass {name}.detach()")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != student_hidden.shape[:-1]):
        raise ValueError(f"mask must be None or a tensor of shape {tuple(student_hidden.shape[:-1])}")


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str,
    reduction: str,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    compiled: bool | None = None,
    **divergence_kwargs,
) -> Tensor:
    """Divergence between ``h_s @ W_s^T (+ b_s)`` and ``h_t @ W_t^T (+ b_t)`` without full logits.

    Args:
        student_hidden: ``[N, Hs]`` or ``[B, T, Hs]`` final hidden states (gets a gradient).
        student_weight: ``[V, Hs]`` student lm_head weight (gets a gradient).
        teacher_hidden: ``[N, Ht]`` / ``[B, T, Ht]``; teacher_weight ``[V, Ht]``. Frozen:
            passing tensors that require grad raises ValueError.
        divergence: a key of ``DIVERGENCES``; ``divergence_kwargs`` are its parameters
            (``alpha`` may be a float, per-sample ``[B]`` for ``[B, T, H]`` inputs, or
            per-token with the leading shape of the hidden states).
        reduction: ``"none"`` -> per-token values with the leading shape (0 where
            ``mask`` is unset; those tokens are never computed), so the reductions of
            :mod:`kdray.losses.objectives` apply; ``"token_mean"`` / ``"sum"`` over
            unmasked tokens; ``"sequence_mean"`` (needs ``[B, T, H]``) as
            :func:`sequence_then_batch_mean`.
        temperature: divides both models' logits.
        mask: ``[N]`` / ``[B, T]``, nonzero = use this token. None = all tokens. The
            rows of masked tokens are never read: they may hold anything (NaN, ±inf)
            and contribute exactly 0 to the value and to every gradient.
        chunk_size: tokens per chunk; None sizes one ``[chunk, V]`` float32 buffer at
            24 MiB eager, at ``3 Hs / 4`` tokens compiled (see the module docstring). Does not
            change the result beyond float rounding.
        num_items_in_batch: for ``"token_mean"`` / ``"sequence_mean"``, the whole
            optimizer step's items (unmasked tokens / non-empty sequences,
            :func:`kdray.losses.num_items` summed over micro-batches and ranks) to divide
            by instead of this call's own, so that micro-batches add up to the step's mean
            (Hugging Face's ``num_items_in_batch``; :mod:`kdray.losses.reductions`).
        compiled: run each chunk through the compiled kernel (TorchInductor: two fused
            passes, two ``[chunk, V]`` buffers instead of about eight) -- True, False, or
            None to compile when ``V >= 32,768``. ``adaptive_kl`` always runs eager; a failed
            build warns once and falls back to eager. The first call on a machine builds the
            kernels in a child process (10-30 s each, logged) into
            ``$KDRAY_LOCAL_CACHE_DIR/kernels``, ``~/.cache/kdray/kernels`` by default
            (docs/guide.md, ``training.compile_loss``).

    Returns a scalar, or per-token values (float32; float64 for float64 inputs).
    Raises ValueError for bad shapes or arguments, ``num_items_in_batch`` with
    ``reduction`` ``"none"`` or ``"sum"`` included.
    """
    _check_fused(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, mask)
    if reduction not in FUSED_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FUSED_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = tuple(student_hidden.shape[:-1])
    if reduction == "sequence_mean" and len(lead) != 2:
        raise ValueError("reduction='sequence_mean' needs [B, T, H] hidden states (it averages per sequence)")
    if num_items_in_batch is not None and reduction not in ("token_mean", "sequence_mean"):
        raise ValueError(f"num_items_in_batch applies to token_mean and sequence_mean, not reduction={reduction!r}")
    t = check_temperature(temperature)
    n = 1
    for d in lead:
        n *= d
    alpha = divergence_kwargs.get("alpha")
    if isinstance(alpha, Tensor) and alpha.dim() > 0:
        # per-sample [B] -> per-token, then flattened like the hidden states
        if tuple(alpha.shape) == lead[:1] and len(lead) > 1:
            alpha = alpha.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)
        elif tuple(alpha.shape) != lead:
            raise ValueError(f"alpha tensor must have shape {lead[:1]} (per sample) or {lead} (per token)")
        divergence_kwargs["alpha"] = alpha.reshape(n)
    spec = make_spec(divergence, (n,), student_hidden.device, **divergence_kwargs)

    hs = student_hidden.reshape(n, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    keep = None if mask is None else (mask.reshape(n).to(hs.device) != 0)
    rows = None if keep is None or bool(keep.all()) else keep.nonzero().squeeze(-1)
    n_rows = n if rows is None else rows.numel()
    vocab = student_weight.shape[0]
    fast = use_compiled(compiled, spec, vocab)
    plan = Plan(spec, t, rows, n, chunk_rows(n_rows, vocab, chunk_size, fast, student_weight.shape[1]), fast)

    if reduction == "none":
        values = _FusedPerToken.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, plan)
        return values.reshape(lead)
    wdtype = torch.float64 if hs.dtype == torch.float64 else torch.float32
    keep_f = torch.ones(n, device=hs.device, dtype=wdtype) if keep is None else keep.to(wdtype)
    if reduction == "sum":
        weight = keep_f
    elif reduction == "token_mean":
        weight = keep_f / items_divisor(num_items_in_batch, keep_f.sum(), wdtype)
    else:
        per_seq = keep_f.reshape(lead)
        counts = per_seq.sum(-1, keepdim=True)
        items = items_divisor(num_items_in_batch, (counts > 0).sum(), wdtype)
        weight = (per_seq / counts.clamp_min(1.0) / items).reshape(n)
    return _FusedReduced.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, weight, plan)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    """Token-mean hard-label cross-entropy of ``hidden @ weight^T (+ bias)`` without full logits.

    ``hidden [N, H]`` / ``[B, T, H]``, ``labels`` with the leading shape (-100 = ignore), ``mask``
    likewise (nonzero = use). Each chunk of tokens is recomputed in backward
    (``torch.utils.checkpoint``), so only one ``[chunk, V]`` block of logits exists at a time,
    as in :func:`fused_linear_divergence` (the same default chunk sizing). Equals
    :func:`kdray.losses.token_cross_entropy` reduced by :func:`masked_token_mean`.
    Dropped rows are never read: NaN hidden states or garbage labels there contribute
    exactly 0 to the value and the gradients. ``num_items_in_batch``: the whole optimizer
    step's kept tokens to divide by instead of this call's own (see
    :func:`fused_linear_divergence`). Returns a scalar; raises ValueError for bad shapes.
    """
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without H), got {tuple(labels.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    keep = y != IGNORE_INDEX
    if mask is not None:
        keep &= mask.reshape(-1).to(y.device) != 0
    rows = keep.nonzero().squeeze(-1)
    if rows.numel() == 0:
        # no token: a zero that keeps the graph; empty slices, so no NaN row is read
        return h[:0].sum() + weight[:0].sum()
    step = chunk_rows(rows.numel(), weight.shape[0], chunk_size)

    def chunk_nll(hc: Tensor, yc: Tensor) -> Tensor:
        logits = compute_dtype(project(hc, weight, bias))
        return (torch.logsumexp(logits, dim=-1) - logits.gather(-1, yc.unsqueeze(-1)).squeeze(-1)).sum()

    total = None
    for start in range(0, rows.numel(), step):
        idx = rows[start: start + step]
        part = checkpoint(chunk_nll, h.index_select(0, idx), y.index_select(0, idx), use_reentrant=False)
        total = part if total is None else total + part
    return total / items_divisor(num_items_in_batch, torch.tensor(rows.numel(), device=total.device), total.dtype)
