"""How the fused path (:mod:`kdray.losses.fused`) walks the tokens: the chunk size, the
lm-head projection of a chunk, and the loop that computes each chunk's values and closed-form
gradients (eager :mod:`kdray.losses._kernels`, or the compiled kernel of
:mod:`kdray.losses._compiled`) and contracts them into the hidden-state, weight and bias
gradients. No autograd graph is built here; :mod:`kdray.losses.fused` wraps :func:`run` in
its autograd Functions.

Chunk sizes (tokens per chunk, ``C``): eager, one ``[C, V]`` float32 buffer of
:data:`DEFAULT_CHUNK_ELEMENTS` (about 8 such buffers live); compiled,
:data:`COMPILED_CHUNK_PER_HIDDEN` times the student's hidden size (2 live), never below the
eager chunk. :func:`chunk_working_set_bytes` is the memory estimate's share of a chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdray.losses._compiled import compiled_chunk
from kdray.losses._core import Spec, compute_dtype
from kdray.losses._kernels import value_and_grad, value_and_grad_in_parts

#: The eager kernel's chunk: one ``[C, V]`` float32 buffer of this many elements (24 MiB; about 8
#: such buffers live, so 150-200 MiB whatever V is: 49 tokens at V = 128,256, 196 at V = 32,000).
DEFAULT_CHUNK_ELEMENTS = 6 << 20
#: The compiled kernel's chunk, from the student's hidden size ``Hs``: ``3 Hs / 4`` tokens, so its
#: two live ``[C, V]`` float32 buffers together hold ``1.5 V × Hs`` values, one and a half times
#: the lm_head gradient the step holds anyway (192 tokens, 188 MiB at Hs = 256, V = 128,256; 672
#: at Qwen2.5-0.5B's Hs = 896). Larger chunks run the lm-head matmuls faster (they re-read both
#: heads and rewrite ``grad_weight`` once per chunk) and cost memory linearly: ``kdray bench
#: losses --sweep`` prints the frontier (docs/benchmarks.md; at Hs = 256 the step took 6.7 s at
#: ``Hs / 2``, the default until 2026-12-04, and 5.8 s at ``3 Hs / 4``). A small student's chunk
#: is never below the eager one (24 tokens at Hs = 32 would run the matmuls on slivers): the
#: compiled kernel's two buffers there hold a quarter of the eager kernel's eight.
COMPILED_CHUNK_PER_HIDDEN = 0.75


def chunk_rows(n_rows: int, vocab: int, chunk_size: int | None, compiled: bool = False, hidden: int = 0) -> int:
    """Tokens per chunk: ``chunk_size``, else eager ``DEFAULT_CHUNK_ELEMENTS / V``, compiled
    ``COMPILED_CHUNK_PER_HIDDEN · hidden`` (the student's hidden size) but not fewer than eager;
    at most ``n_rows``."""
    if chunk_size is None:
        rows = DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)
        if compiled:
            rows = max(rows, int(COMPILED_CHUNK_PER_HIDDEN * hidden))
        return max(1, min(n_rows, rows))
    return chunk_size


def chunk_working_set_bytes(n_rows: int, vocab: int, hidden: int, compiled: bool, upcast: bool = False) -> int:
    """Bytes of one chunk's ``[C, V]`` buffers at the default chunk size for a student of hidden
    size ``hidden``: about 8 float32 ones live in the eager kernel, 2 in the compiled one, plus
    with ``upcast`` (half-precision weights) one half-precision ``[C, V]`` of logits while it is
    upcast; the memory estimate of a training worker."""
    per_element = (8 if not compiled else 2) * 4 + (2 if upcast else 0)
    return per_element * chunk_rows(n_rows, vocab, None, compiled, hidden) * vocab


def project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits


def _project_into(hidden: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor) -> Tensor:
    """:func:`project` written into the first rows of a reused ``[chunk, V]`` buffer: a fresh
    buffer per chunk costs its page faults again (tens of ms per chunk at V = 128k on CPU)."""
    out = torch.mm(hidden, weight.t(), out=buffer[: hidden.shape[0]])
    return out.add_(bias) if bias is not None else out


class Plan:
    """Everything the autograd Function needs besides tensors."""

    def __init__(self, spec: Spec, temperature: float, rows: Tensor | None, n_tokens: int, chunk: int,
                 compiled: bool = False):
        self.spec, self.temperature, self.rows, self.n_tokens, self.chunk = spec, temperature, rows, n_tokens, chunk
        self.compiled = compiled

    def chunks(self):
        """Yield row selectors (slices, or index tensors when a mask drops rows)."""
        total = self.n_tokens if self.rows is None else self.rows.numel()
        for start in range(0, total, self.chunk):
            stop = min(start + self.chunk, total)
            yield slice(start, stop) if self.rows is None else self.rows[start:stop]


def run(plan: Plan, hs, ws, bs, ht, wt, bt, upstream: Tensor | None, want: tuple[bool, bool, bool]):
    """Per-token values ``[N]`` and, if ``upstream`` is given, the student gradients.

    ``upstream [N]`` weights each token's value (the reduction weights, or the incoming
    gradient for ``reduction="none"``). ``want`` says which of (hidden, weight, bias)
    gradients to build. Runs without autograd (closed-form gradients, ``_kernels``).
    """
    n = plan.n_tokens
    values = torch.zeros(n, dtype=torch.float64 if hs.dtype == torch.float64 else torch.float32, device=hs.device)
    acc_dtype = torch.float64 if ws.dtype == torch.float64 else torch.float32
    grads = upstream is not None and any(want)
    grad_h = torch.zeros_like(hs) if grads and want[0] else None
    grad_w = torch.zeros(ws.shape, dtype=acc_dtype, device=ws.device) if grads and want[1] else None
    grad_b = torch.zeros(bs.shape, dtype=acc_dtype, device=bs.device) if grads and want[2] and bs is not None else None
    # The compiled kernel keeps both logits to the end of a chunk: they reuse two buffers.
    # (The eager kernel frees each as soon as its log-softmax is taken.)
    reuse = plan.compiled and ws.dtype == wt.dtype == compute_dtype(ws).dtype
    work = [torch.empty(min(plan.chunk, n), w.shape[0], dtype=w.dtype, device=w.device) for w in (ws, wt)] \
        if reuse else None
    with torch.no_grad():
        for sel in plan.chunks():
            h = hs[sel]
            # The logits go in a list that the kernel empties, so each is freed as soon as
            # it is no longer needed.
            spec = plan.spec.take(sel)
            if work is not None:
                logits = [_project_into(h, ws, bs, work[0]), _project_into(ht[sel], wt, bt, work[1])]
            else:
                logits = [compute_dtype(project(h, ws, bs)), compute_dtype(project(ht[sel], wt, bt))]
            up = upstream[sel] if grads else None
            if not plan.compiled:
                v, g = value_and_grad(spec, logits, plan.temperature, up)
            else:  # None when compilation failed: then eager, in parts of the eager size
                v, g = compiled_chunk(spec, logits, plan.temperature, up) or value_and_grad_in_parts(
                    spec, logits, plan.temperature, up, chunk_rows(plan.chunk, ws.shape[0], None))
            values[sel] = v.to(values.dtype)
            if g is None:
                continue
            g = g.to(ws.dtype)
            if grad_h is not None:
                grad_h[sel] = g @ ws
            if grad_w is not None:
                grad_w.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
            if grad_b is not None:
                grad_b.add_(g.sum(0).to(acc_dtype))
            del g
    grad_w = grad_w.to(ws.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bs.dtype) if grad_b is not None else None
    return values, grad_h, grad_w, grad_b
