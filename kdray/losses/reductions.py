"""Reductions of per-token losses over a mask, and the optimizer step's normaliser.

* :func:`masked_token_mean` -- sum over the unmasked tokens / the number of items.
* :func:`sequence_then_batch_mean` -- mean per sequence, then sum over the non-empty
  sequences / the number of items (DistiLLM-2's reduction: every response counts
  equally, whatever its length).
* :func:`reduce_per_token` -- either of the two by name.
* :func:`num_items` -- how many items a mask contributes under a reduction.

**Items and ``num_items_in_batch``.** The *items* of a reduction are what it averages
over: the unmasked tokens for ``"token_mean"``, the non-empty sequences (those with at
least one unmasked token) for ``"sequence_mean"``. By default each call divides by its
own items. When an optimizer step is split into micro-batches (gradient accumulation)
and ranks, that over-weights the items of small micro-batches: the step's gradient is
then not the gradient of the step's mean. Passing ``num_items_in_batch`` -- the items of
the *whole step*, summed with :func:`num_items` over every micro-batch of every rank --
divides each micro-batch's sum by the same number, so the micro-batches' values *add up*
to the step's mean, value and gradient. This is the normaliser Hugging Face transformers
passes to its losses as ``num_items_in_batch`` (the gradient-accumulation loss fix of
October 2024, transformers 4.46). An engine that averages over micro-batches and ranks
(DeepSpeed divides by both) must have that undone by the caller.

Masks are ``[B, T]`` (any nonzero value counts as "keep"). Masked positions are selected
with ``torch.where``: whatever ``per_token`` holds there (even ``inf``/``NaN``) does not
reach the value, and the gradient handed back to ``per_token`` there is exactly 0. A
reduction cannot stop the backward of whatever *computed* ``per_token`` from producing
``0 · NaN = NaN`` at such a position, though: compute it through an entry point that
takes the mask (:func:`kdray.losses.kd_objective`, :func:`kdray.losses.distillm2_loss`,
``token_cross_entropy(..., mask=)``, ``sparse_divergence(..., mask=)``, the fused path),
which replaces masked inputs by constants first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("token_mean", "sequence_mean")


def _check_mask(per_token: object, mask: object) -> Tensor:
    if not isinstance(per_token, Tensor) or per_token.dim() != 2:
        shape = tuple(per_token.shape) if isinstance(per_token, Tensor) else type(per_token).__name__
        raise ValueError(f"per_token must be a [B, T] tensor, got {shape}")
    if not isinstance(mask, Tensor) or mask.shape != per_token.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, T] tensor matching per_token {tuple(per_token.shape)}, got {shape}")
    return mask.to(device=per_token.device) != 0


def items_divisor(num_items_in_batch: object, own_items: Tensor, dtype: torch.dtype) -> Tensor:
    """The denominator of a reduction as a 0-dim ``dtype`` tensor on ``own_items``' device.

    ``num_items_in_batch``: None (use ``own_items``, this call's own count), an int, a
    float or a 0-dim real tensor (not synchronised: a tensor's value is not inspected).
    Either way a value below 1 counts as 1, so a step with no item divides a zero sum.
    Raises ValueError for anything else, or a non-finite number.
    """
    if num_items_in_batch is None:
        n = own_items
    elif isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.dim() != 0 or num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise ValueError(
                "num_items_in_batch must be an int, a float or a 0-dim real tensor (the step's item count), got a "
                f"{num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        n = num_items_in_batch.detach().to(device=own_items.device)
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise ValueError(
            f"num_items_in_batch must be None, an int, a float or a 0-dim tensor, got {num_items_in_batch!r}"
        )
    elif not math.isfinite(num_items_in_batch):
        raise ValueError(f"num_items_in_batch must be finite, got {num_items_in_batch!r}")
    else:
        n = torch.tensor(float(num_items_in_batch), device=own_items.device)
    return n.to(dtype).clamp_min(1.0)


def masked_token_mean(
    per_token: Tensor, mask: Tensor, num_items_in_batch: int | float | Tensor | None = None
) -> Tensor:
    """``Σ_{mask} per_token / num_items_in_batch`` for ``per_token, mask [B, T]`` -> scalar.

    The items are the unmasked tokens. ``num_items_in_batch=None`` divides by this call's
    own count (the mean of this batch; 0 with a zero gradient, not NaN, when no token is
    set). Pass the whole optimizer step's token count (:func:`num_items`, summed over
    micro-batches and ranks) so that the micro-batches' values add up to the step's mean;
    see the module docstring. Raises ValueError for a bad shape or ``num_items_in_batch``.
    """
    keep = _check_mask(per_token, mask)
    total = torch.where(keep, per_token, 0.0).sum()
    return total / items_divisor(num_items_in_batch, keep.sum(), total.dtype)


def sequence_then_batch_mean(
    per_token: Tensor, mask: Tensor, num_items_in_batch: int | float | Tensor | None = None
) -> Tensor:
    """Per-sequence masked mean, summed over the non-empty sequences / ``num_items_in_batch``.

    ``per_token, mask [B, T]`` -> scalar. The items are the non-empty sequences (at least
    one unmasked token); empty ones have no mean and are left out. ``None`` divides by
    this call's own non-empty sequences (the plain mean over sequences; 0 with a zero
    gradient if every sequence is empty); pass the whole step's count (:func:`num_items`
    over every micro-batch of every rank) to make micro-batches add up, as in
    :func:`masked_token_mean`.
    """
    keep = _check_mask(per_token, mask)
    sums = torch.where(keep, per_token, 0.0).sum(-1)
    counts = keep.sum(-1)
    per_seq = sums / counts.clamp_min(1).to(sums.dtype)
    nonempty = counts > 0
    total = torch.where(nonempty, per_seq, 0.0).sum()
    return total / items_divisor(num_items_in_batch, nonempty.sum(), total.dtype)


def reduce_per_token(
    per_token: Tensor, mask: Tensor, reduction: str, num_items_in_batch: int | float | Tensor | None = None
) -> Tensor:
    """Apply ``reduction`` (``"token_mean"`` or ``"sequence_mean"``) to ``per_token [B, T]`` -> scalar.

    ``num_items_in_batch``: the whole step's items under ``reduction`` (see
    :func:`num_items`), or None for this call's own. Raises ValueError for an unknown
    reduction.
    """
    if reduction == "token_mean":
        return masked_token_mean(per_token, mask, num_items_in_batch)
    if reduction == "sequence_mean":
        return sequence_then_batch_mean(per_token, mask, num_items_in_batch)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def num_items(mask: Tensor, reduction: str) -> int:
    """The items ``mask`` contributes under ``reduction`` (a Python int; synchronises).

    ``"token_mean"``: its nonzero entries (any shape). ``"sequence_mean"``: the rows of a
    ``[B, T]`` mask with at least one nonzero entry. Sum this over every micro-batch of
    every rank of an optimizer step to get its ``num_items_in_batch``. Raises ValueError
    for a non-tensor mask, a non-2-D mask under ``"sequence_mean"`` or another reduction.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    keep = mask != 0
    if reduction == "token_mean":
        return int(keep.sum())
    if reduction == "sequence_mean":
        if keep.dim() != 2:
            raise ValueError(
                f"reduction='sequence_mean' counts the rows of a [B, T] mask, got shape {tuple(mask.shape)}"
            )
        return int(keep.any(-1).sum())
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
