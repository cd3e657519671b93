"""Composite training objectives, and the hard-label cross-entropy they use.

* :func:`token_cross_entropy` -- hard-label CE per token (ignore index -100).
* :func:`kd_objective` -- ``kd_ratio · KD + (1 - kd_ratio) · CE`` with its parts
  (:func:`mix_kd_and_ce` when the KD term is computed elsewhere).
* :func:`distillm2_loss` -- DistiLLM-2's contrastive objective (CALD).
* The reductions (:func:`masked_token_mean`, :func:`sequence_then_batch_mean`,
  :func:`reduce_per_token`, :func:`num_items`) live in :mod:`kdray.losses.reductions`.

Masks are boolean ``[B, T]`` (any nonzero value counts as "keep"). Masked positions
contribute exactly 0 to the value *and* to the gradient, whatever they hold (NaN, ±inf,
garbage, on the student's side, the teacher's or both): each entry point here replaces
the logits (and labels) of masked positions by constants before computing anything
(:func:`kdray.losses._core.neutralise`), so no gradient path leads to them.
Each objective takes ``num_items_in_batch``, the whole optimizer step's items, so that
micro-batches add up to the step's mean (see :mod:`kdray.losses.reductions`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.losses._core import check_logits_pair, check_params, check_temperature, keep_mask, neutralise
from kdray.losses.divergences import DIVERGENCES, skew_forward_kl, skew_reverse_kl
from kdray.losses.reductions import REDUCTIONS, reduce_per_token

#: Label of the positions no loss covers (prompt, padding): PyTorch's ``cross_entropy`` default
#: ``ignore_index``, which Hugging Face models use for the same purpose.
IGNORE_INDEX = -100


def token_cross_entropy(student_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy per token, ``[B, T]``; 0 where ``labels == -100`` or ``mask`` is 0.

    ``student_logits [B, T, V]`` and ``labels [B, T]`` must already be aligned (the
    caller shifts labels for next-token prediction). No temperature: CE is always on
    the raw logits. Computed in float32 for half-precision logits. ``mask [B, T]``
    (optional, nonzero = use) drops more positions. Dropped positions give exactly 0
    in the value and the gradient whatever their logits or labels hold (NaN, ±inf, an
    out-of-range id): they are replaced by constants before the softmax.
    Raises ValueError for bad shapes or dtypes.
    """
    if not isinstance(student_logits, Tensor) or student_logits.dim() < 2:
        raise ValueError("student_logits must be a [B, T, V] tensor")
    if not isinstance(labels, Tensor) or labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must be a tensor of shape {tuple(student_logits.shape[:-1])} (student_logits without V), "
            f"got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer (long) tensor, got {labels.dtype}")
    labels = labels.to(student_logits.device)
    keep = labels != IGNORE_INDEX
    if mask is not None:
        keep &= keep_mask(mask, tuple(labels.shape), labels.device)
    logits = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    logits = neutralise(logits, keep)
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.where(keep, labels, 0).reshape(-1).long(), reduction="none"
    )
    return torch.where(keep, flat.reshape(labels.shape), 0.0)


def _resolve_divergence(divergence: str | Callable[..., Tensor], kwargs: dict) -> Callable[..., Tensor]:
    if callable(divergence):
        return divergence
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)} or a callable, got {divergence!r}")
    check_params(divergence, kwargs)
    return DIVERGENCES[divergence]


def kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor,
    divergence: str | Callable[..., Tensor],
    kd_ratio: float,
    kd_temperature: float = 1.0,
    labels: Tensor | None = None,
    reduction: str = "token_mean",
    divergence_kwargs: dict | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    ce_num_items_in_batch: int | float | Tensor | None = None,
    kd_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss = kd_ratio · kd_scale · KD + (1 - kd_ratio) · CE`` -> ``(loss, parts)``
    (:func:`mix_kd_and_ce`; ``kd_scale`` T² to keep the KD gradients' scale under a temperature).

    * ``KD`` = ``reduction`` of ``divergence(student, teacher, temperature=kd_temperature,
      **divergence_kwargs)`` over ``mask [B, T]``. ``kd_temperature`` divides the
      logits of this term only.
    * ``CE`` = ``reduction`` of :func:`token_cross_entropy` over
      ``mask & (labels != -100)``, on the raw logits. Needed when ``kd_ratio < 1``;
      when ``kd_ratio == 1`` it is still computed for reporting if ``labels`` is given.
    * Masked positions of ``student_logits [B, T, V]`` / ``teacher_logits [B, T, V]``
      (and ``labels``) may hold anything (NaN, ±inf, padding): they are replaced by
      constants first, so they contribute exactly 0 to the value and the gradient.
    * ``num_items_in_batch``: the whole optimizer step's items of the KD term under
      ``reduction`` (``num_items`` of ``mask``, summed over micro-batches and ranks);
      ``ce_num_items_in_batch`` those of the CE term (``num_items`` of
      ``mask & (labels != -100)``, which differ from the KD term's wherever a label is -100
      inside ``mask``: so with ``labels`` and ``num_items_in_batch`` it must be given too).
      None = this batch's own items. See :mod:`kdray.losses.reductions` (Hugging Face's
      ``num_items_in_batch``): with them the micro-batches' losses add up to the step's.
    * ``parts`` holds detached scalars ``"loss"``, ``"kd"`` and, when ``labels`` is
      given, ``"ce"`` for logging.

    Raises ValueError for bad shapes, parameters, ``labels`` missing when ``kd_ratio < 1``, or
    ``num_items_in_batch`` given with ``labels`` but without ``ce_num_items_in_batch``.
    """
    check_logits_pair(student_logits, teacher_logits)
    if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)) or not 0.0 <= float(kd_ratio) <= 1.0:
        raise ValueError(f"kd_ratio must be a float in [0, 1] (weight of the KD term), got {kd_ratio!r}")
    kd_ratio = float(kd_ratio)
    temperature = check_temperature(kd_temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if kd_ratio < 1.0 and labels is None:
        raise ValueError("labels are required when kd_ratio < 1 (the CE term has weight 1 - kd_ratio)")
    if labels is not None and num_items_in_batch is not None and ce_num_items_in_batch is None:
        raise ValueError("with labels, pass ce_num_items_in_batch too: the CE term's items are the step's "
                         "mask & (labels != -100) positions, not the KD term's num_items_in_batch")
    fn = _resolve_divergence(divergence, divergence_kwargs or {})
    keep = keep_mask(mask, tuple(student_logits.shape[:-1]), student_logits.device)
    student_logits = neutralise(student_logits, keep)
    teacher_logits = neutralise(teacher_logits, keep)
    kd_tokens = fn(student_logits, teacher_logits, temperature=temperature, **(divergence_kwargs or {}))
    kd = reduce_per_token(kd_tokens, keep, reduction, num_items_in_batch)
    ce = None
    if labels is not None:
        ce_tokens = token_cross_entropy(student_logits, labels, mask=keep)
        ce_keep = keep & (labels.to(keep.device) != IGNORE_INDEX)
        ce = reduce_per_token(ce_tokens, ce_keep, reduction, ce_num_items_in_batch)
    return mix_kd_and_ce(kd, ce, kd_ratio, kd_scale)


def mix_kd_and_ce(kd: Tensor, ce: Tensor | None, kd_ratio: float,
                  kd_scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """``kd_ratio · kd_scale · kd + (1 - kd_ratio) · ce`` from reduced scalars -> ``(loss,
    parts)``, as :func:`kd_objective` combines them; for callers that compute the KD term another
    way (a sparse or fused teacher signal). ``kd_scale``: T² under a KD temperature T (Hinton et
    al. 2015, §2), else 1; ``parts["kd"]`` is the divergence itself, unscaled. ``ce`` may be None
    only when ``kd_ratio == 1``."""
    if kd_ratio < 1.0 and ce is None:
        raise ValueError("the CE term is required when kd_ratio < 1 (it has weight 1 - kd_ratio)")
    parts = {"kd": kd.detach()}
    if kd_scale != 1.0:
        kd = kd_scale * kd
    loss = kd
    if ce is not None:
        parts["ce"] = ce.detach()
        if kd_ratio == 0.0:
            loss = ce  # not 0 * kd: an infinite KD term would turn the gradient into NaN
        elif kd_ratio < 1.0:
            loss = kd_ratio * kd + (1.0 - kd_ratio) * ce
    parts["loss"] = loss.detach()
    return loss, parts


def distillm2_loss(
    teacher_resp_student_logits: Tensor,
    teacher_resp_teacher_logits: Tensor,
    teacher_resp_mask: Tensor,
    student_resp_student_logits: Tensor,
    student_resp_teacher_logits: Tensor,
    student_resp_mask: Tensor,
    *,
    beta: float,
    skl_alpha: float | Tensor,
    srkl_alpha: float | Tensor,
    temperature: float = 1.0,
    detach_mixture_student: bool = True,
    reduction: str = "sequence_mean",
    num_items_in_batch: tuple[int | float | Tensor, int | float | Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DistiLLM-2 contrastive objective (CALD, Ko et al. 2025) -> ``(loss, parts)``::

        L = (2 - β) · SKL_α(p, q)  on teacher-generated responses
          +      β  · SRKL_α(p, q) on student-generated responses

    SKL pulls the student up on the teacher's responses (mass covering); SRKL pushes it
    down where its own samples are unlikely under the teacher (mode seeking).

    * ``teacher_resp_*``: logits ``[B1, T1, V]`` of both models on the teacher-response
      batch and its ``[B1, T1]`` response mask; ``student_resp_*`` likewise ``[B2, T2]``.
      Masked positions may hold anything (NaN, ±inf): they are replaced by constants
      first and contribute exactly 0 to the value and the gradient.
    * ``beta`` in ``[0, 2]`` balances the two terms (β = 1 weighs them equally).
    * ``skl_alpha`` / ``srkl_alpha``: float or per-sample ``[B1]`` / ``[B2]`` tensors
      (DistiLLM-2's adaptive α) or per-token tensors.
    * ``detach_mixture_student=True`` is DistiLLM-2's SRKL (student detached inside the
      mixture); ``reduction="sequence_mean"`` is DistiLLM-2's (per response, then batch).
    * ``num_items_in_batch``: None (each term divides by its own batch's items) or the
      pair ``(teacher_response_items, student_response_items)``: the whole optimizer
      step's items of the SKL and SRKL terms under ``reduction`` (``num_items`` of
      each mask, summed over micro-batches and ranks; see :mod:`kdray.losses.reductions`).
    * ``parts``: detached ``"loss"``, ``"skl"``, ``"srkl"``.

    Raises ValueError for bad shapes or parameters.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 2.0:
        raise ValueError(f"beta must be a float in [0, 2] (weights (2 - beta)·SKL + beta·SRKL), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is None:
        items_t = items_s = None
    elif isinstance(num_items_in_batch, (tuple, list)) and len(num_items_in_batch) == 2:
        items_t, items_s = num_items_in_batch
    else:
        raise ValueError(
            "num_items_in_batch must be None or a pair (teacher_response_items, student_response_items), "
            f"got {num_items_in_batch!r}"
        )
    terms = []
    for s, t, mask in (
        (teacher_resp_student_logits, teacher_resp_teacher_logits, teacher_resp_mask),
        (student_resp_student_logits, student_resp_teacher_logits, student_resp_mask),
    ):
        check_logits_pair(s, t)
        keep = keep_mask(mask, tuple(s.shape[:-1]), s.device)
        terms.append((neutralise(s, keep), neutralise(t, keep), keep))
    (s1, t1, keep1), (s2, t2, keep2) = terms
    skl = reduce_per_token(
        skew_forward_kl(s1, t1, alpha=skl_alpha, temperature=temperature), keep1, reduction, items_t
    )
    srkl = reduce_per_token(
        skew_reverse_kl(
            s2, t2, alpha=srkl_alpha, detach_mixture_student=detach_mixture_student, temperature=temperature
        ),
        keep2,
        reduction,
        items_s,
    )
    loss = (2.0 - float(beta)) * skl + float(beta) * srkl
    return loss, {"loss": loss.detach(), "skl": skl.detach(), "srkl": srkl.detach()}
