"""The stages of a job, one module each, in the order :mod:`kdray.pipeline.job` calls them:

:mod:`.prepare` (read and check data) → :mod:`.generate` (teacher and student responses) →
:mod:`.teacher_signal` (top-k / hidden records) → :mod:`.difficulty` (POCL's order) →
:mod:`.train` (one Ray Train run per segment) → :mod:`.evaluate` (held-out scores) →
:mod:`.judge` (the LLM judge's verdicts).

Each is a function of a :class:`~kdray.stages.context.StageContext` and its inputs that returns
its outputs; none knows the order of the others or what a resumed job reuses.
"""
