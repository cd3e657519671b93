"""Training the student: :mod:`.worker` (the Ray Train worker loop, checkpoints), :mod:`.objectives`
(the step objectives: what one micro-batch's loss is), :mod:`.setup` (student, LoRA, DeepSpeed
config, LR schedule, export), :mod:`.replay` (DistiLLM's replay source)."""
