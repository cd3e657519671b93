"""The ``objective`` part of a JobSpec: a tagged union (field ``kind``) over the divergences
of :mod:`kdray.losses` and DistiLLM-2's contrastive loss, each with its own parameters.
Pydantic and the standard library only, like :mod:`kdray.spec`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from kdray.spec.base import _Spec


class _Objective(_Spec):
    """The distillation loss. kd_ratio weighs KD against the hard-label CE term explicitly."""

    kd_temperature: float = Field(
        1.0, gt=0.0, description="Divides both models' logits inside the divergence."
    )
    kd_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="loss = kd_ratio * KD + (1 - kd_ratio) * CE on the training responses.",
    )

    def divergence_params(self) -> dict[str, Any]:
        """Keyword arguments of the divergence in ``kdray.losses`` beyond the temperature."""
        return self.model_dump(exclude={"kind", "kd_temperature", "kd_ratio"})


class ForwardKLObjective(_Objective):
    kind: Literal["forward_kl"] = Field(description="KL(p || q): mass-covering (standard KD).")


class ReverseKLObjective(_Objective):
    kind: Literal["reverse_kl"] = Field(description="KL(q || p): mode-seeking (MiniLLM-style).")


class TVDObjective(_Objective):
    kind: Literal["tvd"] = Field(description="Total variation distance.")


class SkewForwardKLObjective(_Objective):
    kind: Literal["skew_forward_kl"] = Field(description="DistiLLM skew KL (SKL).")
    alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="Skew α: KL(p || αp + (1-α)q). DistiLLM uses 0.1."
    )


class SkewReverseKLObjective(_Objective):
    kind: Literal["skew_reverse_kl"] = Field(description="DistiLLM skew reverse KL (SRKL).")
    alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="Skew α: KL(q || (1-α)p + αq). DistiLLM uses 0.1."
    )
    detach_mixture_student: bool = Field(
        description="Stop the gradient through the student inside the mixture: true as in "
        "DistiLLM-2, false as in DistiLLM. Same value, different gradients, so say which."
    )


class JSDObjective(_Objective):
    kind: Literal["jsd"] = Field(description="Generalised Jensen-Shannon divergence (GKD).")
    beta: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="β of M = βp + (1-β)q; 0 is forward KL, 1 reverse KL (GKD/TRL convention).",
    )


class AdaptiveKLObjective(_Objective):
    kind: Literal["adaptive_kl"] = Field(description="AKL: head/tail-gap weighted FKL + RKL.")
    mu: float = Field(
        0.5, gt=0.0, le=1.0, description="Head = top tokens holding at most μ teacher mass (AKL: 0.5)."
    )


class DistiLLM2Objective(_Objective):
    kind: Literal["distillm2"] = Field(
        description="DistiLLM-2 contrastive loss: (2-β)·SKL on teacher responses + β·SRKL on "
        "the student's own responses (needs curriculum distillm2, which schedules α and β)."
    )
    alpha: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="α₀: the skew of both terms (fixed in mode released_code, the upper clip "
        "of the adaptive α in mode paper). DistiLLM-2 uses 0.1.",
    )
    detach_mixture_student: bool = Field(
        True,
        description="Stop the gradient through the student inside SRKL's mixture, as "
        "DistiLLM-2's code does.",
    )


ObjectiveSpec = Annotated[
    Union[
        ForwardKLObjective,
        ReverseKLObjective,
        TVDObjective,
        SkewForwardKLObjective,
        SkewReverseKLObjective,
        JSDObjective,
        AdaptiveKLObjective,
        DistiLLM2Objective,
    ],
    Field(discriminator="kind"),
]
