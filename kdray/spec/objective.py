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
        1.0, gt=0.0, description="Divides both models' logits inside the divergence (Hinton et al. "
        "2015, arXiv:1503.02531). Not the sampling temperature. With POCL leave it at 1: the "
        "curriculum schedules it."
    )
    kd_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="loss = kd_ratio · KD + (1 − kd_ratio) · CE, CE being the hard-label "
        "cross-entropy on the training responses. With POCL leave it at 1: the curriculum "
        "schedules it.",
    )
    t_squared_scaling: bool = Field(
        True, description="Multiply the KD term by T², T the KD temperature (POCL's of the stage), so its gradients "
        "keep their scale as T changes: they shrink as 1/T² (Hinton et al. 2015, arXiv:1503.02531, §2; POCL's "
        "released losses do it). No effect at T = 1, where every method but POCL runs.",
    )

    def kd_scale(self, temperature: float) -> float:
        """The KD term's weight beside ``kd_ratio`` at KD temperature T: T², or 1 without
        :attr:`t_squared_scaling`."""
        return temperature * temperature if self.t_squared_scaling else 1.0

    def divergence_params(self) -> dict[str, Any]:
        """Keyword arguments of the divergence in ``kdray.losses`` beyond the temperature."""
        return self.model_dump(exclude={"kind", "kd_temperature", "kd_ratio", "t_squared_scaling"})


class ForwardKLObjective(_Objective):
    kind: Literal["forward_kl"] = Field(
        description="Forward KL(p || q), p the teacher's and q the student's distribution: "
        "mass-covering; standard KD (Hinton et al. 2015, arXiv:1503.02531)."
    )


class ReverseKLObjective(_Objective):
    kind: Literal["reverse_kl"] = Field(
        description="Reverse KL(q || p): mode-seeking, as in MiniLLM (Gu et al. 2023, arXiv:2306.08543)."
    )


class TVDObjective(_Objective):
    kind: Literal["tvd"] = Field(description="Total variation distance ½ Σ_v |p − q| per token, in [0, 1].")


class SkewForwardKLObjective(_Objective):
    kind: Literal["skew_forward_kl"] = Field(
        description="DistiLLM's skew KL (SKL) (Ko et al. 2024, arXiv:2402.03898)."
    )
    alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="Skew α: KL(p || αp + (1-α)q). DistiLLM uses 0.1."
    )


class SkewReverseKLObjective(_Objective):
    kind: Literal["skew_reverse_kl"] = Field(
        description="DistiLLM's skew reverse KL (SRKL) (Ko et al. 2024, arXiv:2402.03898)."
    )
    alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="Skew α: KL(q || (1-α)p + αq). DistiLLM uses 0.1."
    )
    detach_mixture_student: bool = Field(
        description="Stop the gradient through the student inside the mixture: true as in "
        "DistiLLM-2, false as in DistiLLM. Same value, different gradients, so say which."
    )


class JSDObjective(_Objective):
    kind: Literal["jsd"] = Field(
        description="Generalised Jensen-Shannon divergence JSD(β), as in GKD (Agarwal et al. 2024, "
        "arXiv:2306.13649) and TRL."
    )
    beta: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="β of M = βp + (1-β)q; 0 is forward KL, 1 reverse KL (GKD/TRL convention).",
    )


class AdaptiveKLObjective(_Objective):
    kind: Literal["adaptive_kl"] = Field(
        description="AKL (Wu et al. 2024, arXiv:2404.02657): per token, forward and reverse KL "
        "weighted by the teacher-student gaps on the head and on the tail of the teacher's distribution."
    )
    mu: float = Field(
        0.5, gt=0.0, le=1.0, description="Head = the top tokens whose cumulative teacher mass is at most "
        "μ (always the top-1 token); AKL uses 0.5."
    )


class DistiLLM2Objective(_Objective):
    kind: Literal["distillm2"] = Field(
        description="DistiLLM-2's contrastive loss (Ko et al. 2025, arXiv:2503.07067): (2-β)·SKL on "
        "teacher responses + β·SRKL on the student's own responses (needs curriculum distillm2, "
        "which schedules α and β)."
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
