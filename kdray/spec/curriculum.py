"""The ``curriculum`` part of a JobSpec: training-schedule plug-ins over any objective.

``curriculum`` is a list (a single mapping is accepted as a one-item list) of:

* ``{kind: pocl, ...}``: POCL's difficulty-ordered cumulative stages with a rising KD
  temperature and ``kd_ratio`` (Liu & Zhang 2025). Composes with every objective.
* ``{kind: distillm2, ...}``: DistiLLM-2's batched on-policy rounds and its α/β schedules
  (Ko et al. 2025). It parametrises the contrastive objective ``kind: distillm2``, and
  that objective needs it (the student responses come from its rounds).
* ``{kind: replay, ...}``: DistiLLM's adaptive off-policy replay (Ko et al. 2024): fresh
  student samples generated inside the training step (or by the live student pool,
  ``sampler: pool``), a replay buffer, and a threshold driven by the validation loss.
  Composes with every objective but ``distillm2``.
* ``{kind: on_policy, ...}``: on-policy distillation (GKD, Agarwal et al. 2024): a fraction
  ``lmbda`` of the optimizer steps train on samples of the current student from a vLLM pool
  that lives beside the trainers and gets their weights every ``sync_every_steps`` steps.
  Composes with every objective but ``distillm2``.

The cross-field rules (which combinations are valid, and why) are checked in
:func:`check_curriculum`, called by ``JobSpec``'s validator. Pydantic and the standard
library only, like :mod:`kdray.spec`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from kdray.spec.base import _Spec


class POCLCurriculum(_Spec):
    """POCL (arXiv:2506.05695): measure difficulty once with the initial student, then train
    on cumulative easy → hard subsets. Defaults follow the released POCL scripts
    (github.com/liuliuyuan6/POCL, scripts/gpt2/pocl/*: 4 stages of 8 epochs, temperature
    1 → 2, kd_ratio 0.7 → 1.0)."""

    kind: Literal["pocl"] = Field(
        description="POCL, progressive-overload curriculum (Liu & Zhang 2025, arXiv:2506.05695)."
    )
    n_stages: int = Field(4, ge=1, description="Cumulative subsets: stage i trains on the easiest i/n_stages.")
    stage_interval: int = Field(
        8, ge=1, description="Length of each stage, in interval_unit (POCL's scripts: 8 epochs)."
    )
    interval_unit: Literal["epochs", "steps"] = Field(
        "epochs", description="'epochs': passes over the stage's subset; 'steps': optimizer steps."
    )
    t_start: float = Field(1.0, gt=0.0, description="KD temperature of stage 1 (rises linearly to t_end).")
    t_end: float = Field(2.0, gt=0.0, description="KD temperature of the last stage.")
    kd_ratio_start: float = Field(0.7, ge=0.0, le=1.0, description="kd_ratio of stage 1 (rises linearly).")
    kd_ratio_end: float = Field(1.0, ge=0.0, le=1.0, description="kd_ratio of the last stage.")
    rrf_k: float = Field(
        60.0, gt=0.0, description="k of reciprocal rank fusion, score 1/(k + r1) + 1/(k + r2) over "
        "the ROUGE-L and cross-entropy ranks (60 as in Cormack et al. 2009)."
    )
    restart_optimizer_each_stage: bool = Field(
        False,
        description="Fresh AdamW state and LR schedule (warmup, cosine over the stage) at each "
        "stage, as POCL's separate per-stage runs do. false: one optimizer and one LR schedule "
        "over the whole job.",
    )


class DistiLLM2Curriculum(_Spec):
    """DistiLLM-2 (arXiv:2503.07067): R rounds of (regenerate the student's responses with
    the current student, train ``training.epochs`` epochs), with β and per-sample α
    scheduled for the contrastive objective (``objective.kind: distillm2``)."""

    kind: Literal["distillm2"] = Field(
        description="DistiLLM-2's batched on-policy rounds and α/β schedules (Ko et al. 2025, "
        "arXiv:2503.07067)."
    )
    rounds: int | None = Field(
        None,
        ge=1,
        description="Generate-then-train rounds. Leave unset with POCL (each stage is a round); "
        "required otherwise.",
    )
    mode: Literal["paper", "released_code"] = Field(
        "paper",
        description="'paper': rising β = 1 + 0.5·min(1, 2t/T) and per-sample adaptive α. "
        "'released_code': α fixed at objective.alpha and β = 1, what the authors' released "
        "trainer runs (its flags are hard-coded off).",
    )
    alpha_min: float = Field(0.01, gt=0.0, description="Lower clip of the adaptive α (paper: 0.01).")
    eps: float = Field(1e-5, ge=0.0, description="Added to Δ_i in α's denominator (paper: 1e-5).")
    running_mean: Literal["cumulative", "ema"] = Field(
        "cumulative", description="How Δ̄ is kept: mean of all samples so far, or an EMA."
    )
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="Decay of the 'ema' running mean.")
    beta_scope: Literal["job", "round"] = Field(
        "job", description="β's t and T count optimizer steps of the whole job, or of each round."
    )

    @model_validator(mode="after")
    def _min_below_one(self) -> "DistiLLM2Curriculum":
        if self.alpha_min >= 1.0:
            raise ValueError(f"alpha_min ({self.alpha_min}) must be below 1 (and below objective.alpha)")
        return self


# The live student pool's resources (kdray.pools.live): the same fields in every curriculum
# that samples from it (on_policy; replay with sampler: pool).
_POOL_REPLICAS = Field(1, ge=1, description="vLLM engines in the student pool; rank r samples from replica r mod replicas.")
_POOL_CPUS = Field(1.0, ge=0.0, description="CPUs each student-pool replica reserves (beside the training workers').")
_POOL_FIELDS = {"replicas", "num_cpus_per_replica", "num_gpus_per_replica"}
_POOL_GPUS = Field(
    None, ge=0.0,
    description="GPUs each student-pool replica reserves (null: generation.num_gpus_per_replica). "
    "The pool runs while the workers train, so on GPUs it needs devices of its own.",
)


class ReplayCurriculum(_Spec):
    """DistiLLM (arXiv:2402.03898) adaptive off-policy replay: each optimizer step trains on the
    fixed data, on fresh samples of the current student (pushed into a FIFO buffer), or on a
    replayed buffer batch, with a probability φ that rises when the validation loss does.
    Defaults are DistiLLM's training scripts' (github.com/jongwooko/distillm)."""

    kind: Literal["replay"] = Field(
        description="DistiLLM's adaptive off-policy replay (Ko et al. 2024, arXiv:2402.03898)."
    )
    capacity: int = Field(
        1000, ge=1, description="Replay buffer size, in samples per worker (FIFO; DistiLLM: 1000)."
    )
    init_threshold: float = Field(0.0, ge=0.0, le=1.0, description="φ at the start (DistiLLM: 0).")
    threshold_step: float = Field(
        0.1, ge=0.0, le=1.0, description="Rise of φ per triggering validation (DistiLLM: 0.1)."
    )
    loss_eps: float = Field(
        0.1, ge=0.0, description="Validation-loss rise that raises φ (DistiLLM: 0.1)."
    )
    reference: Literal["last_raise", "previous"] = Field(
        "last_raise",
        description="What a rise is measured against: the validation loss at φ's last raise "
        "(DistiLLM's code) or the previous validation.",
    )
    validate_every_steps: int | None = Field(
        None, ge=1, description="Optimizer steps between validations (null: once per epoch)."
    )
    validation_samples: int = Field(
        64, ge=1, description="Held-out rows (with responses) on which the student's cross-entropy is the "
        "validation loss (DistiLLM's)."
    )
    sampling_temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature of the student's fresh samples (DistiLLM: 1)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass of the fresh samples (DistiLLM: 1).")
    sampler: Literal["worker", "pool"] = Field(
        "worker",
        description="Where fresh samples come from. 'worker': HF generate on the training module inside "
        "the step (DistiLLM's way). 'pool': the live student vLLM pool of on-policy distillation, "
        "the trainers' weights pushed to it before each fresh step (replicas, num_cpus_per_replica, "
        "num_gpus_per_replica size it).",
    )
    replicas: int = _POOL_REPLICAS
    num_cpus_per_replica: float = _POOL_CPUS
    num_gpus_per_replica: float | None = _POOL_GPUS


class OnPolicyCurriculum(_Spec):
    """On-policy distillation (GKD, Agarwal et al. 2024, arXiv:2306.13649; TRL's GKDTrainer
    names the student-data fraction ``lmbda``): each optimizer step trains either on the data
    set's responses or, with probability ``lmbda``, on responses the current student samples for
    the same prompts. The samples come from a student vLLM pool (Ray actors alive for the whole
    segment, on their own resources) that receives the trainers' weights (ZeRO-3 gathered,
    LoRA merged) every ``sync_every_steps`` optimizer steps. ``max_staleness: 0`` alternates
    generate → train; ``1`` samples the next step's batch while the current one trains, from
    weights at most one sync older than the trainers' (docs/guide.md, "On-policy distillation")."""

    kind: Literal["on_policy"] = Field(
        description="On-policy distillation from a live student vLLM pool (GKD, Agarwal et al. 2024, "
        "arXiv:2306.13649)."
    )
    lmbda: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Fraction of the optimizer steps that train on student samples (GKD's λ; TRL's "
        "default 0.5). 1: every step is on-policy; 0: none (plain distillation, no pool).",
    )
    sync_every_steps: int = Field(
        1, ge=1, description="Optimizer steps between two pushes of the student's weights to the pool."
    )
    max_staleness: Literal[0, 1] = Field(
        0,
        description="0: a step's samples come from the newest pushed weights (generate, then train). "
        "1: the next step's samples are generated while this one trains, from weights at most one "
        "push older.",
    )
    samples_per_prompt: int = Field(
        1, ge=1,
        description="Samples per prompt in an on-policy micro-batch: it takes micro_batch_size_per_worker "
        "/ samples_per_prompt prompts of the data set's micro-batch (must divide it).",
    )
    sampling_temperature: float = Field(
        1.0, gt=0.0, description="Temperature of the student's samples (GKD: 1)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass of the student's samples.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest sample, in tokens (null: generation.max_new_tokens)."
    )
    replicas: int = _POOL_REPLICAS
    num_cpus_per_replica: float = _POOL_CPUS
    num_gpus_per_replica: float | None = _POOL_GPUS


CurriculumSpec = Annotated[Union[POCLCurriculum, DistiLLM2Curriculum, ReplayCurriculum, OnPolicyCurriculum],
                           Field(discriminator="kind")]


def as_curriculum_list(value: Any) -> Any:
    """``curriculum: {kind: pocl}`` is shorthand for a one-item list, and ``curriculum: pocl`` (or
    a list item ``pocl``) for ``{kind: pocl}`` with its defaults; null for none."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [{"kind": item} if isinstance(item, str) else item for item in items]


def check_curriculum(spec: Any) -> None:
    """Cross-field rules between curriculum, objective and training; ValueError says the fix."""
    kinds = [c.kind for c in spec.curriculum]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ValueError(f"curriculum lists {', '.join(repeated)} more than once; keep one entry per kind")
    by_kind = {c.kind: c for c in spec.curriculum}
    pocl, d2 = by_kind.get("pocl"), by_kind.get("distillm2")
    if d2 is not None and "replay" in by_kind:
        raise ValueError(
            "curriculum replay and distillm2 both train on the student's own samples (per step "
            "and per round); keep one of them"
        )
    on_policy = by_kind.get("on_policy")
    if on_policy is not None:
        others = [k for k in ("distillm2", "replay") if k in by_kind]
        if others:
            raise ValueError(
                f"curriculum on_policy and {others[0]} both decide which student samples a step trains on; "
                "keep one of them"
            )
        mb = spec.training.micro_batch_size_per_worker
        if mb % on_policy.samples_per_prompt:
            raise ValueError(
                f"curriculum on_policy.samples_per_prompt ({on_policy.samples_per_prompt}) must divide "
                f"training.micro_batch_size_per_worker ({mb}): an on-policy micro-batch holds that many "
                "sequences, samples_per_prompt per prompt"
            )
    obj = spec.objective
    if obj.kind == "distillm2" and d2 is None:
        raise ValueError(
            "objective distillm2 trains SRKL on the student's own responses, which only a "
            "distillm2 curriculum generates; add curriculum: [{kind: distillm2, rounds: 2}]"
        )
    if d2 is not None:
        if obj.kind != "distillm2":
            raise ValueError(
                f"curriculum distillm2 schedules α and β of DistiLLM-2's contrastive loss; set "
                f"objective.kind: distillm2 (got {obj.kind!r})"
            )
        if d2.alpha_min > obj.alpha:
            raise ValueError(
                f"curriculum distillm2.alpha_min ({d2.alpha_min}) exceeds objective.alpha "
                f"({obj.alpha}), the upper clip of α; lower alpha_min"
            )
        if pocl is not None and d2.rounds is not None:
            raise ValueError(
                "with pocl, every POCL stage is a DistiLLM-2 round (student responses are "
                "regenerated at each stage); remove curriculum distillm2.rounds"
            )
        if pocl is None and d2.rounds is None:
            raise ValueError("curriculum distillm2.rounds is required (e.g. 2): how many "
                             "generate-then-train rounds to run")
    replay = by_kind.get("replay")
    # set away from its default (not merely written: a spec dumped whole, as spec.yaml and the service's
    # saved copy are, writes every field)
    pool_fields = sorted(name for name in _POOL_FIELDS if replay is not None
                         and getattr(replay, name) != type(replay).model_fields[name].default)
    if pool_fields and replay.sampler == "worker":
        raise ValueError(
            f"curriculum replay.{pool_fields[0]} sizes the live student pool, which only sampler: pool "
            "starts (sampler: worker samples with HF generate in the training step); set sampler: pool "
            f"or remove {', '.join(pool_fields)}"
        )
    if replay is not None and replay.capacity < spec.training.micro_batch_size_per_worker:
        raise ValueError(
            f"curriculum replay.capacity ({replay.capacity}) is smaller than "
            f"training.micro_batch_size_per_worker ({spec.training.micro_batch_size_per_worker}): a "
            "replayed micro-batch draws that many distinct samples; raise capacity"
        )
    if pocl is not None:
        if obj.kd_temperature != 1.0 or obj.kd_ratio != 1.0:
            raise ValueError(
                "pocl schedules the KD temperature and kd_ratio per stage; leave "
                "objective.kd_temperature and objective.kd_ratio at 1.0 and set "
                "curriculum pocl t_start/t_end/kd_ratio_start/kd_ratio_end instead"
            )
        if spec.training.epochs != 1:
            raise ValueError(
                "with pocl the training length is n_stages x stage_interval; leave "
                "training.epochs at 1 and set curriculum pocl.stage_interval instead"
            )
