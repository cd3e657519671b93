"""The training parts of a job spec: the teacher signal, LoRA and the Ray Train + DeepSpeed
settings. Re-exported by :mod:`kdray.spec`, the one entry point."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdray.spec.base import RestartCount, _Spec, _yaml

class TeacherSignalSpec(_Spec):
    """What the student learns from: the teacher's distribution over the vocabulary at every
    response token, and where it comes from."""

    mode: Literal["online", "topk", "hidden"] = Field(
        "online",
        description="'online': the frozen teacher runs inside every training worker (exact; "
        "costs worker memory). 'topk': the teacher pool scores every response once and stores "
        "its top-k log-probs and ids per token (compact parquet records); the losses use the "
        "top-k + tail buckets. With the on_policy curriculum a live teacher pool (generation's "
        "replicas) scores the student's samples the same way as they are made. 'hidden': the teacher pool stores the teacher's final hidden "
        "state per token; workers hold only the teacher's lm_head and compute exact logits.",
    )
    k: int = Field(
        20, ge=1, le=1024,
        description="Top-k log-probs kept per token in 'topk' mode (vLLM's max_logprobs is "
        "raised to fit).",
    )
    hidden_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Storage dtype of the teacher hidden states in 'hidden' mode (float32 "
        "reproduces the teacher's logits to float rounding; 16-bit halves the records).",
    )
    max_records_gb: float | None = Field(
        None, gt=0,
        description="Storage budget for the teacher records (topk / hidden modes), in GB (10^9 "
        "bytes). Before any work the job states the records' size at most (rows × response "
        "tokens × bytes per token, before compression) and refuses to start when it exceeds "
        "this budget. null: no budget (the size is still stated).",
    )


# The attention and MLP projections of Llama, Qwen2, Mistral and their kin.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSpec(_Spec):
    """LoRA adapters (peft) on the student: only the adapters train; the export merges them
    into the base weights, so the exported student is a plain model."""

    r: int = Field(16, ge=1, description="Rank of each adapter (peft's r).")
    alpha: float = Field(32.0, gt=0.0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Names of the linear modules that get adapters (the last part of the "
        "module path); default: the attention and MLP projections of Llama / Qwen2. Naming lm_head "
        "moves the loss off the fused lm-head path onto full logits.",
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not re.fullmatch(r"[A-Za-z_][\w.]*", name)]
        if bad:
            raise ValueError(f"{bad} are not module names; give names such as 'q_proj' or 'mlp.down_proj'")
        if len(set(v)) != len(v):
            raise ValueError("target_modules lists a module twice; list each once")
        return v


#: Failure policy defaults (docs/guide.md, "Checkpoints and failures"): a lost node costs at most
#: the steps since the latest checkpoint, and the job goes on by itself up to twice a segment.
CHECKPOINT_EVERY_STEPS = 200
MAX_FAILURES = 2


class TrainingSpec(_Spec):
    """Ray Train + DeepSpeed ZeRO settings. Batch sizes say their scope in their names."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false uses gloo on CPU.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 0 plain data parallelism; 1 shards the optimizer "
        "state over the workers, 2 also the gradients, 3 also the parameters (the online teacher's "
        "too: each worker holds 1/N of it plus the modules being gathered)."
    )
    lr: float = Field(
        1e-4, gt=0.0, description="Peak learning rate of AdamW: linear warmup to it, then cosine "
        "decay to 0 at the job's last step (at each stage's, with POCL's restart_optimizer_each_stage)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    gradient_clipping: float = Field(
        1.0, ge=0.0, description="Largest global L2 norm of the gradient; larger ones are scaled "
        "down to it (DeepSpeed gradient_clipping; 0 disables)."
    )
    global_batch_size: int = Field(
        32, ge=1, description="Sequences per optimizer step, summed over all workers."
    )
    micro_batch_size_per_worker: int = Field(
        4, ge=1, description="Sequences per forward/backward on one worker."
    )
    group_by_length: bool = Field(
        False, description="Put rows of similar length in the same micro-batch to cut padding (Hugging Face's "
        "group_by_length): each worker sorts windows of length_group_size micro-batches of its shuffled "
        "rows by length, cuts them into micro-batches and trains those in a seeded random order. The "
        "step's loss is normalised over the whole step, so grouping changes which rows share a "
        "micro-batch, not how much each weighs."
    )
    length_group_size: int = Field(
        50, ge=1, description="With group_by_length: micro-batches per window sorted by length (50, as "
        "Hugging Face's megabatches). Larger windows cut more padding; a worker holds a window of rows in "
        "memory, teacher records included."
    )
    epochs: int = Field(1, ge=1, description="Passes over the training responses.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (null: run all epochs)."
    )
    max_seq_len: int = Field(
        512, ge=8, description="Prompt + response tokens per training sequence (longer is cut); "
        "each micro-batch is padded to its own longest sequence, not to this."
    )
    tokenize_actors: int | None = Field(
        None, ge=1, description="Ray Data tasks that tokenize the training rows at once, before the "
        "workers start (null: one per training worker); each worker "
        "process loads the tokenizer once."
    )
    tokenize_batch_rows: int = Field(
        256, ge=1, description="Rows per batch of each tokenizing task."
    )
    seed: int = Field(
        0, description="Seed of the training data order and of each worker's torch RNG (seed + rank)."
    )
    checkpoint_every_steps: int | None = Field(
        CHECKPOINT_EVERY_STEPS,
        ge=1,
        description="Save a DeepSpeed checkpoint (model, optimizer, scheduler, step) every N "
        "optimizer steps; a restarted worker group (max_failures) or a re-run of the job resumes "
        "from the latest, so a lost node costs at most the steps since it. Each save writes every "
        "rank's ZeRO state to output_dir: lower N where steps are slow or nodes fail without notice, "
        "raise it where the state is large. null: only each segment's final state is saved (a "
        "failure restarts the segment). A preemption notice (Ray draining a node, as for a spot "
        "reclaim) also saves one at once and one shortly before its deadline, off this schedule.",
    )
    max_failures: RestartCount = Field(
        MAX_FAILURES,
        ge=-1,
        description="Worker-group failures (a lost node, a killed or crashed worker) Ray Train "
        "recovers from in each segment by restarting the workers from the latest checkpoint "
        "before the job fails; -1 retries forever, 0 fails at once. A KdrayError a worker raises "
        "(bad data, a model that does not load) is never retried; a node drained for a preemption is "
        "retried without counting here only when Ray Train lets it go first (one taken at its deadline "
        "or sooner counts).",
    )
    lora: LoraSpec | None = Field(
        None,
        description="Train LoRA adapters (peft) instead of every weight: null (full fine-tuning) "
        "or a mapping {r, alpha, dropout, target_modules}. The exported student has the adapters "
        "merged in.",
    )
    offload_optimizer: bool = Field(
        False,
        description="Keep the optimizer state (AdamW moments, fp32 master weights) in CPU memory "
        "(ZeRO-Offload); needs zero_stage 1, 2 or 3. Saves GPU memory, costs step time.",
    )
    offload_param: bool = Field(
        False,
        description="Keep the partitioned parameters in CPU memory between uses (ZeRO-Infinity); "
        "needs zero_stage 3.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the student's activations in the backward pass instead of keeping "
        "them (transformers' gradient_checkpointing_enable, non-reentrant): of each layer's "
        "activations only its input is kept, at the cost of a second forward pass. The same "
        "gradients either way.",
    )
    compile_loss: bool | None = Field(
        None,
        description="Run the fused lm-head loss's per-chunk kernel compiled (TorchInductor, ahead of time "
        "in a child process, cached per node in $KDRAY_LOCAL_CACHE_DIR/kernels, default ~/.cache/kdray; on CPU it "
        "needs a C++ compiler): two fused passes over each chunk's logits instead of a dozen, two or three "
        "[chunk, V] buffers instead of about eight. null: compile when the vocabulary has 32,768 entries or "
        "more (the first job on a machine then waits 10-30 s per kernel for the build). adaptive_kl always "
        "runs eager; a failed build warns once and runs eager. The same loss either way, to float rounding.",
    )

    gpu_memory_gb: float | None = Field(
        None, gt=0,
        description="GPU memory of one training worker, in GB (10^9 bytes). Before any work the job "
        "estimates what a worker holds (student weights, gradients and optimizer state under the ZeRO "
        "stage and offload, the teacher's share, activations of one micro-batch, the loss) and refuses "
        "to start above it, naming each part. Needs use_gpu. null: no check (kdray validate prints the "
        "estimate either way).",
    )

    @field_validator("checkpoint_every_steps", mode="before")
    @classmethod
    def _checkpoint_interval(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, int) and v < 1):
            raise ValueError(f"{_yaml(v)} is not an interval: give a number of optimizer steps (1 or more), or "
                             "null to save only each segment's final state")
        return v

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainingSpec":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "offload_optimizer needs ZeRO: set zero_stage to 1, 2 or 3, or offload_optimizer to false"
            )
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(
                f"offload_param needs zero_stage 3 (got {self.zero_stage}): only ZeRO-3 partitions the "
                "parameters; set zero_stage to 3, or offload_param to false"
            )
        return self

    @model_validator(mode="after")
    def _gpu_budget_needs_gpu(self) -> "TrainingSpec":
        if self.gpu_memory_gb is not None and not self.use_gpu:
            raise ValueError("gpu_memory_gb is the memory of a worker's GPU; set use_gpu: true, or remove "
                             "gpu_memory_gb (kdray validate prints the estimate for CPU workers too)")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainingSpec":
        per_step = self.micro_batch_size_per_worker * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size_per_worker * num_workers ({per_step}); e.g. set "
                f"global_batch_size to {max(per_step, round(self.global_batch_size / per_step) * per_step)}"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size_per_worker * self.num_workers)
