"""Orchestration of a job: :mod:`.job` (the driver: the order of the stages and what a re-run
reuses), :mod:`.state` (what a job has finished, for resuming), :mod:`.progress` (events and
progress bars), :mod:`.budget` and :mod:`.storage` (checked before any work: what the job will
write, and that every node of the cluster shares ``output_dir``). The stages themselves live in
:mod:`kdray.stages`."""
