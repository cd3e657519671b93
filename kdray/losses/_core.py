"""Shared numerics for :mod:`kdray.losses`: argument checks, log-space helpers, and
every divergence written once as a function of log-probabilities.

All public entry points (dense logits, sparse top-k buckets, the fused chunked path)
reduce their inputs to a pair of normalised log-probability tensors
``lq`` (student) and ``lp`` (teacher) of shape ``[..., K]`` and call
:func:`divergence_from_logprobs`. Keeping one implementation is what makes the three
paths agree to rounding error.

Conventions used throughout:

* ``p = exp(lp)`` is the teacher distribution, ``q = exp(lq)`` the student's.
* ``0 · log 0 = 0``: a vocabulary entry that has probability exactly 0 under the
  distribution weighting a KL term contributes 0, and -- this is the part that needs
  care -- a zero gradient, never ``0 · inf = NaN``. Entries that are ``-inf`` in both
  models (a padded vocabulary) therefore drop out of every divergence.
* Mixtures such as ``log(α p + (1 - α) q)`` are formed in log space (a two-term
  log-sum-exp with the running maximum detached), so they stay finite when both
  probabilities underflow and never take ``log`` of 0 in a branch that gets a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

NEG_INF = float("-inf")

# Parameters each divergence takes (beyond temperature), and whether each is required.
# ``None`` as default means "required": no hidden default changes the objective.
PARAMS: dict[str, dict[str, object]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "skew_forward_kl": {"alpha": None},
    "skew_reverse_kl": {"alpha": None, "detach_mixture_student": None},
    "jsd": {"beta": None},
    "tvd": {},
    "adaptive_kl": {"mu": 0.5},
}


# --------------------------------------------------------------------------- checks


def check_temperature(temperature: object) -> float:
    """Return ``temperature`` as a float, or raise if it is not a finite positive number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_logits_pair(student_logits: object, teacher_logits: object) -> None:
    """Both logits must be floating tensors of the same shape ``[..., V]`` with ndim >= 2."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape [B, T, V] (at least 2 dims), got {tuple(x.shape)}")
    if student_logits.shape != teacher_logits.shape:  # type: ignore[union-attr]
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [B, T, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; "  # type: ignore[union-attr]
            "pad the smaller vocabulary with -inf logits in both models"
        )


def keep_mask(mask: object, lead: tuple[int, ...], device: torch.device, name: str = "mask") -> Tensor:
    """``mask != 0`` as a bool tensor of shape ``lead`` on ``device``; ValueError if the shape differs."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(lead):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(lead)} (one entry per position), got {shape}")
    return mask.to(device=device) != 0


def neutralise(x: Tensor, keep: Tensor, fill: float | Tensor = 0.0) -> Tensor:
    """``x [..., K]`` with the rows of masked positions (``keep [...]`` False) set to ``fill``.

    This is how every mask-taking entry point keeps masked positions out of the gradient:
    selecting the *output* with ``torch.where`` zeroes the upstream gradient there, but a
    divergence's own backward at that position still computes ``0 · NaN = NaN`` when the
    position holds NaN or ±inf (a teacher's padding). Replacing the *input* by a constant
    first leaves no path from the garbage to anything: ``where``'s backward passes 0 to it.
    """
    return torch.where(keep.unsqueeze(-1), x, fill)


def compute_dtype(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32 (divergences are summed over V entries)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dim, in float32 or float64."""
    x = compute_dtype(logits)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _log_or_neg_inf(x: float) -> float:
    return math.log(x) if x > 0.0 else NEG_INF


def _prepare_weight(value: object, name: str, token_shape: tuple[int, ...], device: torch.device):
    """Validate a mixing weight in [0, 1] (float, per-sample ``[B]`` or per-token tensor).

    Returns ``(log w, log(1 - w))`` either as floats or as float32 tensors of shape
    ``[B, 1, ..., 1]`` / ``[*token_shape, 1]`` that broadcast against ``[..., K]``.
    The weight is a hyper-parameter: it is detached, no gradient flows into it.
    """
    if isinstance(value, Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} tensor must be real-valued, got dtype {value.dtype}")
        w = value.detach().to(device=device, dtype=torch.float32)
        if w.dim() == 0:
            return _prepare_weight(float(w), name, token_shape, device)
        if tuple(w.shape) == tuple(token_shape):
            w = w.unsqueeze(-1)
        elif tuple(w.shape) == tuple(token_shape[:1]):
            w = w.reshape(w.shape + (1,) * len(token_shape))
        else:
            raise ValueError(
                f"{name} tensor must have shape {tuple(token_shape[:1])} (per sample) or "
                f"{tuple(token_shape)} (per token), got {tuple(w.shape)}"
            )
        if not bool(torch.all((w >= 0.0) & (w <= 1.0))):
            raise ValueError(f"{name} values must lie in [0, 1]; clamp them before calling")
        return torch.log(w), torch.log1p(-w)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1] or a tensor of them, got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return _log_or_neg_inf(v), _log_or_neg_inf(1.0 - v)


def _check_unit_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class Spec:
    """A validated divergence choice with its parameters prepared for log-space use."""

    kind: str
    params: dict = field(default_factory=dict)

    def take(self, rows: Tensor | slice) -> "Spec":
        """The same spec restricted to some leading rows (used by the chunked path)."""
        sliced = {k: (v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in self.params.items()}
        return Spec(self.kind, sliced)


def check_params(kind: str, kwargs: dict) -> dict:
    """Check ``kind`` and the names of its parameters; return them with defaults filled."""
    if kind not in PARAMS:
        raise ValueError(f"divergence must be one of {sorted(PARAMS)}, got {kind!r}")
    allowed = PARAMS[kind]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{kind} does not take {unknown}; its parameters are {sorted(allowed) or 'none'}")
    values = {name: kwargs.get(name, default) for name, default in allowed.items()}
    missing = sorted(name for name, v in values.items() if v is None)
    if missing:
        raise ValueError(f"{kind} requires {missing} (no default: it changes the objective)")
    return values


def make_spec(kind: str, token_shape: tuple[int, ...], device: torch.device, **kwargs) -> Spec:
    """Validate ``kind`` and its keyword parameters; raise ValueError naming what is wrong."""
    values = check_params(kind, kwargs)
    prepared: dict = {}
    if "alpha" in values:
        prepared["log_a"], prepared["log_1ma"] = _prepare_weight(values["alpha"], "alpha", token_shape, device)
    if "detach_mixture_student" in values:
        if not isinstance(values["detach_mixture_student"], bool):
            raise ValueError("detach_mixture_student must be True (DistiLLM-2) or False (DistiLLM)")
        prepared["detach"] = values["detach_mixture_student"]
    if "beta" in values:
        prepared["beta"] = _check_unit_float(values["beta"], "beta")
    if "mu" in values:
        prepared["mu"] = _check_unit_float(values["mu"], "mu")
    return Spec(kind, prepared)


# ------------------------------------------------------------------ log-space pieces


def kl_terms_sum(la: Tensor, lb: Tensor) -> Tensor:
    """``Σ a (log a - log b)`` over the last dim with ``0 · log 0 = 0`` (value and grad)."""
    a = la.exp()
    return (a * torch.where(a > 0, la - lb, 0.0)).sum(-1)


def log_mix(la: Tensor, lb: Tensor, log_wa, log_wb) -> Tensor:
    """``log(wa · exp(la) + wb · exp(lb))`` elementwise, computed in log space.

    The larger of the two weighted terms is factored out (detached: the result does
    not depend on that shift), so the sum inside the log is in ``[1, 2]`` and never
    underflows. Where both terms are exactly zero the result is ``-inf`` and the
    gradient is 0 rather than NaN.
    """
    xa = la + log_wa
    xb = lb + log_wb
    m = torch.maximum(xa, xb).detach()
    finite = torch.isfinite(m)
    m = torch.where(finite, m, 0.0)
    s = (xa - m).exp() + (xb - m).exp()
    return torch.where(finite, torch.log(torch.where(finite, s, 1.0)) + m, NEG_INF)


def safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` over ``dim`` that returns ``-inf`` with zero gradient for all ``-inf`` input."""
    m = x.detach().amax(dim=dim, keepdim=True)
    finite = torch.isfinite(m)
    m = torch.where(finite, m, 0.0)
    s = (x - m).exp().sum(dim=dim, keepdim=True)
    out = torch.where(finite, torch.log(torch.where(finite, s, 1.0)) + m, NEG_INF)
    return out.squeeze(dim)


def adaptive_weights(lq: Tensor, lp: Tensor, mu: float, tail_bucket: bool = False) -> Tensor:
    """AKL head weight ``g_head / (g_head + g_tail)`` per token (no gradient).

    Teacher probabilities are sorted in descending order; the head is every token whose
    inclusive cumulative teacher mass is ``<= mu``, plus always the top-1 token. The gaps
    ``|p - sg(q)|`` are summed over head and tail. When both sums are 0 (the models agree
    everywhere) the weight is 1, i.e. AKL falls back to forward KL, which is then 0.
    ``tail_bucket=True`` (sparse path): the last entry lumps many low-probability tokens,
    so it is kept out of the sort and always counted in the tail.
    """
    with torch.no_grad():
        total = (lp.exp() - lq.exp()).abs_().sum(-1)
        k = lp.shape[-1] - 1 if tail_bucket else lp.shape[-1]
        p_sorted, order = lp[..., :k].exp().sort(dim=-1, descending=True)
        gap_sorted = lq[..., :k].gather(-1, order).exp_().sub_(p_sorted).abs_()
        del order
        head = p_sorted.cumsum_(dim=-1) <= mu
        del p_sorted
        head[..., 0] = True
        g_head = gap_sorted.mul_(head).sum(-1)
        return torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 1.0)


def divergence_from_logprobs(spec: Spec, lq: Tensor, lp: Tensor) -> Tensor:
    """Per-row divergence between student ``lq`` and teacher ``lp`` log-probs ``[..., K]``.

    Returns ``[...]``. See :mod:`kdray.losses.divergences` for the formulas.
    """
    kind, prm = spec.kind, spec.params
    if kind == "forward_kl":
        return kl_terms_sum(lp, lq)
    if kind == "reverse_kl":
        return kl_terms_sum(lq, lp)
    if kind == "skew_forward_kl":
        return kl_terms_sum(lp, log_mix(lp, lq, prm["log_a"], prm["log_1ma"]))
    if kind == "skew_reverse_kl":
        lq_mix = lq.detach() if prm["detach"] else lq
        return kl_terms_sum(lq, log_mix(lp, lq_mix, prm["log_1ma"], prm["log_a"]))
    if kind == "jsd":
        beta = prm["beta"]
        if beta == 0.0:
            return kl_terms_sum(lp, lq)
        if beta == 1.0:
            return kl_terms_sum(lq, lp)
        lm = log_mix(lp, lq, math.log(beta), math.log1p(-beta))
        return beta * kl_terms_sum(lp, lm) + (1.0 - beta) * kl_terms_sum(lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "adaptive_kl":
        w_head = adaptive_weights(lq, lp, prm["mu"], tail_bucket=prm.get("tail_bucket", False))
        return w_head * kl_terms_sum(lp, lq) + (1.0 - w_head) * kl_terms_sum(lq, lp)
    raise ValueError(f"unknown divergence {kind!r}")  # unreachable after make_spec
