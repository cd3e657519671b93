"""The fused path's per-chunk kernel under ``torch.compile``: two passes over a chunk's logits
and no ``[C, V]`` temporaries.

The eager kernel (:func:`kdray.losses._kernels.value_and_grad`) runs each elementwise step as
its own pass over ``[C, V]`` buffers, about 8 of them live. Compiled (TorchInductor: C++ with
OpenMP and vector instructions on CPU, Triton on GPU), the same math --
:func:`~kdray.losses._kernels.kernel`, written once for both -- becomes two fused loops per
row that read only the two models' logits and write only ``[C]`` row values:

1. :func:`_row_stats`: each model's log-normaliser (``logsumexp(z / T)``), then the per-row
   value ``v`` and ``Σ_V G`` (``G = ∂v/∂lq``), all reductions;
2. :func:`_grad_into_logits`: ``∂v/∂z_student = (G - q Σ_V G) · upstream / T`` recomputed
   elementwise from the logits and the row values, written over the student's logits.

So a chunk holds two ``[C, V]`` float32 buffers (the logits, the student's becoming its
gradient; :data:`INDUCTOR_OPTIONS` keeps JSD's log-mixture from becoming a third) where the
eager kernel holds about eight, and the chunk can be larger for the same memory
(:data:`kdray.losses.fused.COMPILED_CHUNK_PER_HIDDEN`). Recomputing the elementwise
terms in the second pass costs arithmetic, not memory traffic. ``alpha`` and the temperature
enter as a tensor and a symbolic float, so a value that changes every
step (DistiLLM's adaptive α, POCL's rising temperature) reuses the compiled code; JSD's β
is a constant of the compiled code (a new β compiles once more).

``adaptive_kl`` stays eager: its head/tail split sorts every row (:func:`~kdray.losses._core.
adaptive_weights`), which a fused loop cannot do without materialising the sort.

When compilation fails (no C++ compiler on a CPU host, an old Triton), :func:`compiled_chunk`
warns once, naming the cause and the switch that silences it, and the process uses the eager
kernel from then on.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor


from kdray.losses._core import Spec
from kdray.losses._kernels import kernel

#: Divergences the compiled kernel covers (every one but ``adaptive_kl``, see above).
COMPILED_KINDS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd")

#: Compiled variants one process may hold (divergence × mixture detach × values-only/gradient ×
#: scalar/per-token α); torch's default of 8 per function would fall back to eager silently.
RECOMPILE_LIMIT = 64

#: ``compiled=None`` compiles from this vocabulary up: below it a step is short, and the
#: one-time compilation (10-30 s on CPU) would not pay for itself.
COMPILE_MIN_VOCAB = 32768

_state: dict[str, Any] = {"fns": None, "broken": None}


def _log_probs(z: Tensor, temperature: Any, lse: Tensor) -> Tensor:
    return z / temperature - lse


def _row_stats(spec: Spec, zs: Tensor, zt: Tensor, temperature: Any, need_grad: bool):
    """``(lse_s [C, 1], lse_t [C, 1], v [C], Σ_V G [C, 1] or None)``: reductions only."""
    lse_s = torch.logsumexp(zs / temperature, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(zt / temperature, dim=-1, keepdim=True)
    lq, lp = _log_probs(zs, temperature, lse_s), _log_probs(zt, temperature, lse_t)
    v, g = kernel(spec, lq, lp, lq.exp(), need_grad)
    return lse_s, lse_t, v, (g.sum(-1, keepdim=True) if need_grad else None)


def _grad_into_logits(spec: Spec, zs: Tensor, zt: Tensor, temperature: Any, lse_s: Tensor, lse_t: Tensor,
                      g_sum: Tensor, scale: Tensor) -> Tensor:
    """``zs`` overwritten with ``(G - q Σ_V G) · scale``, ``scale = upstream / T`` ``[C, 1]``."""
    lq, lp = _log_probs(zs, temperature, lse_s), _log_probs(zt, temperature, lse_t)
    q = lq.exp()
    _, g = kernel(spec, lq, lp, q, True)
    return zs.copy_((g - q * g_sum) * scale)


#: TorchInductor options of both kernels. ``realize_reads_threshold``: Inductor stores an
#: elementwise result read by more than this many loops (4 by default) in a buffer of its own
#: rather than recomputing it in each. For JSD the log-mixture feeds the value's two sums, so by
#: default it became a third ``[C, V]`` buffer (62.6 MiB per 128-token chunk at V = 128,256);
#: recomputed in the loops that read it, the chunk keeps two buffers and the row statistics ran
#: faster, not slower (0.095 s against 0.132 s per chunk, measured in one process pair).
INDUCTOR_OPTIONS = {"realize_reads_threshold": 1 << 20}


def _compiled() -> tuple[Callable, Callable]:
    if _state["fns"] is None:
        _state["fns"] = tuple(torch.compile(fn, dynamic=True, options=INDUCTOR_OPTIONS)
                              for fn in (_row_stats, _grad_into_logits))
    return _state["fns"]


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The errors of a failed compilation (imported here: TorchDynamo costs a process about a
    second to import, which a process that never compiles need not pay)."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError

    return BackendCompilerFailed, InternalTorchDynamoError


#: Parameters that may change every step (DistiLLM's adaptive α), passed as 0-d tensors: a
#: Python float would be baked into the compiled code and recompile it at each new value.
#: JSD's β stays a float (fixed for a job; its end points 0 and 1 pick a plain KL).
_STEPWISE = ("log_a", "log_1ma")


def _as_tensors(spec: Spec, like: Tensor) -> Spec:
    """``spec`` with its :data:`_STEPWISE` float parameters as 0-d tensors on ``like``'s device."""
    params = {name: torch.tensor(value, dtype=like.dtype, device=like.device)
              if name in _STEPWISE and isinstance(value, float) else value for name, value in spec.params.items()}
    return Spec(spec.kind, params)


def compilable(spec: Spec) -> bool:
    """Whether the compiled kernel covers ``spec`` (and compilation has not failed here)."""
    return spec.kind in COMPILED_KINDS and _state["broken"] is None


def wants_compiled(compiled: bool | None, kind: str, vocab: int) -> bool:
    """Whether ``compiled`` (True, False, or None: "from :data:`COMPILE_MIN_VOCAB` up") asks the
    compiled kernel for divergence ``kind``, which it must cover."""
    return (vocab >= COMPILE_MIN_VOCAB if compiled is None else compiled) and kind in COMPILED_KINDS


def use_compiled(compiled: bool | None, spec: Spec, vocab: int) -> bool:
    """Whether a fused call runs the compiled chunk kernel (:mod:`kdray.losses._compiled`):
    ``compiled`` True or False, or None for "from :data:`COMPILE_MIN_VOCAB` up"; never for a
    divergence it does not cover or once compilation failed in this process."""
    if compiled is not None and not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True, False or None (compile from V = {COMPILE_MIN_VOCAB} up), "
                         f"got {compiled!r}")
    return wants_compiled(compiled, spec.kind, vocab) and compilable(spec)


def compiled_chunk(spec: Spec, logits: list[Tensor], temperature: float,
                   upstream: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """The compiled twin of :func:`kdray.losses._kernels.value_and_grad`: per-row values and
    ``upstream[:, None] · ∂v/∂z_student`` for one chunk, the gradient written over the
    student's logits. ``logits = [z_student, z_teacher]`` ``[C, V]`` in the compute dtype; the
    list is emptied. Returns None, with the logits untouched, when compilation fails here
    (after warning once); the caller then runs the eager kernel.
    """
    if not compilable(spec):
        return None
    zs, zt = logits
    prepared = _as_tensors(spec, zs)
    row_stats, grad_into_logits = _compiled()
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            lse_s, lse_t, v, g_sum = row_stats(prepared, zs, zt, temperature, upstream is not None)
            if upstream is None:
                logits.clear()
                return v, None
            scale = (upstream.to(zs.dtype) / temperature).unsqueeze(-1)
            g = grad_into_logits(prepared, zs, zt, temperature, lse_s, lse_t, g_sum, scale)
    except (*_compile_errors(), OSError) as exc:
        # Compilation failed before any kernel ran (a missing compiler, an unsupported
        # backend, a TorchDynamo bug): zs is as it was. Warn once; this process uses the eager
        # kernel. A user's mistake caught while tracing (TorchRuntimeError) is not caught here:
        # it is the caller's to see, as eager would raise it.
        _state["broken"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(
            f"kdray: torch.compile of the fused loss failed ({_state['broken']}); using the eager kernel in this "
            "process (same results, slower). On CPU, TorchInductor needs a C++ compiler (g++); pass compiled=False "
            "(training.compile_loss: false) to skip the attempt.", RuntimeWarning, stacklevel=3)
        return None
    logits.clear()
    return v, g
