"""Stage 1, prepare: read and check the training and held-out data before any work.

Both splits are read and checked by Ray Data tasks and written as committed datasets
(:func:`kdray.data.split.write_checked_split`): the training rows to ``datasets/prompts/``, the
held-out rows to ``datasets/heldout/``. A resumed job reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.data.artifacts import Artifact, open_artifact
from kdray.data.split import PROMPTS_KIND, write_checked_split
from kdray.errors import DataError
from kdray.models import check_model_files, load_tokenizer, shared_vocab_size
from kdray.spec import JobSpec
from kdray.stages.context import StageContext

#: A prompt row's bytes per token, at most (~4 B of text per token for prompt and response):
#: sizes the dataset's files (:data:`kdray.data.artifacts.FILE_BYTES`).
PROMPT_ROW_BYTES_PER_TOKEN = 8
#: How the messages name each split.
SPLIT_NAMES = {"train": "training", "heldout": "held-out"}


@dataclass
class Prepared:
    """The checked data of a job.

    Attributes:
        train: the committed dataset ``datasets/prompts/`` of the kept training rows: ``_row``
            (the row's number in the split, from 0), ``id``, ``prompt``, and ``response`` when
            ``data.response_source`` is ``dataset``; ``train.rows`` is their number.
        heldout: the committed dataset ``datasets/heldout/`` of the kept held-out rows, as
            ``train``'s (with ``response`` when evaluation or replay needs it).
        row_reports: per split, how many rows were read, kept and dropped, and why.
        vocab_size: the vocabulary the teacher and student share (logits are cut to it).
    """

    train: Artifact
    heldout: Artifact
    row_reports: dict[str, Any]
    vocab_size: int


def split_changes(meta: dict[str, Any], spec: JobSpec, split: str, need_response: bool) -> list[str]:
    """The spec fields that differ from those a committed split (its marker's ``meta``) was
    checked with: its source, its row limit, whether rows needed a response (``[]``: it can be
    reused). A split written before the limit was recorded is compared without it."""
    limit_field = "max_train_samples" if split == "train" else "max_heldout_samples"
    now = {f"data.{split}": getattr(spec.data, split), f"data.{limit_field}": getattr(spec.data, limit_field),
           "whether rows need a response": need_response}
    then = {f"data.{split}": meta.get("source"), f"data.{limit_field}": meta.get("limit", now[f"data.{limit_field}"]),
            "whether rows need a response": meta.get("need_response")}
    return [name for name in now if now[name] != then[name]]


def prepare(ctx: StageContext) -> Prepared:
    """Check that teacher and student share a tokenizer and render prompts alike, then read
    both splits. The job's prompt encoding is decided here (:meth:`StageContext.prompt_encoding`),
    and the prompt lengths are counted with it. Runs on the Ray the job started or joined (a
    local one is started when none is up); the committed ``datasets/prompts/`` and
    ``datasets/heldout/`` of an earlier run of the job are reused.

    Raises:
        ModelError: a local model directory has no weights, a tokenizer does not load, the
            tokenizers differ (naming the first differing tokens), or the teacher and student
            render a prompt differently (showing both renderings and the fix).
        DataError: a split cannot be read or has unusable rows (naming the file, line or rows);
            no dataset of the split is left behind. Or the committed training rows were checked
            under other ``data`` settings (:func:`split_changes`; held-out rows are checked again).
    """
    spec = ctx.spec
    with ctx.phase("prepare", 2, "read and check data"):
        judge = spec.evaluation.judge
        for model in (spec.teacher, spec.student, *((judge.model,) if judge is not None else ())):
            check_model_files(model.model)  # before any pool or worker tries to load it
        vocab_size = shared_vocab_size(spec.teacher.model, spec.student.model)  # or a clear error, now
        encoding = ctx.prompt_encoding()  # one for the whole job, or a clear error, now
        load_tokenizer(spec.student.model)  # loads here, or a clear error, before any task
        row_bytes = PROMPT_ROW_BYTES_PER_TOKEN * (spec.data.max_prompt_tokens + spec.training.max_seq_len)
        splits = {}
        for split, need_response in spec.rows_need_response().items():
            path = ctx.out / "datasets" / ("prompts" if split == "train" else split)
            splits[split] = open_artifact(path, PROMPTS_KIND)
            changed = [] if splits[split] is None else split_changes(splits[split].meta, spec, split, need_response)
            if changed and split == "train":  # what the job made from those rows is stale too
                raise DataError(f"{path} holds the training rows an earlier run checked, but the spec changed "
                                f"{', '.join(changed)} since: run the job with --restart to start it over")
            if changed:  # nothing made from the held-out rows is reused: check them again
                ctx.reporter.message(f"prepare: the spec changed {', '.join(changed)}: checking the held-out rows again")
                splits[split] = None
            if splits[split] is not None:
                ctx.reporter.message(f"prepare: reusing the {splits[split].rows} {SPLIT_NAMES[split]} rows checked "
                                     "by an earlier run")
            else:
                splits[split] = write_checked_split(spec.data, split, path, need_response=need_response,
                                                    tokenizer_ref=spec.student.model, encoding=encoding,
                                                    row_bytes=row_bytes)
            ctx.reporter.advance("prepare")
    train, heldout = splits["train"], splits["heldout"]
    return Prepared(train, heldout, {"train": train.meta["report"], "heldout": heldout.meta["report"]}, vocab_size)
