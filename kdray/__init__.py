"""kdray: knowledge distillation of large language models on Ray.

The Python API (:mod:`kdray.api`): :func:`validate` a spec, :func:`run` a job, read its
:class:`Report`; the command line is ``kdray`` (:mod:`kdray.cli`)."""

from kdray.api import Report, Scores, run, validate

__all__ = ["Report", "Scores", "run", "validate"]
