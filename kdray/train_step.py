"""What one training micro-batch computes, per objective: the loss, its parts, the schedule.

:func:`make_step_objective` picks the objective for a segment of the plan
(:mod:`kdray.plan`):

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

from kdray.plan import Segment
from kdray.records import IGNORE_INDEX
from kdray.spec import JobSpec



def _shifted(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Logits at positions that predict a label, the labels, and the label mask."""
    target = labels[:, 1:]
    return logits[:, :-1], target, target != IGNORE_INDEX


class KDStep:
    """``kd_ratio · divergence + (1 − kd_ratio) · CE`` on the training responses."""

    def __init__(self, spec: JobSpec, segment: Segment):
        self.spec, self.segment = spec, segment

    def __call__(self, engine: Any, teacher: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float], int]:
        import torch

        from kdray import losses

        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logits = engine(input_ids=ids, attention_mask=attn).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits
        s, target, mask = _shifted(logits.float(), labels)
        seg, obj = self.segment, self.spec.objective
        loss, parts = losses.kd_objective(
            s, t_logits[:, :-1].float(), mask=mask, divergence=obj.kind, kd_ratio=seg.kd_ratio,
            kd_temperature=seg.kd_temperature, labels=target if seg.kd_ratio < 1.0 else None,
            divergence_kwargs=obj.divergence_params(),
        )
        return loss, {k: float(v) for k, v in parts.items() if k != "loss"}, int(mask.sum())

    def optimizer_step(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"kd_temperature": self.segment.kd_temperature, "kd_ratio": self.segment.kd_ratio}

    def state_dict(self) -> dict[str, Any] | None:
        return None


class DistiLLM2Step(KDStep):
    """DistiLLM-2: ``(2 − β)·SKL_α`` on teacher responses + ``β·SRKL_α`` on the student's own
    responses of the same prompts, α per sample (mode ``paper``) or fixed (``released_code``).

    With ``kd_ratio < 1`` (POCL's early stages) the CE on the teacher responses is mixed in
    as for every objective: ``kd_ratio · CALD + (1 − kd_ratio) · CE``. Δ is all-gathered
    across ranks before it updates the running means, so every rank keeps the same α.
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

    def __call__(self, engine: Any, teacher: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float], int]:
        import torch
        import torch.distributed as dist

        from kdray import losses
        from kdray.curriculum import distillm2_delta

        n = batch["input_ids"].shape[0]
        ids = torch.cat([batch["input_ids"], batch["s_input_ids"]])
        attn = torch.cat([batch["attention_mask"], batch["s_attention_mask"]])
        labels = torch.cat([batch["labels"], batch["s_labels"]])
        logits = engine(input_ids=ids, attention_mask=attn).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits
        s, target, mask = _shifted(logits.float(), labels)
        t = t_logits[:, :-1].float()
        flags = torch.arange(2 * n, device=s.device) >= n  # second half: student responses
        safe = target.clamp(min=0).unsqueeze(-1)
        with torch.no_grad():
            delta = distillm2_delta(t.log_softmax(-1).gather(-1, safe).squeeze(-1),
                                    s.detach().log_softmax(-1).gather(-1, safe).squeeze(-1), mask, flags)
        alpha = self.schedule.alpha(delta, flags)
        seg = self.segment
        cald, parts = losses.distillm2_loss(
            s[:n], t[:n], mask[:n], s[n:], t[n:], mask[n:], beta=self.schedule.beta,
            skl_alpha=alpha[:n], srkl_alpha=alpha[n:], temperature=seg.kd_temperature,
            detach_mixture_student=self.spec.objective.detach_mixture_student,
        )
        out = {"kd": float(parts["loss"]), "skl": float(parts["skl"]), "srkl": float(parts["srkl"])}
        loss = cald
        if seg.kd_ratio < 1.0:
            ce = losses.masked_token_mean(losses.token_cross_entropy(s[:n], target[:n]), mask[:n])
            out["ce"] = float(ce.detach())
            loss = seg.kd_ratio * cald + (1.0 - seg.kd_ratio) * ce
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(delta) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, delta.contiguous())
            delta = torch.cat(gathered)
            flags = flags.repeat(dist.get_world_size())
        self.schedule.observe(delta, flags)
        return loss, out, int(mask.sum())

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
