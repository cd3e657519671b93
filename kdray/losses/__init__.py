"""kdray's loss library: per-token KD divergences, reductions, composite objectives,
sparse (top-k) teacher signals and a memory-lean fused lm-head path.

Pure PyTorch: importing this package needs only ``torch`` (no Ray, vLLM or DeepSpeed).

* Divergences ``fn(student_logits, teacher_logits, *, temperature=1.0, ...) -> [B, T]``:
  :func:`forward_kl`, :func:`reverse_kl`, :func:`skew_forward_kl`,
  :func:`skew_reverse_kl`, :func:`jsd`, :func:`tvd`, :func:`adaptive_kl`, and the
  name -> function map :data:`DIVERGENCES`.
* Reductions: :func:`masked_token_mean`, :func:`sequence_then_batch_mean`,
  :func:`reduce_per_token`, and :func:`num_items` (the items a mask contributes, summed
  over an optimizer step into the reductions' ``num_items_in_batch``).
* Objectives: :func:`token_cross_entropy`, :func:`kd_objective`, :func:`distillm2_loss`.

Masked positions: every entry point that takes a mask (the reductions' callers
:func:`kd_objective`, :func:`distillm2_loss`, :func:`token_cross_entropy`, the sparse and
fused paths) guarantees that masked positions contribute exactly 0 to the value and the
gradient, whatever they hold (NaN, ±inf, garbage). The bare divergences take no mask.
* Sparse teacher: :func:`sparse_forward_kl`, :func:`sparse_divergence`,
  :func:`sparse_bucket_logprobs`.
* Fused chunked path: :func:`fused_linear_divergence`, :func:`fused_linear_cross_entropy`.
"""

from kdray.losses.divergences import (
    DIVERGENCES,
    adaptive_kl,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kdray.losses.fused import fused_linear_cross_entropy, fused_linear_divergence
from kdray.losses.objectives import IGNORE_INDEX, distillm2_loss, kd_objective, mix_kd_and_ce, token_cross_entropy
from kdray.losses.reductions import masked_token_mean, num_items, reduce_per_token, sequence_then_batch_mean
from kdray.losses.sparse import sparse_bucket_logprobs, sparse_divergence, sparse_forward_kl

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "adaptive_kl",
    "distillm2_loss",
    "forward_kl",
    "fused_linear_cross_entropy",
    "fused_linear_divergence",
    "jsd",
    "kd_objective",
    "masked_token_mean",
    "mix_kd_and_ce",
    "num_items",
    "reduce_per_token",
    "reverse_kl",
    "sequence_then_batch_mean",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_bucket_logprobs",
    "sparse_divergence",
    "sparse_forward_kl",
    "token_cross_entropy",
    "tvd",
]
