"""What one training micro-batch computes, per objective: the loss, its parts, the schedule.

:func:`make_step_objective` picks the objective for a segment of the plan
(:mod:`kdray.curriculum.plan`):

* :class:`KDStep`: any divergence of the loss library through
  :func:`kdray.losses.kd_objective`, ``kd_ratio · KD + (1 − kd_ratio) · CE``, with the
  segment's KD temperature and ``kd_ratio`` (POCL's stage values, or the objective's).
* :class:`DistiLLM2Step`: DistiLLM-2's contrastive loss on paired teacher and student
  responses of the same prompts, with β and per-sample α from
  :class:`kdray.curriculum.DistiLLM2Schedule`, whose state travels in every checkpoint.

Both run the student (the DeepSpeed engine) and the frozen teacher on the micro-batch, and
return detached float parts for the step's metrics. The next-token shift happens here.
"""

from __future__ import annotations

from typing import Any

from kdray.curriculum.plan import Segment
from kdray.data.tokenize import IGNORE_INDEX
from kdray.spec import JobSpec
from kdray.models import lora_target
from kdray.train.teacher import head_computing, head_weights, partitioned, teacher_final_states, unwrapped


def _upcast(logits: Any) -> Any:
    """Half-precision logits in float32 for the loss; float32 and float64 as they are."""
    import torch

    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _shifted(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Logits at positions that predict a label, the labels, and the label mask."""
    target = labels[:, 1:]
    return logits[:, :-1], target, target != IGNORE_INDEX


#: Smallest teacher tail mass a top-k record is taken to have. The records keep log-probs in
#: float16 (about 1e-3 relative error per stored probability), so a tail recomputed as
#: 1 − Σ exp(top-k) below about 1e-6 is rounding noise, and 0 would be a claim the record cannot
#: make: it would give reverse-KL-type terms (reverse KL, AKL's tail part) an infinite value
#: and NaN gradients wherever the student keeps any mass outside the teacher's top k.
TOPK_TAIL_FLOOR = 1e-6


def topk_tail_mass(topk_logprobs: Any) -> Any:
    """The teacher's mass outside its recorded top-k, ``[B, T]``, floored at
    :data:`TOPK_TAIL_FLOOR` (computed as ``-expm1(logsumexp(top-k))``, stable near 1)."""
    import torch

    head = torch.logsumexp(topk_logprobs.float(), dim=-1).clamp_max(0.0)
    return (-torch.expm1(head)).clamp_min(TOPK_TAIL_FLOOR)


def _term_items(num_items_in_batch: dict[str, float] | None, *terms: str) -> tuple[float | None, ...]:
    """The step's item count of each of ``terms`` (None everywhere: each micro-batch its own)."""
    if num_items_in_batch is None:
        return (None,) * len(terms)
    return tuple(num_items_in_batch[t] for t in terms)


class KDStep:
    """``kd_ratio · divergence + (1 − kd_ratio) · CE`` on the training responses.

    The teacher's distribution comes from the spec's ``teacher_signal``: the frozen teacher's
    logits (``online``), the stored top-k log-probs and ids (``topk``: the divergence on the
    top-k + tail buckets, :func:`kdray.losses.sparse_divergence`), or the stored hidden states
    times the teacher's lm_head (``hidden``). In ``hidden`` and ``online`` modes both models'
    final hidden states go straight into :func:`kdray.losses.fused_linear_divergence`, so
    neither model's ``[tokens, V]`` logits are ever materialised; under ZeRO-3 the loss is
    computed inside the student's lm_head forward, where the partitioned weight is whole
    (:func:`kdray.train.teacher.head_computing`). A LoRA adapter on the lm_head
    (``training.lora.target_modules`` naming ``lm_head``) takes the logits path (the fused loss
    reads the head's base weight), and so does a model whose logits are not its final hidden
    states times its lm_head (:func:`kdray.models.logits_after_head`: Gemma's soft-capping).
    Logits are compared over the vocabulary both models share (padding rows of a larger
    embedding are sliced off, :func:`kdray.models.shared_vocab_size`).
    """

    def __init__(self, spec: JobSpec, segment: Segment):
        from kdray.models import logits_after_head, shared_vocab_size

        self.spec, self.segment = spec, segment
        self.mode = spec.teacher_signal.mode
        self.vocab = shared_vocab_size(spec.teacher.model, spec.student.model)
        lora = spec.training.lora
        adapted_head = lora is not None and lora_target("lm_head", list(lora.target_modules))
        transformed = any(logits_after_head(ref) for ref in (spec.student.model, spec.teacher.model))
        self.fused = self.mode in ("hidden", "online") and not adapted_head and not transformed

    def items(self, batch: dict[str, Any]) -> dict[str, int]:
        """What each term of this objective averages over in ``batch``: its label tokens (the KD
        and the CE term share them). :func:`kdray.train.step.step_items` sums these over a step."""
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {"kd": n, "ce": n}

    def __call__(self, engine: Any, teacher: Any, batch: dict[str, Any],
                 num_items_in_batch: dict[str, float] | None = None) -> tuple[Any, dict[str, float], int]:
        """The loss of one micro-batch.

        Args:
            engine: the student: a DeepSpeed engine or the model itself (called with
                ``input_ids`` and ``attention_mask``; ``.module`` is used when present).
            teacher: what :func:`kdray.train.teacher.worker_teacher` gives for the spec's
                ``teacher_signal`` (the model, partitioned or whole; its lm_head; None).
            batch: tensors of one micro-batch of ``B`` rows padded to length ``L``, as
                :class:`kdray.data.examples.TokenizeForTraining` makes them:
                ``input_ids [B, L]``, ``attention_mask [B, L]``, ``labels [B, L]`` (response
                tokens, ``IGNORE_INDEX`` elsewhere); ``topk`` mode adds ``t_topk_ids [B, L, k]``
                and ``t_topk_logprobs [B, L, k]``, ``hidden`` mode ``t_hidden [B, L, H]`` (the
                teacher at the position predicting each label).
            num_items_in_batch: the step's items per term (:meth:`items` summed over the step,
                :func:`kdray.train.step.step_items`); None: this micro-batch's own.

        Returns:
            (loss: scalar tensor with grad, the sum over the micro-batch's label tokens divided
            by the step's; its parts as floats, likewise (``kd``, and ``ce`` when
            ``kd_ratio < 1``); the number of label tokens).
        """
        import torch

        from kdray import losses

        n_kd, n_ce = _term_items(num_items_in_batch, "kd", "ce")
        if self.fused:
            return self._fused(engine, teacher, batch, n_kd, n_ce)
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logits = engine(input_ids=ids, attention_mask=attn, use_cache=False).logits
        s, target, mask = _shifted(_upcast(logits[..., : self.vocab]), labels)
        seg, obj = self.segment, self.spec.objective
        ce_labels = target if seg.kd_ratio < 1.0 else None
        if self.mode == "topk":
            t_ids, t_lps = batch["t_topk_ids"][:, 1:], batch["t_topk_logprobs"][:, 1:]
            outside = t_ids >= self.vocab  # a padding row of a larger teacher vocabulary: not a token
            t_ids, t_lps = t_ids.masked_fill(outside, 0), t_lps.masked_fill(outside, float("-inf"))
            kd_tokens = losses.sparse_divergence(
                obj.kind, s, t_ids, t_lps, teacher_tail_mass=topk_tail_mass(t_lps),
                temperature=seg.kd_temperature, mask=mask, **obj.divergence_params(),
            )
            ce = None
            if ce_labels is not None:
                ce = losses.masked_token_mean(losses.token_cross_entropy(s, target, mask=mask), mask,
                                              num_items_in_batch=n_ce)
            kd = losses.masked_token_mean(kd_tokens, mask, num_items_in_batch=n_kd)
            loss, parts = losses.mix_kd_and_ce(kd, ce, seg.kd_ratio, obj.kd_scale(seg.kd_temperature))
        else:
            with torch.no_grad():
                if self.mode == "hidden":
                    t_logits = teacher.logits(batch["t_hidden"][:, 1:])
                else:
                    t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
            loss, parts = losses.kd_objective(
                s, _upcast(t_logits[..., : self.vocab]), mask=mask, divergence=obj.kind, kd_ratio=seg.kd_ratio,
                kd_temperature=seg.kd_temperature, labels=ce_labels, divergence_kwargs=obj.divergence_params(),
                num_items_in_batch=n_kd, ce_num_items_in_batch=n_ce, kd_scale=obj.kd_scale(seg.kd_temperature),
            )
        return loss, {k: float(v) for k, v in parts.items() if k != "loss"}, int(mask.sum())

    def _fused(self, engine: Any, teacher: Any, batch: dict[str, Any], n_kd: float | None,
               n_ce: float | None) -> tuple[Any, dict[str, float], int]:
        """``hidden`` and ``online`` modes: both models' final hidden states (the teacher's
        stored, or from its forward under no_grad) into the fused lm-head loss, so neither
        model's ``[tokens, V]`` logits exist. A ZeRO-3 student computes it in its lm_head's
        forward (:func:`kdray.train.teacher.head_computing`); any other runs its decoder."""
        import torch

        from kdray import losses

        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.mode == "hidden":
            t_weight, t_bias = teacher.weight, teacher.bias
            t_hidden = batch["t_hidden"][:, 1:].to(t_weight.dtype)
        else:  # online: the teacher model itself, whole or partitioned
            with torch.no_grad():
                t_hidden, t_weight, t_bias = teacher_final_states(teacher, ids, attn, self.vocab)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        seg, obj = self.segment, self.spec.objective
        parts: dict[str, Any] = {}

        def loss_on(hidden: Any, weight: Any, bias: Any) -> Any:
            kd = losses.fused_linear_divergence(
                hidden, weight, t_hidden, t_weight,
                divergence=obj.kind, reduction="token_mean", temperature=seg.kd_temperature, mask=mask,
                student_bias=bias, teacher_bias=t_bias, num_items_in_batch=n_kd,
                compiled=self.spec.training.compile_loss, **obj.divergence_params(),
            )
            ce = None
            if seg.kd_ratio < 1.0:
                ce = losses.fused_linear_cross_entropy(hidden, weight, target, mask=mask, bias=bias,
                                                       num_items_in_batch=n_ce)
            loss, mixed = losses.mix_kd_and_ce(kd, ce, seg.kd_ratio, obj.kd_scale(seg.kd_temperature))
            parts.update(mixed)
            return loss

        model = unwrapped(engine)  # a DeepSpeed engine (peft inside with LoRA), or the model itself
        if partitioned(engine):
            def head_loss(head: Any, hidden: Any) -> Any:  # runs while ZeRO-3 holds the head whole
                parts["_ran"] = 1
                return loss_on(hidden[:, :-1], *head_weights(model, self.vocab))

            with head_computing(model, head_loss):
                loss = engine(input_ids=ids, attention_mask=attn, use_cache=False).logits
            if "_ran" not in parts or loss.dim() != 0:  # the model bypassed or post-processed its lm_head
                raise RuntimeError(f"{type(model).__name__}'s forward did not return its lm_head's output as its "
                                   "logits: the fused loss cannot run inside it under ZeRO-3")
        else:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[:, :-1]
            loss = loss_on(hidden, *head_weights(model, self.vocab))
        return loss, {k: float(v) for k, v in parts.items() if k not in ("loss", "_ran")}, int(mask.sum())

    def end_micro_batches(self) -> None:
        """Called once the step's micro-batches are done, before its metrics are read (a schedule
        folds in what the step observed; this one has none)."""

    def optimizer_step(self) -> None:
        """Called after every optimizer step (schedules advance here; this one has none)."""

    def metrics(self) -> dict[str, float]:
        """The schedule values the current step uses, for its metrics."""
        return {"kd_temperature": self.segment.kd_temperature, "kd_ratio": self.segment.kd_ratio}

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint must keep to continue identically (None: nothing)."""
        return None


class DistiLLM2Step(KDStep):
    """DistiLLM-2: ``(2 − β)·SKL_α`` on teacher responses + ``β·SRKL_α`` on the student's own
    responses of the same prompts, α per sample (mode ``paper``) or fixed (``released_code``).

    With ``kd_ratio < 1`` (POCL's early stages) the CE on the teacher responses is mixed in
    as for every objective: ``kd_ratio · CALD + (1 − kd_ratio) · CE``. Δ is all-gathered
    across ranks and folded into the running means once per optimizer step, so every rank keeps
    the same α and a step's α does not depend on how the step is split into micro-batches.
    """

    def __init__(self, spec: JobSpec, segment: Segment, total_steps: int, num_rounds: int,
                 state: dict[str, Any] | None):
        from kdray.curriculum import DistiLLM2Schedule

        super().__init__(spec, segment)
        cfg = spec.curriculum_of("distillm2")
        self.schedule = DistiLLM2Schedule(
            num_rounds=num_rounds,
            total_steps=total_steps if cfg.beta_scope == "job" else segment.steps,
            mode=cfg.mode, alpha0=spec.objective.alpha, alpha_min=cfg.alpha_min, eps=cfg.eps,
            running_mean=cfg.running_mean, ema_decay=cfg.ema_decay, beta_scope=cfg.beta_scope,
        )
        if state is not None:
            # With beta_scope "round" T is this round's length, which differs between POCL
            # stages; every other setting must match the saved one (load_state_dict checks).
            self.schedule.load_state_dict({**state, "config": {**state["config"],
                                                               "total_steps": self.schedule.total_steps}})
        while self.schedule.round < segment.round:  # the previous segment's round has ended
            self.schedule.end_round()
        self._pending: list[tuple[Any, Any]] = []  # (Δ, is-student flags) of this step's micro-batches

    def items(self, batch: dict[str, Any]) -> dict[str, int]:
        """What each term averages over in ``batch``: SKL the teacher responses and SRKL the
        student responses that have a label token (DistiLLM-2 averages per response, then over
        responses), CE the teacher responses' label tokens."""
        teacher_mask = batch["labels"][:, 1:] != IGNORE_INDEX
        student_mask = batch["s_labels"][:, 1:] != IGNORE_INDEX
        return {"skl": int(teacher_mask.any(-1).sum()), "srkl": int(student_mask.any(-1).sum()),
                "ce": int(teacher_mask.sum())}

    def __call__(self, engine: Any, teacher: Any, batch: dict[str, Any],
                 num_items_in_batch: dict[str, float] | None = None) -> tuple[Any, dict[str, float], int]:
        """The loss of one micro-batch of paired responses.

        Args:
            engine, teacher: as for :meth:`KDStep.__call__` (the teacher is the model: online).
            batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]`` of the teacher
                responses and ``s_input_ids``, ``s_attention_mask``, ``s_labels`` ``[B, L]`` of
                the student's responses to the same ``B`` prompts (row ``i`` pairs with row ``i``).
            num_items_in_batch: the step's items per term (:meth:`items` summed over the step);
                None: this micro-batch's own.

        Returns:
            (loss: ``(2 − β)·SKL_α + β·SRKL_α``, mixed with CE when ``kd_ratio < 1``; parts
            ``kd``, ``skl``, ``srkl`` (and ``ce``) as floats; label tokens of both halves).
            Δ of every row (all-gathered across ranks) is kept for the schedule, which observes
            the step's Δ at :meth:`end_micro_batches`; α comes from the means before the step.
        """
        import torch
        import torch.distributed as dist

        from kdray import losses
        from kdray.curriculum import distillm2_delta

        n = batch["input_ids"].shape[0]
        ids = torch.cat([batch["input_ids"], batch["s_input_ids"]])
        attn = torch.cat([batch["attention_mask"], batch["s_attention_mask"]])
        labels = torch.cat([batch["labels"], batch["s_labels"]])
        logits = engine(input_ids=ids, attention_mask=attn, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits
        s, target, mask = _shifted(_upcast(logits[..., : self.vocab]), labels)
        t = _upcast(t_logits[:, :-1, : self.vocab])
        flags = torch.arange(2 * n, device=s.device) >= n  # second half: student responses
        safe = target.clamp(min=0).unsqueeze(-1)
        with torch.no_grad():
            delta = distillm2_delta(t.log_softmax(-1).gather(-1, safe).squeeze(-1),
                                    s.detach().log_softmax(-1).gather(-1, safe).squeeze(-1), mask, flags)
        alpha = self.schedule.alpha(delta, flags, record=False)
        seg = self.segment
        n_skl, n_srkl, n_ce = _term_items(num_items_in_batch, "skl", "srkl", "ce")
        cald, parts = losses.distillm2_loss(
            s[:n], t[:n], mask[:n], s[n:], t[n:], mask[n:], beta=self.schedule.beta,
            skl_alpha=alpha[:n], srkl_alpha=alpha[n:], temperature=seg.kd_temperature,
            detach_mixture_student=self.spec.objective.detach_mixture_student,
            num_items_in_batch=None if num_items_in_batch is None else (n_skl, n_srkl),
        )
        out = {"kd": float(parts["loss"]), "skl": float(parts["skl"]), "srkl": float(parts["srkl"])}
        loss = cald = self.spec.objective.kd_scale(seg.kd_temperature) * cald  # T² under POCL's temperature
        if seg.kd_ratio < 1.0:
            ce = losses.masked_token_mean(losses.token_cross_entropy(s[:n], target[:n], mask=mask[:n]), mask[:n],
                                          num_items_in_batch=n_ce)
            out["ce"] = float(ce.detach())
            loss = seg.kd_ratio * cald + (1.0 - seg.kd_ratio) * ce
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank's Δ and α, in one gather
            both = torch.stack([delta, alpha.to(delta.dtype)])
            gathered = [torch.empty_like(both) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, both.contiguous())
            delta, alpha = torch.cat(gathered, dim=1)
            flags = flags.repeat(dist.get_world_size())
        if torch.is_grad_enabled():  # a training micro-batch (not validation): Δ counts at the step's end
            self._pending.append((delta, flags))
            self.schedule.record_alpha(alpha)  # the step's α statistics, every rank's
        return loss, out, int(mask.sum())

    def end_micro_batches(self) -> None:
        """Fold the step's Δ (every micro-batch of every rank) into the running means: α stayed
        the same within the step, so the step does not depend on its split."""
        import torch

        if self._pending:
            self.schedule.observe(torch.cat([d for d, _ in self._pending]), torch.cat([f for _, f in self._pending]))
            self._pending = []

    def optimizer_step(self) -> None:
        self.schedule.step()

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({k: v for k, v in self.schedule.metrics().items() if k != "round"})
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()


def make_step_objective(spec: JobSpec, segment: Segment, *, total_steps: int, num_segments: int,
                        state: dict[str, Any] | None) -> KDStep:
    """The objective for ``segment`` of a plan of ``num_segments`` (``total_steps`` optimizer
    steps); ``state`` is the schedule state saved by the previous segment or checkpoint
    (None at the start of a job)."""
    if spec.objective.kind == "distillm2":
        return DistiLLM2Step(spec, segment, total_steps, num_segments, state)
    return KDStep(spec, segment)
