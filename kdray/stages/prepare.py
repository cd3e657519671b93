"""Stage 1, prepare: read and check the training and held-out data before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.data.datasets import load_split
from kdray.data.tokenize import prompt_token_counter
from kdray.models import check_model_files, load_tokenizer, shared_vocab_size
from kdray.stages.context import StageContext


@dataclass
class Prepared:
    """The checked data of a job.

    Attributes:
        train: training rows (``id``, ``prompt``, and ``response`` when ``data.response_source``
            is ``dataset``).
        heldout: held-out rows (with ``response`` when evaluation or replay needs it).
        row_reports: per split, how many rows were read, kept and dropped, and why.
        vocab_size: the vocabulary the teacher and student share (logits are cut to it).
    """

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    row_reports: dict[str, Any]
    vocab_size: int


def prepare(ctx: StageContext) -> Prepared:
    """Check that teacher and student share a tokenizer and render prompts alike, then read
    both splits. The job's prompt encoding is decided here (:meth:`StageContext.prompt_encoding`),
    and the prompt lengths are counted with it.

    Raises:
        ModelError: a local model directory has no weights, a tokenizer does not load, the
            tokenizers differ (naming the first differing tokens), or the teacher and student
            render a prompt differently (showing both renderings and the fix).
        DataError: a split cannot be read or has unusable rows (naming the file, line or rows).
    """
    spec = ctx.spec
    with ctx.phase("prepare", 2, "read and check data"):
        judge = spec.evaluation.judge
        for model in (spec.teacher, spec.student, *((judge.model,) if judge is not None else ())):
            check_model_files(model.model)  # before any pool or worker tries to load it
        vocab_size = shared_vocab_size(spec.teacher.model, spec.student.model)  # or a clear error, now
        encoding = ctx.prompt_encoding()  # one for the whole job, or a clear error, now
        count = prompt_token_counter(load_tokenizer(spec.student.model), encoding)
        need_train_response = spec.data.response_source == "dataset"
        train, train_report = load_split(spec.data, "train", count, need_response=need_train_response)
        ctx.reporter.advance("prepare")
        heldout, held_report = load_split(
            spec.data, "heldout", count,
            need_response=spec.evaluation.enabled or spec.curriculum_of("replay") is not None,
        )
        ctx.reporter.advance("prepare")
    return Prepared(train, heldout, {"train": train_report.as_dict(), "heldout": held_report.as_dict()},
                    vocab_size)
