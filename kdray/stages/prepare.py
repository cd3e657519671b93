"""Stage 1, prepare: read and check the training and held-out data before any work.

The training split is read and checked by Ray Data tasks and written as the committed dataset
``datasets/prompts/`` (:func:`kdray.data.split.write_checked_split`), which a resumed job
reuses; the held-out split, small by ``data.max_heldout_samples``, is read and checked here with
the same per-row check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.data.artifacts import Artifact, open_artifact
from kdray.data.datasets import load_split
from kdray.data.split import PROMPTS_KIND, write_checked_split
from kdray.data.tokenize import prompt_token_counter
from kdray.models import check_model_files, load_tokenizer, shared_vocab_size
from kdray.stages.context import StageContext

#: A prompt row's bytes per token, at most (~4 B of text per token for prompt and response):
#: sizes the dataset's files (:data:`kdray.data.artifacts.FILE_BYTES`).
PROMPT_ROW_BYTES_PER_TOKEN = 8


@dataclass
class Prepared:
    """The checked data of a job.

    Attributes:
        train: the committed dataset ``datasets/prompts/`` of the kept training rows: ``_row``
            (the row's number in the split, from 0), ``id``, ``prompt``, and ``response`` when
            ``data.response_source`` is ``dataset``; ``train.rows`` is their number.
        heldout: held-out rows (with ``response`` when evaluation or replay needs it).
        row_reports: per split, how many rows were read, kept and dropped, and why.
        vocab_size: the vocabulary the teacher and student share (logits are cut to it).
    """

    train: Artifact
    heldout: list[dict[str, Any]]
    row_reports: dict[str, Any]
    vocab_size: int


def prepare(ctx: StageContext) -> Prepared:
    """Check that teacher and student share a tokenizer and render prompts alike, then read
    both splits. The job's prompt encoding is decided here (:meth:`StageContext.prompt_encoding`),
    and the prompt lengths are counted with it. Runs on the Ray the job started or joined (a
    local one is started when none is up); a committed ``datasets/prompts/`` of an earlier run
    of the job is reused.

    Raises:
        ModelError: a local model directory has no weights, a tokenizer does not load, the
            tokenizers differ (naming the first differing tokens), or the teacher and student
            render a prompt differently (showing both renderings and the fix).
        DataError: a split cannot be read or has unusable rows (naming the file, line or rows);
            no training dataset is left behind.
    """
    spec = ctx.spec
    with ctx.phase("prepare", 2, "read and check data"):
        judge = spec.evaluation.judge
        for model in (spec.teacher, spec.student, *((judge.model,) if judge is not None else ())):
            check_model_files(model.model)  # before any pool or worker tries to load it
        vocab_size = shared_vocab_size(spec.teacher.model, spec.student.model)  # or a clear error, now
        encoding = ctx.prompt_encoding()  # one for the whole job, or a clear error, now
        tokenizer = load_tokenizer(spec.student.model)  # loads here, or a clear error, before any task
        path = ctx.out / "datasets" / "prompts"
        train = open_artifact(path, PROMPTS_KIND)
        if train is not None:
            ctx.reporter.message(f"prepare: reusing the {train.rows} training rows checked by an earlier run")
        else:
            train = write_checked_split(
                spec.data, "train", path, need_response=spec.data.response_source == "dataset",
                tokenizer_ref=spec.student.model, encoding=encoding,
                row_bytes=PROMPT_ROW_BYTES_PER_TOKEN * (spec.data.max_prompt_tokens + spec.training.max_seq_len))
        ctx.reporter.advance("prepare")
        heldout, held_report = load_split(
            spec.data, "heldout", prompt_token_counter(tokenizer, encoding),
            need_response=spec.evaluation.enabled or spec.curriculum_of("replay") is not None,
        )
        ctx.reporter.advance("prepare")
    return Prepared(train, heldout, {"train": train.meta["report"], "heldout": held_report.as_dict()}, vocab_size)
