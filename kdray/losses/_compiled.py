"""The fused path's per-chunk kernel compiled by TorchInductor: two passes over a chunk's
logits and no ``[C, V]`` temporaries.

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
(:data:`kdray.losses.chunking.COMPILED_CHUNK_PER_HIDDEN`). Recomputing the elementwise
terms in the second pass costs arithmetic, not memory traffic.

Each pass is exported (:func:`export_kernel`; the chunk's rows and the vocabulary symbolic)
and built ahead of time into an AOTInductor package by :mod:`kdray.losses._aot`, in a child
process and once per machine, so the process computing the loss never imports the compiler.
``alpha`` and the temperature are inputs of the kernels (tensors), so a value that changes
every step (DistiLLM's adaptive α, POCL's rising temperature) reuses them; JSD's β and the
mixture's detach are constants of a kernel (a new β builds one more), as are the compute dtype
and whether α is per row. A one-row chunk runs eager (the export's rows start at 2).

``adaptive_kl`` stays eager: its head/tail split sorts every row (:func:`~kdray.losses._core.
adaptive_weights`), which a fused loop cannot do without materialising the sort.

When a build fails (no C++ compiler on a CPU host, an old Triton, an unwritable cache),
:func:`compiled_chunk` warns once, at the caller's line, naming the cause, what to install
where a toolchain is missing, and the switch that silences it; the process uses the eager
kernel from then on.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from kdray.losses import _aot
from kdray.losses._core import Spec
from kdray.losses._kernels import kernel

#: Divergences the compiled kernel covers (every one but ``adaptive_kl``, see above).
COMPILED_KINDS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd")

#: ``compiled=None`` compiles from this vocabulary up: below it a step is short, and a
#: machine's first build (10-30 s per kernel on CPU) would not pay for itself.
COMPILE_MIN_VOCAB = 32768

_state: dict[str, Any] = {"broken": None}


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


#: Parameters that may change every step (DistiLLM's adaptive α): inputs of the kernels (0-d or
#: ``[C, 1]`` tensors in the compute dtype), where a Python float would be a constant of the
#: built code and need a build per value. JSD's β stays a constant (fixed for a job; its end
#: points 0 and 1 pick a plain KL).
_STEPWISE = ("log_a", "log_1ma")


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


def _key(spec: Spec, which: str, zs: Tensor, need_grad: bool) -> dict[str, Any]:
    """What identifies a compiled kernel (:func:`kdray.losses._aot.package_path`): the pass,
    the divergence, its constant parameters (JSD's β, the mixture's detach), which
    :data:`_STEPWISE` parameters are scalars or per row, the compute dtype, the values-only
    variant of the row pass."""
    params = spec.params
    return {
        "pass": which, "kind": spec.kind, "dtype": str(zs.dtype).removeprefix("torch."), "need_grad": need_grad,
        "constants": {k: v for k, v in sorted(params.items()) if k not in _STEPWISE},
        "stepwise": {k: ("row" if isinstance(params[k], Tensor) and params[k].dim() > 0 else "scalar")
                     for k in _STEPWISE if k in params},
    }


class _Pass(torch.nn.Module):
    """A chunk pass as a module to export: kernel ``key``'s divergence with its constants, the
    :data:`_STEPWISE` parameters as the trailing inputs."""

    def __init__(self, key: dict[str, Any]):
        super().__init__()
        self.key = key

    def spec(self, stepwise: tuple[Tensor, ...]) -> Spec:
        return Spec(self.key["kind"], {**self.key["constants"], **dict(zip(self.key["stepwise"], stepwise))})


class _RowStats(_Pass):
    """:func:`_row_stats`: ``(zs, zt, temperature, *stepwise)`` → ``(lse_s, lse_t, v[, Σ_V G])``."""

    def forward(self, zs: Tensor, zt: Tensor, temperature: Tensor, *stepwise: Tensor) -> tuple[Tensor, ...]:
        lse_s, lse_t, v, g_sum = _row_stats(self.spec(stepwise), zs, zt, temperature, self.key["need_grad"])
        return (lse_s, lse_t, v) if g_sum is None else (lse_s, lse_t, v, g_sum)


class _Grad(_Pass):
    """:func:`_grad_into_logits`: writes the gradient over ``zs``."""

    def forward(self, zs: Tensor, zt: Tensor, temperature: Tensor, lse_s: Tensor, lse_t: Tensor, g_sum: Tensor,
                scale: Tensor, *stepwise: Tensor) -> Tensor:
        _grad_into_logits(self.spec(stepwise), zs, zt, temperature, lse_s, lse_t, g_sum, scale)
        return lse_s[:1, 0]  # an output of a row's size: a package's run returns at least one


def export_kernel(key: dict[str, Any], device: torch.device, out: str) -> None:
    """Export kernel ``key`` with the chunk's rows and the vocabulary symbolic and compile it
    into the AOTInductor package ``out`` (:mod:`kdray.losses._aot` runs this in a child
    process: TorchInductor stays out of the process computing the loss)."""
    dtype = getattr(torch, key["dtype"])
    rows, vocab = torch.export.Dim("rows", min=2), torch.export.Dim("vocab", min=2)
    c, v = 8, 1000
    matrix, column = {0: rows, 1: vocab}, {0: rows}

    def make(*shape: int) -> Tensor:
        return torch.randn(shape, dtype=dtype, device=device)

    stepwise = [make(c, 1) if kind == "row" else make().clamp(-2.0, -0.1) for kind in key["stepwise"].values()]
    step_dims = tuple(column if kind == "row" else None for kind in key["stepwise"].values())
    temperature = torch.tensor(1.5, dtype=dtype, device=device)
    if key["pass"] == "rows":
        module, inputs, dims = _RowStats(key), (make(c, v), make(c, v), temperature), (matrix, matrix, None)
    else:
        cols = tuple(make(c, 1) for _ in range(4))
        module, inputs, dims = (_Grad(key), (make(c, v), make(c, v), temperature, *cols),
                                (matrix, matrix, None, column, column, column, column))
    # *stepwise is one entry of dynamic_shapes (a tuple), none when the kernel has no such input
    program = torch.export.export(module, (*inputs, *stepwise), dynamic_shapes=(*dims, step_dims) if stepwise else dims)
    # Parallel loops take the loading process's thread count (torch.set_num_threads), not this
    # process's: a package serves every process on the machine.
    options = {**INDUCTOR_OPTIONS, "cpp.dynamic_threads": True}
    torch._inductor.aoti_compile_and_package(program, package_path=out, inductor_configs=options)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function calling this, of the first frame
    outside kdray.losses and torch: the user's (or the training step's) call of the loss."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def compiled_chunk(spec: Spec, logits: list[Tensor], temperature: float,
                   upstream: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """The compiled twin of :func:`kdray.losses._kernels.value_and_grad`: per-row values and
    ``upstream[:, None] · ∂v/∂z_student`` for one chunk, the gradient written over the
    student's logits. ``logits = [z_student, z_teacher]`` ``[C, V]`` in the compute dtype; the
    list is emptied. Returns None, with the logits untouched, for a one-row chunk (the eager
    kernel's size there) and when the kernel cannot be built or loaded here (after warning
    once); the caller then runs the eager kernel.
    """
    if not compilable(spec):
        return None
    zs, zt = logits
    if zs.shape[0] < 2:
        return None
    need_grad = upstream is not None
    try:
        row_stats = _aot.load(_key(spec, "rows", zs, need_grad), zs.device)
        grad_into_logits = _aot.load(_key(spec, "grad", zs, True), zs.device) if need_grad else None
    except _aot.KernelBuildError as exc:
        # Nothing ran: zs is as it was. Warn once; this process uses the eager kernel.
        _state["broken"] = str(exc)
        hint = f" {exc.hint[0].upper()}{exc.hint[1:]}." if exc.hint else ""
        warnings.warn(
            f"kdray: the fused loss's compiled kernel failed ({exc}); using the eager kernel in this process "
            f"(same results, slower).{hint} Pass compiled=False (training.compile_loss: false) to skip the attempt.",
            RuntimeWarning, stacklevel=_caller_stacklevel())
        return None
    stepwise = [torch.as_tensor(spec.params[name], dtype=zs.dtype, device=zs.device).contiguous()
                for name in _STEPWISE if name in spec.params]
    t = torch.tensor(temperature, dtype=zs.dtype, device=zs.device)
    zs, zt = zs.contiguous(), zt.contiguous()
    lse_s, lse_t, v, *rest = row_stats.run([zs, zt, t, *stepwise])
    logits.clear()
    if not need_grad:
        return v, None
    scale = (upstream.to(zs.dtype) / temperature).unsqueeze(-1).contiguous()
    grad_into_logits.run([zs, zt, t, lse_s, lse_t, rest[0], scale, *stepwise])
    return v, zs


if __name__ == "__main__":  # a package build's child process (kdray.losses._aot)
    raise SystemExit(_aot.main(export_kernel))
