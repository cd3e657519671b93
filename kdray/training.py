"""The Ray Train worker loop: DeepSpeed ZeRO distillation of the student.

``train_loop_per_worker`` runs on every Ray Train worker. It receives everything through its
config (a :class:`WorkerConfig`), never from module globals, so the same function serves the
demo, the tests and a cluster. Each optimizer step reports its metrics through
``ray.train.report``; the driver's callback forwards them to the job's progress.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.spec import JobSpec

#: Columns of the tokenized training dataset (fixed length ``training.max_seq_len``).
TRAIN_COLUMNS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs, built by the driver."""

    spec: JobSpec
    steps_per_epoch: int
    round_index: int = 0


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed config for ``spec``; the optimizer is a torch one, passed separately."""
    t = spec.training
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_worker,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": spec.student.dtype == "bfloat16"},
        "fp16": {"enabled": spec.student.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    planned = steps_per_epoch * spec.training.epochs
    return min(planned, spec.training.max_steps) if spec.training.max_steps else planned


class TokenizeForTraining:
    """Ray Data callable class: prompt + response text → fixed-length ids, mask and labels.

    Labels are the response tokens (plus EOS when the response ended on its own); the prompt
    and the padding are ``IGNORE_INDEX``, so losses cover only what the student must learn.
    """

    def __init__(self, tokenizer_ref: str, max_seq_len: int):
        from kdray.models import load_tokenizer

        self.tok = load_tokenizer(tokenizer_ref)
        self.max_len = max_seq_len

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        n = len(batch["prompt"])
        ids = np.full((n, self.max_len), self.tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, self.max_len), dtype=np.int64)
        labels = np.full((n, self.max_len), IGNORE_INDEX, dtype=np.int64)
        prompts = self.tok([str(p) for p in batch["prompt"]]).input_ids
        responses = self.tok([str(r) for r in batch["response"]], add_special_tokens=False).input_ids
        finished = batch.get("finish_reason")
        for i in range(n):
            resp = list(responses[i])
            if finished is None or str(finished[i]) != "length":
                resp.append(self.tok.eos_token_id)
            seq = (list(prompts[i]) + resp)[: self.max_len]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
            start = len(prompts[i])
            labels[i, start : len(seq)] = seq[start:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _distillation_loss(spec: JobSpec, student_logits, teacher_logits, labels):
    """Total loss and its parts for one micro-batch (next-token shift applied here)."""
    from kdray import losses

    s = student_logits[:, :-1]
    t = teacher_logits[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    obj = spec.objective
    kd = losses.masked_token_mean(
        losses.DIVERGENCES[obj.kind](s, t, temperature=obj.kd_temperature, **obj.divergence_params()),
        mask,
    )
    parts = {"kd": kd}
    total = obj.kd_ratio * kd
    if obj.kd_ratio < 1.0:
        ce = losses.masked_token_mean(losses.token_cross_entropy(s, target), mask)
        parts["ce"] = ce
        total = total + (1.0 - obj.kd_ratio) * ce
    return total, parts, int(mask.sum())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: one DeepSpeed rank."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from kdray.models import load_causal_lm

    wc: WorkerConfig = config["worker"]
    spec, t = wc.spec, wc.spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed + rank)

    student = load_causal_lm(spec.student.model, spec.student.dtype, trainable=True)
    teacher = load_causal_lm(spec.teacher.model, spec.teacher.dtype, trainable=False)
    steps = total_steps(spec, wc.steps_per_epoch)
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: cosine_with_warmup(s, warmup_steps=t.warmup_steps, total_steps=steps),
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=student, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    device = engine.device
    teacher.to(device)

    step, start_epoch, skip_micro = _restore(engine, ray.train.get_checkpoint())
    shard = ray.train.get_dataset_shard("train")
    micro_per_epoch = wc.steps_per_epoch * t.gradient_accumulation_steps
    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0.0}
    started = None  # the step's clock starts at its first micro-batch (not at data start-up)
    for epoch in range(start_epoch, t.epochs):
        batches = shard.iter_torch_batches(
            batch_size=t.micro_batch_size_per_worker,
            drop_last=True,
            local_shuffle_buffer_size=4 * t.micro_batch_size_per_worker,
            local_shuffle_seed=t.seed + 1000 * epoch + rank,
        )
        for micro, batch in enumerate(batches):
            if micro >= micro_per_epoch or step >= steps:
                break
            if epoch == start_epoch and micro < skip_micro:
                continue  # trained before the checkpoint this run resumed from
            if started is None:
                started = time.perf_counter()
            ids = batch["input_ids"].to(device)
            attn = batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            logits = engine(input_ids=ids, attention_mask=attn).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=attn).logits
            loss, parts, n_tokens = _distillation_loss(spec, logits.float(), t_logits.float(), labels)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = float(scheduler.get_last_lr()[0])  # the rate this optimizer step applies
            engine.step()
            window["loss"] += float(loss.detach())
            window["kd"] += float(parts["kd"].detach())
            window["ce"] += float(parts["ce"].detach()) if "ce" in parts else 0.0
            window["tokens"] += n_tokens
            if not boundary:
                continue
            step += 1
            sums = torch.tensor([window[k] for k in ("loss", "kd", "ce", "tokens")], dtype=torch.float64)
            dist.all_reduce(sums)
            elapsed = time.perf_counter() - started
            micro_total = t.gradient_accumulation_steps * world
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": step,
                "total_steps": steps,
                "epoch": epoch,
                "round": wc.round_index,
                "loss": float(sums[0]) / micro_total,
                "kd": float(sums[1]) / micro_total,
                "tokens_per_s": float(sums[3]) / max(elapsed, 1e-9),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "kd_temperature": spec.objective.kd_temperature,
                "kd_ratio": spec.objective.kd_ratio,
            }
            if spec.objective.kd_ratio < 1.0:  # the hard-label term exists only then
                metrics["ce"] = float(sums[2]) / micro_total
            window = dict.fromkeys(window, 0.0)
            started = None
            if step >= steps:
                _report_final(engine, spec, metrics, rank)
            elif t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                progress = {"step": step, "epoch": epoch, "micro_in_epoch": micro + 1}
                _report_checkpoint(engine, metrics, progress, rank)
            else:
                ray.train.report(metrics)
        if step >= steps:
            break
    if step < steps:  # fewer batches than planned: still export what was trained
        _report_final(engine, spec, {"step": step, "total_steps": steps, "round": wc.round_index}, rank)


def _restore(engine: Any, checkpoint: Any) -> tuple[int, int, int]:
    """Load the latest checkpoint, if Ray Train restarted us with one: (step, epoch, micro)."""
    if checkpoint is None:
        return 0, 0, 0
    with checkpoint.as_directory() as root:
        progress = json.loads((Path(root) / "progress.json").read_text())
        engine.load_checkpoint(os.path.join(root, "deepspeed"), tag=progress["tag"])
    return progress["step"], progress["epoch"], progress["micro_in_epoch"]


def _report_checkpoint(engine: Any, metrics: dict[str, Any], progress: dict[str, int], rank: int) -> None:
    """Every rank saves its ZeRO partition; Ray Train merges the ranks' directories."""
    import ray.train

    tag = f"step{progress['step']}"
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=tag)
        if rank == 0:
            (Path(tmp) / "progress.json").write_text(json.dumps({**progress, "tag": tag}))
        ray.train.report({**metrics, "checkpoint": True}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _report_final(engine: Any, spec: JobSpec, metrics: dict[str, Any], rank: int) -> None:
    """Gather the (possibly ZeRO-3 partitioned) student and report it as an HF checkpoint."""
    import deepspeed
    import ray.train

    from kdray.models import load_tokenizer

    model = engine.module
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=spec.training.zero_stage == 3):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                out = os.path.join(tmp, "student")
                model.save_pretrained(out, safe_serialization=True)
                load_tokenizer(spec.student.model).save_pretrained(out)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "final": True}, checkpoint=checkpoint)
