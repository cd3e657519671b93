"""Data in and out of a job: :mod:`.datasets` (reading and checking rows), :mod:`.tokenize`
(prompts and examples as token ids; the trainer's tokenizing actor), :mod:`.records` (teacher
top-k / hidden-state records), :mod:`.difficulty` (POCL's difficulty ranks on disk)."""
