"""Per-token divergences between a student and a teacher over the vocabulary.

Every function here has the signature::

    fn(student_logits, teacher_logits, *, temperature=1.0, <params>) -> Tensor[B, T]

with logits of shape ``[B, T, V]`` (any leading shape ``[..., V]`` works; "per sample"
always means the first dim). Both sets of logits are divided by ``temperature``; then
``p = softmax(teacher / temperature)`` and ``q = softmax(student / temperature)``.
No reduction happens here: mask and average with :mod:`kdray.losses.objectives`.

Half-precision logits are upcast to float32 before the softmax (a sum over 10^5
vocabulary entries in bf16 is meaningless), so the result is float32 for bf16/fp16
inputs and float64 for float64 inputs.

Numerical guarantees (tested): finite values and gradients for logits as large as
``±1e4`` and for vocabulary entries that are ``-inf`` in both models (padded
vocabularies); mixtures are formed in log space. A divergence that is genuinely
infinite (the teacher puts mass where the student logit is ``-inf``, under forward
KL) is returned as ``inf``, not hidden.

Masked positions: these functions take no mask, and a NaN or ±inf logit at a position
gives NaN there -- in the value and, even when a later reduction drops that position
with ``torch.where``, in the gradient (the divergence's own backward computes
``0 · NaN``). The guarantee that masked positions (a teacher's padding) contribute
exactly 0 to the value and the gradient comes from the entry points that take the mask
and replace masked inputs by constants first: :func:`kdray.losses.kd_objective`,
:func:`kdray.losses.distillm2_loss`, ``sparse_divergence(..., mask=)`` and the fused
path. Call those, or neutralise the inputs yourself, before
:func:`kdray.losses.reduce_per_token`.

``alpha`` (skew divergences) is a Python float in ``[0, 1]`` or a tensor of shape
``[B]`` (one value per sample, as DistiLLM-2's adaptive α) or ``[B, T]`` (per token).
It is a hyper-parameter: no gradient flows into it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from kdray.losses._core import check_logits_pair, check_temperature, divergence_from_logprobs, log_probs, make_spec


def _dense(kind: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float, **params) -> Tensor:
    check_logits_pair(student_logits, teacher_logits)
    t = check_temperature(temperature)
    spec = make_spec(kind, tuple(student_logits.shape[:-1]), student_logits.device, **params)
    return divergence_from_logprobs(spec, log_probs(student_logits, t), log_probs(teacher_logits, t))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL ``KL(p || q) = Σ_v p (log p - log q)`` per token, ``[B, T]``.

    Mass-covering: the student is penalised wherever the teacher has mass it lacks.
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("forward_kl", student_logits, teacher_logits, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL ``KL(q || p) = Σ_v q (log q - log p)`` per token, ``[B, T]``.

    Mode-seeking: the student is penalised for mass where the teacher has little.
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("reverse_kl", student_logits, teacher_logits, temperature)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float | Tensor, temperature: float = 1.0
) -> Tensor:
    """DistiLLM skew KL ``Σ_v p log(p / (α p + (1 - α) q))`` per token, ``[B, T]``.

    ``α = 0`` is forward KL; ``α = 1`` is identically 0. Skewing the student towards the
    teacher bounds the log-ratio by ``-log α`` and so the gradient norm (DistiLLM,
    Ko et al. 2024, uses α = 0.1). The mixture is formed in log space.
    ``alpha``: float, ``[B]`` per sample or ``[B, T]`` per token, each in ``[0, 1]``.
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("skew_forward_kl", student_logits, teacher_logits, temperature, alpha=alpha)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float | Tensor,
    detach_mixture_student: bool,
    temperature: float = 1.0,
) -> Tensor:
    """DistiLLM skew reverse KL ``Σ_v q log(q / ((1 - α) p + α q'))`` per token, ``[B, T]``.

    ``q'`` is the student distribution inside the mixture. ``detach_mixture_student=True``
    uses ``q' = stop_gradient(q)`` as DistiLLM-2 does (the mixture acts as a fixed
    target); ``False`` lets the gradient also flow through the mixture as in DistiLLM v1.
    The two give identical values and different gradients, so the choice is required.
    ``α = 0`` is reverse KL.
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense(
        "skew_reverse_kl",
        student_logits,
        teacher_logits,
        temperature,
        alpha=alpha,
        detach_mixture_student=detach_mixture_student,
    )


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float, temperature: float = 1.0) -> Tensor:
    """Generalised Jensen-Shannon divergence ``JSD(β)`` per token, ``[B, T]``.

    Convention (GKD, Agarwal et al. 2024; identical to TRL's ``generalized_jsd_loss``
    and Liger-Kernel's ``LigerFusedLinearJSDLoss``, so values are comparable)::

        M = β p + (1 - β) q
        JSD(β) = β KL(p || M) + (1 - β) KL(q || M)      for 0 < β < 1
        JSD(0) = KL(p || q)   (forward KL)
        JSD(1) = KL(q || p)   (reverse KL)

    The end points are the limits of ``JSD(β)/β`` (β → 0) and ``JSD(β)/(1-β)``
    (β → 1), not of ``JSD(β)`` itself (which tends to 0); this follows GKD/TRL/Liger.
    ``β = 0.5`` is the symmetric JSD used by MiniLLM-style comparisons.
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("jsd", student_logits, teacher_logits, temperature, beta=beta)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ``½ Σ_v |p - q|`` per token, ``[B, T]``, in ``[0, 1]``.

    Bounded, symmetric; its gradient is ``½ sign(q - p)`` through ``q`` (0 at ties).
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("tvd", student_logits, teacher_logits, temperature)


def adaptive_kl(student_logits: Tensor, teacher_logits: Tensor, *, mu: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Adaptive KL (AKL, Wu et al. 2024) per token, ``[B, T]``.

    For each token, sort ``p`` in descending order. The *head* is the tokens whose
    inclusive cumulative teacher mass is ``<= mu``, always including the top-1 token;
    the *tail* is the rest. With ``g_head = Σ_head |p - sg(q)|`` and
    ``g_tail = Σ_tail |p - sg(q)|``::

        AKL = g_head/(g_head+g_tail) · FKL + g_tail/(g_head+g_tail) · RKL

    The weights carry no gradient (``sg`` = stop-gradient); a large head gap favours
    forward KL, a large tail gap reverse KL. If ``g_head + g_tail = 0`` the value is
    forward KL (which is then 0).
    Takes no mask: that masked positions give 0 value and gradient is guaranteed by
    ``kd_objective`` / ``distillm2_loss`` (see "Masked positions" in the module docstring).
    """
    return _dense("adaptive_kl", student_logits, teacher_logits, temperature, mu=mu)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "adaptive_kl": adaptive_kl,
}
