"""Divergences against a sparse (offline-scored) teacher: top-k log-probs plus a tail.

When the teacher is scored offline only its top-k tokens per position are stored:
``teacher_topk_ids [B, T, k]`` (long) and ``teacher_topk_logprobs [B, T, k]``, plus the
tail mass ``1 - Σ exp(topk_logprobs)`` (computed here, or passed in when the scorer
recorded it). That is a distribution over ``k + 1`` *buckets*: the k tokens and one
"everything else" bucket. The student's full distribution is collapsed onto the same
buckets: its top-k entries are gathered and its tail log-mass is the log-sum-exp of its
log-probs over all non-top-k tokens (stable even when the tail holds 1e-30 of the mass,
where ``log(1 - Σ q_topk)`` would cancel to ``log 0``).

Every divergence is then evaluated *exactly* on the two ``(k + 1)``-bucket
distributions. What that approximates, precisely:

* ``forward_kl`` is exact for the representation: it is ``KL(P_b || Q_b)`` over the
  buckets. The dense forward KL exceeds it by ``p_tail · KL(p(·|tail) || q(·|tail))``,
  the mismatch *inside* the tail, which the representation cannot see; the two are
  equal when ``k = V`` or when the student's conditional tail distribution equals the
  teacher's.
* ``reverse_kl``, ``skew_forward_kl``, ``skew_reverse_kl``, ``jsd``, ``tvd`` are all
  f-divergences, so by the data-processing inequality the bucket value is a lower bound
  of the dense value, with the same equality conditions. The tail is treated as one
  outcome of both distributions; the teacher's distribution within it is unknown.
* ``adaptive_kl``: the head/tail split is taken over the k teacher tokens (sorted
  descending); the tail bucket is always in the AKL tail (its tokens rank below every
  top-k token), and its gap ``|p_tail - q_tail|`` stands in for
  ``Σ_tail |p - q|`` (a lower bound, by the triangle inequality). The KL terms are the
  bucket ones above.

Temperature: ``temperature`` divides the *student* logits only. The teacher's
log-probs are used as given, so score the teacher at the same temperature (the
sparse representation cannot be re-tempered: the tail's shape is unknown).

Masked positions: every function here takes an optional ``mask [B, T]`` (nonzero =
use). Masked positions may hold anything -- NaN or ``-inf`` log-probs, out-of-range
ids, a NaN tail mass, NaN student logits: they are not validated, and before computing
they are replaced by a neutral position (both models a point mass on token 0, so the
two bucket distributions are identical), so they contribute exactly 0 to the value and
to the gradient; :func:`sparse_divergence` returns 0 there. Without a
mask every position must be valid, and a NaN anywhere reaches the gradient even if a
later reduction drops that position.

Requirements: the k ids of a position must be distinct. A slot whose log-prob is
``-inf`` is padding (the scorer kept fewer than k tokens): its id, whatever it is, is
treated as not recorded, so the student's mass on it stays in the tail bucket.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdray.losses._core import (
    NEG_INF,
    Spec,
    check_temperature,
    compute_dtype,
    divergence_from_logprobs,
    log_probs,
    keep_mask,
    make_spec,
    neutralise,
    safe_logsumexp,
)


def _check_sparse_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_mass, mask):
    """Check shapes and dtypes, then the values of the kept positions; return ``keep`` or None."""
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point() or student_logits.dim() < 2:
        raise ValueError("student_logits must be a floating tensor of shape [B, T, V]")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if not isinstance(teacher_topk_ids, Tensor) or teacher_topk_ids.dtype != torch.int64:
        raise ValueError("teacher_topk_ids must be a long (int64) tensor [B, T, k]; call .long() on it")
    if teacher_topk_ids.dim() != len(lead) + 1 or tuple(teacher_topk_ids.shape[:-1]) != lead:
        raise ValueError(f"teacher_topk_ids must have shape {lead + ('k',)}, got {tuple(teacher_topk_ids.shape)}")
    k = teacher_topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_ids must hold 1 <= k <= V={vocab} ids per position, got k={k}")
    if not isinstance(teacher_topk_logprobs, Tensor) or not teacher_topk_logprobs.is_floating_point():
        raise ValueError("teacher_topk_logprobs must be a floating tensor [B, T, k]")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs must match teacher_topk_ids {tuple(teacher_topk_ids.shape)}, "
            f"got {tuple(teacher_topk_logprobs.shape)}"
        )
    if teacher_tail_mass is not None and (
        not isinstance(teacher_tail_mass, Tensor) or tuple(teacher_tail_mass.shape) != lead
    ):
        raise ValueError(f"teacher_tail_mass must be a tensor of shape {lead} or None")
    keep = None if mask is None else keep_mask(mask, lead, student_logits.device)
    ids = teacher_topk_ids if keep is None else teacher_topk_ids[keep.to(teacher_topk_ids.device)]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"teacher_topk_ids must lie in [0, {vocab}); remap or drop out-of-vocabulary ids")
    if teacher_tail_mass is not None:
        tail = teacher_tail_mass if keep is None else teacher_tail_mass[keep.to(teacher_tail_mass.device)]
        if tail.numel() and not bool(torch.all((tail >= 0) & (tail <= 1))):
            raise ValueError("teacher_tail_mass must lie in [0, 1]; clamp it or pass None to derive it")
    return keep


def _neutral_inputs(keep, student_logits, ids, logprobs, tail_mass):
    """Masked positions -> both models a point mass on token 0: student logits ``[0, -inf, ...]``,
    teacher ids ``0..k-1`` with log-probs ``[0, -inf, ...]`` (padding slots) and tail mass 0.
    The two bucket distributions are then identical in any dtype, so every divergence is
    exactly 0 there with a finite gradient (entries ``-inf`` in both drop out)."""
    vocab, k = student_logits.shape[-1], ids.shape[-1]
    point = torch.full((vocab,), NEG_INF, dtype=student_logits.dtype, device=student_logits.device)
    point[0] = 0.0
    slots = torch.full((k,), NEG_INF, dtype=logprobs.dtype, device=logprobs.device)
    slots[0] = 0.0
    student_logits = neutralise(student_logits, keep, point)
    ids = neutralise(ids, keep.to(ids.device), torch.arange(k, device=ids.device))
    logprobs = neutralise(logprobs, keep.to(logprobs.device), slots)
    if tail_mass is not None:
        tail_mass = torch.where(keep.to(tail_mass.device), tail_mass, 0.0)
    return student_logits, ids, logprobs, tail_mass


def sparse_bucket_logprobs(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    teacher_tail_mass: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Collapse both models onto the ``k + 1`` buckets -> ``(student_lq, teacher_lp)``.

    Both outputs are ``[B, T, k + 1]`` log-probabilities: entries ``0..k-1`` are the
    teacher's top-k tokens, entry ``k`` is the tail bucket. Student tail =
    ``logsumexp`` over its non-top-k log-probs; teacher tail = ``log(teacher_tail_mass)``
    or, if None, ``log(1 - Σ exp(topk))`` via ``log(-expm1(logsumexp(topk)))``
    (``-inf`` when the top-k already holds all the mass, e.g. k = V). ``mask [B, T]``:
    masked positions are replaced by a neutral one first (module docstring), so their
    buckets are finite and carry no gradient to the inputs. Raises ValueError.
    """
    return _buckets(student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, teacher_tail_mass, mask)[:2]


def _buckets(student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, teacher_tail_mass, mask):
    keep = _check_sparse_inputs(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_mass, mask)
    t = check_temperature(temperature)
    if keep is not None:
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_mass = _neutral_inputs(
            keep, student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_mass
        )
    lq = log_probs(student_logits, t)
    lp_top = compute_dtype(teacher_topk_logprobs).to(lq.dtype)
    # A -inf slot is padding (fewer than k tokens recorded): its id is not in the top-k
    # set, so the student's mass on it stays in the tail bucket, and the slot is -inf
    # for both models (it then contributes nothing to any divergence).
    valid = lp_top > NEG_INF
    lq_top = lq.gather(-1, teacher_topk_ids).masked_fill(~valid, NEG_INF)
    in_topk = torch.zeros_like(lq, dtype=torch.float32).scatter_add_(-1, teacher_topk_ids, valid.float()) > 0
    lq_tail = safe_logsumexp(lq.masked_fill(in_topk, NEG_INF), dim=-1)

    if teacher_tail_mass is None:
        head = safe_logsumexp(lp_top, dim=-1).clamp_max(0.0)
        lp_tail = torch.log(-torch.expm1(head))
    else:
        lp_tail = torch.log(compute_dtype(teacher_tail_mass).to(lq.dtype))
    # When the top-k ids cover the whole vocabulary the tail bucket holds no token: its mass is
    # 0 for both models, whatever rounding left in 1 - Σ exp(top-k) (float16 records).
    lp_tail = lp_tail.masked_fill(in_topk.all(-1), NEG_INF)
    student_lq = torch.cat([lq_top, lq_tail.unsqueeze(-1)], dim=-1)
    teacher_lp = torch.cat([lp_top, lp_tail.unsqueeze(-1)], dim=-1)
    return student_lq, teacher_lp, keep


def sparse_divergence(
    kind: str,
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    teacher_tail_mass: Tensor | None = None,
    mask: Tensor | None = None,
    **params,
) -> Tensor:
    """Divergence ``kind`` (a key of ``DIVERGENCES``) on the top-k + tail buckets, ``[B, T]``.

    ``student_logits [B, T, V]``, ``teacher_topk_ids`` / ``teacher_topk_logprobs
    [B, T, k]``, ``teacher_tail_mass [B, T]`` or None. ``params`` are the divergence's
    own (``alpha``, ``beta``, ``mu``, ``detach_mixture_student``), with the same meaning
    and per-sample ``alpha`` support as the dense functions. See the module docstring for
    exactly what is approximated: ``forward_kl`` is exact for the representation, the
    others are bucket values (lower bounds of their dense counterparts).
    ``mask [B, T]`` (nonzero = use): masked positions are not validated, are 0 in the
    result and contribute exactly 0 to the gradient, whatever they hold (NaN, ``-inf``,
    out-of-range ids). Pass it whenever positions are padding: a reduction alone cannot
    keep a NaN at a dropped position out of the gradient. Raises ValueError.
    """
    student_lq, teacher_lp, keep = _buckets(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, teacher_tail_mass, mask
    )
    spec = make_spec(kind, tuple(student_logits.shape[:-1]), student_logits.device, **params)
    if kind == "adaptive_kl":
        spec = Spec(kind, {**spec.params, "tail_bucket": True})
    values = divergence_from_logprobs(spec, student_lq, teacher_lp)
    return values if keep is None else torch.where(keep, values, 0.0)


def sparse_forward_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    teacher_tail_mass: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL over the teacher's top-k tokens plus one tail bucket, ``[B, T]``.

    ``Σ_{i<k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)``, exact for the
    top-k + tail representation (``0 · log 0 = 0`` when the tail mass is 0). Equals the
    dense forward KL when ``k = V``. ``mask [B, T]``: as in :func:`sparse_divergence`
    (masked positions are 0 and get no gradient, whatever they hold).
    """
    return sparse_divergence(
        "forward_kl",
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        temperature=temperature,
        teacher_tail_mass=teacher_tail_mass,
        mask=mask,
    )
