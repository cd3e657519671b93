"""Orchestration of a job: :mod:`.job` (the driver: the order of the stages and what a re-run
reuses), :mod:`.state` (what a job has finished, for resuming), :mod:`.progress` (events and
progress bars). The stages themselves live in :mod:`kdray.stages`."""
