"""Reductions of per-token losses and the composite training objectives.

* :func:`masked_token_mean` -- mean over all unmasked tokens of the batch.
* :func:`sequence_then_batch_mean` -- mean per sequence, then over sequences
  (DistiLLM-2's reduction: every response counts equally, whatever its length).
* :func:`token_cross_entropy` -- hard-label CE per token (ignore index -100).
* :func:`kd_objective` -- ``kd_ratio · KD + (1 - kd_ratio) · CE`` with its parts
  (:func:`mix_kd_and_ce` when the KD term is computed elsewhere).
* :func:`distillm2_loss` -- DistiLLM-2's contrastive objective (CALD).

Masks are boolean ``[B, T]`` (any nonzero value counts as "keep"). Masked positions
are selected with ``torch.where``, so whatever the per-token value is there (even
``inf``/``NaN`` from padding rows) it affects neither the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.losses._core import check_logits_pair, check_params, check_temperature
from kdray.losses.divergences import DIVERGENCES, skew_forward_kl, skew_reverse_kl

#: Label of the positions no loss covers (prompt, padding): PyTorch's ``cross_entropy`` default
#: ``ignore_index``, which Hugging Face models use for the same purpose.
IGNORE_INDEX = -100

REDUCTIONS = ("token_mean", "sequence_mean")


def _check_mask(per_token: object, mask: object) -> Tensor:
    if not isinstance(per_token, Tensor) or per_token.dim() != 2:
        shape = tuple(per_token.shape) if isinstance(per_token, Tensor) else type(per_token).__name__
        raise ValueError(f"per_token must be a [B, T] tensor, got {shape}")
    if not isinstance(mask, Tensor) or mask.shape != per_token.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, T] tensor matching per_token {tuple(per_token.shape)}, got {shape}")
    return mask.to(device=per_token.device) != 0


def masked_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_token [B, T]`` over positions where ``mask [B, T]`` is set -> scalar.

    Returns 0 (with a zero gradient, not NaN) when no position is set.
    """
    keep = _check_mask(per_token, mask)
    total = torch.where(keep, per_token, 0.0).sum()
    return total / keep.sum().clamp_min(1).to(total.dtype)


def sequence_then_batch_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence masked mean, then the mean over sequences -> scalar.

    Sequences with no unmasked token are left out of the batch mean (they have no
    mean); if every sequence is empty the result is 0 with a zero gradient.
    """
    keep = _check_mask(per_token, mask)
    sums = torch.where(keep, per_token, 0.0).sum(-1)
    counts = keep.sum(-1)
    per_seq = sums / counts.clamp_min(1).to(sums.dtype)
    nonempty = counts > 0
    return torch.where(nonempty, per_seq, 0.0).sum() / nonempty.sum().clamp_min(1).to(sums.dtype)


def reduce_per_token(per_token: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` (``"token_mean"`` or ``"sequence_mean"``) to ``per_token``."""
    if reduction == "token_mean":
        return masked_token_mean(per_token, mask)
    if reduction == "sequence_mean":
        return sequence_then_batch_mean(per_token, mask)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def token_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Hard-label cross-entropy per token, ``[B, T]``; 0 where ``labels == -100``.

    ``student_logits [B, T, V]`` and ``labels [B, T]`` must already be aligned (the
    caller shifts labels for next-token prediction). No temperature: CE is always on
    the raw logits. Computed in float32 for half-precision logits.
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
    logits = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.reshape(labels.shape)


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss = kd_ratio · KD + (1 - kd_ratio) · CE`` -> ``(loss, parts)``.

    * ``KD`` = ``reduction`` of ``divergence(student, teacher, temperature=kd_temperature,
      **divergence_kwargs)`` over ``mask [B, T]``. ``kd_temperature`` divides the
      logits of this term only.
    * ``CE`` = ``reduction`` of :func:`token_cross_entropy` over
      ``mask & (labels != -100)``, on the raw logits. Needed when ``kd_ratio < 1``;
      when ``kd_ratio == 1`` it is still computed for reporting if ``labels`` is given.
    * ``parts`` holds detached scalars ``"loss"``, ``"kd"`` and, when ``labels`` is
      given, ``"ce"`` for logging.
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
    fn = _resolve_divergence(divergence, divergence_kwargs or {})
    kd_tokens = fn(student_logits, teacher_logits, temperature=temperature, **(divergence_kwargs or {}))
    kd = reduce_per_token(kd_tokens, mask, reduction)
    ce = None
    if labels is not None:
        ce_mask = (mask.to(labels.device) != 0) & (labels != IGNORE_INDEX)
        ce = reduce_per_token(token_cross_entropy(student_logits, labels), ce_mask, reduction)
    return mix_kd_and_ce(kd, ce, kd_ratio)


def mix_kd_and_ce(kd: Tensor, ce: Tensor | None, kd_ratio: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``kd_ratio · kd + (1 - kd_ratio) · ce`` from reduced scalars -> ``(loss, parts)``, as
    :func:`kd_objective` combines them; for callers that compute the KD term another way
    (a sparse or fused teacher signal). ``ce`` may be None only when ``kd_ratio == 1``."""
    if kd_ratio < 1.0 and ce is None:
        raise ValueError("the CE term is required when kd_ratio < 1 (it has weight 1 - kd_ratio)")
    parts = {"kd": kd.detach()}
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """DistiLLM-2 contrastive objective (CALD, Ko et al. 2025) -> ``(loss, parts)``::

        L = (2 - β) · SKL_α(p, q)  on teacher-generated responses
          +      β  · SRKL_α(p, q) on student-generated responses

    SKL pulls the student up on the teacher's responses (mass covering); SRKL pushes it
    down where its own samples are unlikely under the teacher (mode seeking).

    * ``teacher_resp_*``: logits ``[B1, T1, V]`` of both models on the teacher-response
      batch and its ``[B1, T1]`` response mask; ``student_resp_*`` likewise ``[B2, T2]``.
    * ``beta`` in ``[0, 2]`` balances the two terms (β = 1 weighs them equally).
    * ``skl_alpha`` / ``srkl_alpha``: float or per-sample ``[B1]`` / ``[B2]`` tensors
      (DistiLLM-2's adaptive α) or per-token tensors.
    * ``detach_mixture_student=True`` is DistiLLM-2's SRKL (student detached inside the
      mixture); ``reduction="sequence_mean"`` is DistiLLM-2's (per response, then batch).
    * ``parts``: detached ``"loss"``, ``"skl"``, ``"srkl"``.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 2.0:
        raise ValueError(f"beta must be a float in [0, 2] (weights (2 - beta)·SKL + beta·SRKL), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    skl = reduce_per_token(
        skew_forward_kl(
            teacher_resp_student_logits, teacher_resp_teacher_logits, alpha=skl_alpha, temperature=temperature
        ),
        teacher_resp_mask,
        reduction,
    )
    srkl = reduce_per_token(
        skew_reverse_kl(
            student_resp_student_logits,
            student_resp_teacher_logits,
            alpha=srkl_alpha,
            detach_mixture_student=detach_mixture_student,
            temperature=temperature,
        ),
        student_resp_mask,
        reduction,
    )
    loss = (2.0 - float(beta)) * skl + float(beta) * srkl
    return loss, {"loss": loss.detach(), "skl": skl.detach(), "srkl": srkl.detach()}
