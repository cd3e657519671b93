"""kdray from Python: :func:`validate` a spec and :func:`run` a job, as ``kdray validate`` and
``kdray run`` do (the command line calls these), and read its :class:`Report`::

    import kdray

    report = kdray.run("jobs/demo.yaml")        # runs (or resumes) the job here
    print(report.evaluation["student_after"].rouge_l, report.student_dir)

A spec is a path to a YAML/JSON file, the decoded dict, or a :class:`kdray.spec.JobSpec`.
Errors are :class:`kdray.errors.KdrayError` subclasses naming the field, file or node and the
fix (:class:`~kdray.errors.SpecError` for a spec), as on the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Union

from kdray.errors import KdrayError, SpecError

#: What :func:`validate` and :func:`run` take as a spec.
SpecLike = Union[str, os.PathLike, dict, Any]


def load(spec: SpecLike) -> tuple[Any, str]:
    """``(JobSpec, source)``: the validated spec and the name its errors give (the file, or
    ``"spec"`` for a dict or a JobSpec). A JobSpec is validated again, from its fields: one
    changed with ``model_copy(update=...)`` (which pydantic does not validate) is checked as a
    spec written out would be. Raises :class:`SpecError` with every error."""
    from kdray.spec import JobSpec, load_spec, parse_spec

    if isinstance(spec, JobSpec):  # warnings off: an updated field may hold a dict, validated below
        return parse_spec(spec.model_dump(mode="json", warnings=False), "spec"), "spec"
    if isinstance(spec, dict):
        return parse_spec(spec, "spec"), "spec"
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec), str(spec)
    raise SpecError([("(spec)", f"expected a path, a dict or a JobSpec, got {type(spec).__name__}")], "spec")


def local_models(spec: Any) -> dict[str, str]:
    """The models of ``spec`` that are on this machine (toy models, local directories), by role."""
    from kdray.spec import TOY_PREFIX

    return {role: m.model for role, m in (("teacher", spec.teacher), ("student", spec.student))
            if m.model.startswith(TOY_PREFIX) or Path(m.model).expanduser().is_dir()}


def data_field_errors(spec: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for each field name of ``spec.data`` that the first row of a local
    split lacks (:func:`kdray.data.sources.first_fields`), or for a split its reader refuses:
    what a job would find only once it reads the rows. Under ``on_bad_rows: skip`` a first row
    without a field may be one the job drops, so only the readers' errors count. The rows
    themselves (empty prompts, duplicate ids, lengths) are checked by the job, every one of them."""
    from kdray.data.sources import first_fields

    data, errors = spec.data, []
    for split, need_response in spec.rows_need_response().items():
        ref = getattr(data, split)
        try:
            fields = first_fields(ref)
        except KdrayError as exc:
            errors.append((f"data.{split}", str(exc)))
            continue
        if fields is None or data.on_bad_rows == "skip":
            continue
        wanted = [("prompt_field", data.prompt_field), ("id_field", data.id_field)]
        wanted += [("response_field", data.response_field)] if need_response else []
        for name, value in wanted:
            if value is not None and value not in fields:
                errors.append((f"data.{name}", f"the first row of {ref} (data.{split}) has no field {value!r}; its "
                               f"fields are {', '.join(fields) or 'none'}: set data.{name} to the one that holds it (one name "
                               "for both splits)"
                               + (", or null to number the rows" if name == "id_field" else "")))
    return errors


def engine_errors(spec: Any, local: dict[str, str]) -> list[tuple[str, str]]:
    """``(field, message)`` for each local model that a vLLM pool of the job would not run
    (:func:`kdray.pools.vllm.check_engine_support`), checked only for the pools the job uses it
    in: the teacher's (its responses, its records, its held-out answers) and the student's (its
    held-out answers, POCL's difficulty, DistiLLM-2's rounds, the live pool)."""
    from kdray.pools.live import live_pool_of, student_pool_spec
    from kdray.pools.vllm import check_engine_support

    pools = {"teacher": [spec.generation] if (spec.data.response_source == "teacher" or spec.evaluation.enabled
                                              or spec.teacher_signal.mode != "online") else [],
             "student": ([spec.generation] if (spec.evaluation.enabled or spec.curriculum_of("pocl") is not None
                                               or spec.curriculum_of("distillm2") is not None) else [])
             + ([student_pool_spec(spec)] if live_pool_of(spec) is not None else [])}
    errors = []
    for role, ref in local.items():
        try:
            for pool in pools[role]:
                check_engine_support(getattr(spec, role), pool)
        except KdrayError as exc:
            field = "max_model_len" if str(exc).startswith("max_model_len") else "model"
            errors.append((f"{role}.{field}", str(exc)))
    return errors


def validate(spec: SpecLike) -> Any:
    """The resolved :class:`~kdray.spec.JobSpec` of ``spec``, checked as far as this machine can:
    the spec's fields; a local data file's first row must have the fields the spec names
    (:func:`data_field_errors`); a local model must be one its vLLM pools run
    (:func:`engine_errors`); models on this machine (toy models, local directories) must hold their
    weights, and when both are here teacher and student must share a tokenizer and render a
    prompt alike (:func:`kdray.data.tokenize.check_renderings`), a local student must have the
    layers ``training.lora`` adapts (:func:`kdray.train.setup.check_lora_targets`), and a training
    worker's memory estimate must fit ``training.gpu_memory_gb``
    (:func:`kdray.pipeline.budget.check_memory_budget`).
    A hub id is checked by the job that loads it; a template in ``data.chat_template`` must parse
    in any case.

    Raises:
        SpecError: every error, each naming its field and the fix.
    """
    from kdray.data.tokenize import job_encoding, template_syntax_error
    from kdray.models import check_model_files, shared_vocab_size
    from kdray.pipeline.budget import check_memory_budget
    from kdray.train.memory import job_estimate
    from kdray.train.setup import check_lora_targets

    job, source = load(spec)
    local = local_models(job)
    errors = []
    syntax = template_syntax_error(job.data.chat_template)
    if syntax:
        errors.append(("data.chat_template", syntax))
    for role, ref in local.items():
        try:
            check_model_files(ref)
        except KdrayError as exc:
            errors.append((f"{role}.model", str(exc)))
    errors += data_field_errors(job)
    out = Path(job.output_dir).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        errors.append(("output_dir", f"{existing} is a file, so {out} cannot be the job's directory: choose "
                                     "another output_dir"))
    if "student" in local and not errors:
        try:  # on a weightless skeleton of the student
            check_lora_targets(job)
        except KdrayError as exc:
            errors.append(("training.lora.target_modules", str(exc).removeprefix("training.lora.target_modules: ")))
    engine = engine_errors(job, local) if not errors else []  # reported beside the tokenizers' problems
    if len(local) == 2 and not errors:
        try:
            shared_vocab_size(job.teacher.model, job.student.model)
        except KdrayError as exc:
            errors.append(("teacher.model / student.model", str(exc)))
        else:
            try:
                job_encoding(job)
            except KdrayError as exc:
                errors.append(("data.chat_template", str(exc)))
        try:  # both configs at hand: what a training worker will hold, against its budget
            check_memory_budget(job, job_estimate(job))
        except SpecError as exc:
            errors += exc.errors
    errors += engine
    if errors:
        raise SpecError(errors, source)
    return job


@dataclass(frozen=True)
class Scores:
    """One model's held-out scores: mean ROUGE-L F (``rougeL`` in report.json), exact match,
    mean answer length in words, over ``n`` prompts; the standard errors of the first two
    (:func:`kdray.data.text_scores.stderr_of_mean`; None below 2 prompts, or in a report written
    before 2026-12-06)."""

    rouge_l: float
    exact_match: float
    mean_length: float
    n: int
    rouge_l_stderr: float | None = None
    exact_match_stderr: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scores":
        def stderr(key: str) -> float | None:
            return float(d[key]) if d.get(key) is not None else None

        return cls(float(d["rougeL"]), float(d["exact_match"]), float(d["mean_length"]), int(d["n"]),
                   stderr("rougeL_stderr"), stderr("exact_match_stderr"))


@dataclass(frozen=True)
class Report:
    """A finished job, as its ``report.json`` holds it.

    Attributes:
        name, status: the job's name and ``"succeeded"``.
        output_dir: the job's output directory (``report.md``, ``report.json``, the plots,
            ``samples/``); ``student_dir``: the distilled student (``save_pretrained``, with its
            model card).
        evaluation: held-out :class:`Scores` by model label (``teacher``, ``student_before``,
            ``student_round_N``, ``student_after``), in the report's order; empty with evaluation off.
        judge: the LLM judge's summary, or None.
        timings_s: seconds per phase.
        data: the whole report.json.
    """

    name: str
    status: str
    output_dir: Path
    student_dir: Path | None
    evaluation: dict[str, Scores]
    judge: dict[str, Any] | None
    timings_s: dict[str, float]
    data: dict[str, Any] = field(repr=False)

    @cached_property
    def train_metrics(self) -> list[dict[str, Any]]:
        """Every optimizer step's metrics (``step``, ``loss`` and its parts, ``lr``, schedule
        values, ``tokens_per_s``, the step's time parts), in step order: read from the job's
        ``train_metrics.jsonl`` on first use (about 1.4 KB of memory a step)."""
        from kdray.report.train_metrics import read_train_metrics

        return read_train_metrics(self.output_dir, self.data)

    @classmethod
    def from_dict(cls, report: dict[str, Any], output_dir: str | os.PathLike) -> "Report":
        student = report.get("student_dir")
        return cls(name=report["name"], status=report.get("status", "succeeded"), output_dir=Path(output_dir),
                   student_dir=Path(student) if student else None,
                   evaluation={k: Scores.from_dict(v) for k, v in (report.get("evaluation") or {}).items()},
                   judge=report.get("judge"), timings_s=dict(report.get("timings_s") or {}), data=report)

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> "Report":
        """The report of the job whose output directory (or report.json) is ``output_dir``;
        a :class:`KdrayError` naming the path and the fix when there is none."""
        from kdray.report.render import load_report

        path = Path(output_dir)
        directory = path.parent if path.name == "report.json" else path
        return cls.from_dict(load_report(path), directory)


def run(spec: SpecLike, *, address: str | None = None, restart: bool = False, progress: bool = True,
        job_id: str | None = None, on_reporter: Callable[[Any], None] | None = None) -> Report:
    """Run the job ``spec`` (or resume it: a job whose output directory holds a finished or
    interrupted run continues from its state; ``restart=True`` starts over).

    Args:
        address: the Ray cluster (``RAY_ADDRESS`` semantics); None starts or joins one here.
        progress: show the phases' progress on stderr (the events go to ``events.jsonl`` always).
        job_id, on_reporter: for the service's drivers (the output lock's owner; a hook given
            the job's reporter).

    Returns:
        The finished job's :class:`Report`.

    Raises:
        KdrayError: a user's error (spec, data, models, cluster, storage), naming what to fix.
    """
    from rich.console import Console

    from kdray.pipeline.job import Job
    from kdray.pipeline.lock import output_lock
    from kdray.pipeline.progress import ConsoleReporter, Reporter

    job, _ = load(spec)
    out = Path(job.output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError([("output_dir", f"cannot create {out}: {exc.strerror}; choose a writable directory")],
                        str(spec) if isinstance(spec, (str, os.PathLike)) else "spec") from None
    with output_lock(out, job_id):  # one driver per output_dir, before anything is written there
        events = out / "events.jsonl"
        reporter = ConsoleReporter(events, console=Console(stderr=True)) if progress else Reporter(events)
        if on_reporter is not None:
            on_reporter(reporter)
        try:
            report = Job(job, reporter=reporter, address=address, restart=restart).run()
        finally:
            reporter.close()
    return Report.from_dict(report, out.resolve())
