"""A model card (``README.md``) for every student a job exports, in the Hugging Face format:
YAML metadata (``base_model``, ``datasets``, ``library_name``, ``tags``, ``pipeline_tag``),
then what made the student: teacher, objective and curriculum, the data and its row counts,
the training budget, the held-out evaluation and the command that reproduces it.

Built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData` (the Hub's parser reads it back); see
https://huggingface.co/docs/hub/model-cards for the fields. Written by the report phase
(:func:`write_model_cards`) from ``report.json``'s content, so a card never states what the
report does not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdray.report.markdown import STDERR_NOTE, fmt, has_stderr, score, table

#: The card's evaluation table's headings.
_HEADER = ["model", "ROUGE-L", "exact match", "mean length (words)", "prompts"]


def _dataset_id(ref: str) -> str | None:
    """A spec's data reference as the card's ``datasets`` entry: a Hub dataset by its id
    (``hub:ORG/NAME[:SPLIT]`` → ``ORG/NAME``); None for anything else (a file, ``toy:…``), which
    the Hub's metadata cannot name (the card's data table gives it)."""
    return ref[len("hub:"):].split(":", 1)[0] if ref.startswith("hub:") else None


def _model_id(ref: Any) -> str | None:
    """A spec's model reference as the card's ``base_model``: a Hub id ``ORG/NAME`` as it is
    (a spec makes a local path absolute), None for a directory or a ``toy:`` model."""
    return ref if isinstance(ref, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith(".") else None


def model_card(report: dict[str, Any], *, label: str = "student_after", spec_path: str = "spec.yaml") -> str:
    """The model card of the student ``label`` of ``report`` (a job's ``report.json`` as a dict:
    ``student_after`` for the final student, ``student_round_N`` for round N's).

    Returns:
        The card's text (``---`` YAML metadata ``---`` then Markdown); its evaluation table holds
        the teacher, the student before distillation and this student where the report scored
        them, and says so where it did not."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = report.get("spec") or {}
    teacher, student = spec.get("teacher", {}), spec.get("student", {})
    objective, data, training = spec.get("objective", {}), spec.get("data", {}), spec.get("training", {})
    curricula = spec.get("curriculum") or []
    curricula = curricula if isinstance(curricula, list) else [curricula]
    kinds = [c.get("kind") for c in curricula if isinstance(c, dict) and c.get("kind")]
    metadata = ModelCardData(
        base_model=_model_id(student.get("model")),
        datasets=[hub] if data.get("train") and (hub := _dataset_id(data["train"])) else None,
        library_name="transformers", pipeline_tag="text-generation",
        tags=["kdray", "knowledge-distillation", *filter(None, [objective.get("kind")]), *kinds])
    name = report.get("name", "kdray job")
    which = "the final student" if label == "student_after" else label.replace("_", " ")
    lines = [f"# {name}: {which}", "",
             f"`{student.get('model')}` distilled from the teacher `{teacher.get('model')}` with kdray "
             "(knowledge distillation of language models on Ray).", "",
             "## Method", "",
             f"- objective: `{objective.get('kind')}`, " + ", ".join(
                 f"{k} {v}" for k, v in objective.items() if k != "kind" and v is not None),
             f"- curriculum: {', '.join(f'`{k}`' for k in kinds) if kinds else 'none'}",
             f"- teacher signal: `{(spec.get('teacher_signal') or {}).get('mode', 'online')}`", "",
             "## Data", "", "| split | source | rows | kept |", "|---|---|---|---|"]
    rows = report.get("rows") or {}
    for split in ("train", "heldout"):
        r = rows.get(split) or {}
        lines.append(f"| {split} | `{data.get(split, '—')}` | {r.get('total', '—')} | {r.get('kept', '—')} |")
    summary = report.get("train_summary") or {}  # kdray.report.train_metrics.StepLog.summary
    first, last = summary.get("first_loss"), summary.get("last_loss")
    lines += ["", "## Training", "",
              f"- optimizer steps: {last['step'] if last else 0}, global batch "
              f"{training.get('global_batch_size')} sequences, learning rate {training.get('lr')}, "
              f"{training.get('num_workers')} worker{'' if training.get('num_workers') == 1 else 's'}, DeepSpeed "
              f"ZeRO-{training.get('zero_stage')}",
              f"- student dtype: `{student.get('dtype')}`; max sequence length {training.get('max_seq_len')}"]
    if first and last:
        lines.append(f"- loss: {fmt(first.get('loss'), '.4f')} at step {first.get('step')}, "
                     f"{fmt(last.get('loss'), '.4f')} at the last step")
    evaluation = report.get("evaluation") or {}
    lines += ["", "## Held-out evaluation", ""]
    shown = [(k, evaluation[k]) for k in ("teacher", "student_before", label) if isinstance(evaluation.get(k), dict)]
    if shown:
        lines += table(_HEADER, [[k.replace("_", " "), score(s, "rougeL"), score(s, "exact_match"),
                                  fmt(s.get("mean_length"), ".2f"), fmt(s.get("n"), ".0f")] for k, s in shown])
        lines.append("")
        lines.append("Greedy answers to the held-out prompts, scored against their references (ROUGE-L F).")
        lines += ["", STDERR_NOTE] if has_stderr(s for _, s in shown) else []
    else:
        lines.append("Not evaluated (the job ran with evaluation off, or did not score this student).")
    lines += ["", "## Reproduce", "", "```", f"kdray run {spec_path}", "```", "",
              "The job's spec is stored beside its report (`spec.yaml` in the job's output directory)."]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def write_model_cards(report: dict[str, Any], students: dict[str, Path], *, spec_path: str = "spec.yaml") -> list[Path]:
    """Write ``README.md`` into each exported student directory of ``students`` (by its label in
    ``report``'s evaluation: ``student_after``, ``student_round_N``), whole or not at all
    (written beside and renamed). Returns the cards written; a directory that is gone is skipped."""
    import os

    written = []
    for label, directory in students.items():
        if not Path(directory).is_dir():
            continue
        path = Path(directory) / "README.md"
        tmp = path.with_name("README.md.tmp")
        tmp.write_text(model_card(report, label=label, spec_path=spec_path), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
