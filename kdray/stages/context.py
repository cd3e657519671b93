"""What every stage is given: the spec, the job's output directory, where progress goes, and
the job's one prompt encoding."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kdray.data.tokenize import PromptEncoding, job_encoding
from kdray.pools import SamplingConfig, generate
from kdray.spec import JobSpec, ModelSpec


@dataclass
class StageContext:
    """A job as its stages see it.

    Attributes:
        spec: the validated job spec.
        out: the job's output directory (absolute).
        reporter: a :class:`kdray.pipeline.progress.Reporter` (events, progress bars).
        timings: seconds spent per phase, summed over rounds (filled by :meth:`phase`).
    """

    spec: JobSpec
    out: Path
    reporter: Any
    timings: dict[str, float] = field(default_factory=dict)
    _encoding: PromptEncoding | None = field(default=None, init=False, repr=False)

    def prompt_encoding(self) -> PromptEncoding:
        """The job's prompt encoding (:func:`kdray.data.tokenize.job_encoding`), resolved and
        checked against the teacher on first use (the prepare stage), then the same object for
        every pool and the trainer.

        Raises:
            ModelError: the teacher and the student render a prompt differently, or a tokenizer
                does not load.
        """
        if self._encoding is None:
            self._encoding = job_encoding(self.spec)
        return self._encoding

    @contextmanager
    def phase(self, name: str, total: int | None, detail: str = "") -> Iterator[None]:
        """Report a phase's start, time it, and report its end (unless it raised)."""
        t0 = time.perf_counter()
        self.reporter.phase_start(name, total, detail)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
        self.reporter.phase_end(name, f"{detail} done in {elapsed:.0f}s".strip())

    def generate(self, rows: list[dict[str, Any]], model: ModelSpec, label: str, phase: str,
                 sampling: SamplingConfig, score_gold: bool = False,
                 encoding: PromptEncoding | None = None) -> list[dict[str, Any]]:
        """``model``'s answers to ``rows`` through its pool (:func:`kdray.pools.generate`),
        advancing ``phase``'s progress as rows come back. Prompts are encoded with the job's
        encoding (:meth:`prompt_encoding`), whichever model answers, unless ``encoding`` is
        given (the LLM judge's own)."""
        self.reporter.message(f"{phase}: {label} answers {len(rows)} prompts ({model.model})")
        return generate(
            rows, model, self.spec.generation, sampling, score_gold=score_gold,
            encoding=self.prompt_encoding() if encoding is None else encoding,
            on_rows=lambda n: self.reporter.advance(phase, n),
        )
