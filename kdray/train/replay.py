"""DistiLLM's adaptive off-policy replay inside the training worker.

:class:`ReplaySource` sits between the worker's data iterator and the objective. At the first
micro-batch of every optimizer step it asks :class:`kdray.curriculum.ReplayScheduler` where
this step's data comes from:

* ``fixed``: the data set's micro-batches, unchanged;
* ``fresh``: the current student samples a response to each prompt of the data set's
  micro-batch; the samples are trained on and pushed into the replay buffer. ``sampler:
  worker`` (DistiLLM's way): HF ``generate`` on the DeepSpeed module (``synced_gpus`` under
  ZeRO-3 so ranks stay in step). ``sampler: pool``: the live student vLLM pool
  (:mod:`kdray.pools.live`, rank ``r`` asks replica ``r mod replicas``), which gets the
  trainers' weights at the start of every fresh step whose weights it does not serve yet
  (:func:`kdray.train.on_policy.push_student`: the step's ``weight_sync_s``), as on-policy
  distillation's pushes;
* ``replay``: micro-batches drawn from the buffer.

Every rank holds the same decision RNG (same seed), so all ranks take the same branch; each
keeps its own buffer of its own samples, saved per rank with the checkpoint. The validation
loss (the student's cross-entropy on held-out prompts' reference responses, over all ranks, as
DistiLLM's) drives the threshold φ: measured once before training and every
``validate_every_steps`` optimizer steps.
"""

from __future__ import annotations

from typing import Any

from kdray.data.examples import CollateExamples
from kdray.data.tokenize import pack_examples, split_prompt_response
from kdray.pools.left_padded import generate_left_padded
from kdray.spec import JobSpec

FIXED, FRESH, REPLAY = "fixed", "fresh", "replay"


class ReplaySource:
    """Decides, per optimizer step, which micro-batches the objective sees (module docstring)."""

    def __init__(self, spec: JobSpec, *, rank: int, state: dict[str, Any] | None, pad_id: int, eos_id: int,
                 replicas: list[Any] | None = None):
        from kdray.curriculum import ReplayScheduler

        cfg = spec.curriculum_of("replay")
        self.spec, self.cfg, self.rank = spec, cfg, rank
        self.pad_id, self.eos_id = pad_id, eos_id
        self.scheduler = ReplayScheduler(capacity=cfg.capacity, init_threshold=cfg.init_threshold,
                                         threshold_step=cfg.threshold_step, loss_eps=cfg.loss_eps,
                                         reference=cfg.reference, seed=spec.training.seed)
        if state is not None:
            self.scheduler.load_state_dict(state)
        self.decision = FIXED
        self.replicas = replicas or []  # the live student pool (sampler: pool)
        self.step = 0  # optimizer steps done so far (begin_step)
        self.micro = 0  # the micro-batch of the step (a sample seed's part)
        self.served: int | None = None  # the step whose weights the pool serves (None: not pushed yet)

    @property
    def needs_initial_validation(self) -> bool:
        return self.scheduler.reference_loss is None

    def begin_step(self, step: int, total_steps: int) -> str:
        """Decide the source of optimizer step ``step`` (0-based: steps done so far)."""
        self.decision = self.scheduler.decide(step, total_steps)
        self.step, self.micro = step, 0
        return self.decision

    @property
    def push_due(self) -> bool:
        """With ``sampler: pool``, at the start of a fresh step: whether the pool needs the
        trainers' weights (it does not serve this step's yet). The same on every rank."""
        return bool(self.replicas) and self.decision == FRESH and self.served != self.step

    def push(self, engine: Any) -> None:
        """Push the trainers' weights to the pool as this step's (:attr:`push_due`). A
        collective: every rank calls it."""
        from kdray.train.on_policy import push_student

        push_student(engine, self.replicas, zero3=self.spec.training.zero_stage == 3, rank=self.rank, version=self.step)
        self.served = self.step

    def batch(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """The micro-batch to train on instead of ``batch`` (from the data set)."""
        import torch

        if self.decision == FIXED:
            return batch
        if self.decision == REPLAY:
            picked = self.scheduler.sample(batch["input_ids"].shape[0])
            pairs = [(s["prompt"], s["response"]) for s in picked]
        else:
            prompts = [p for p, _ in split_prompt_response(batch["input_ids"], batch["attention_mask"], batch["labels"])]
            pairs = list(zip(prompts, self._sample(engine, prompts)))
            self.scheduler.push([{"prompt": p, "response": r} for p, r in pairs])
        # Padded to the longest pair (within max_seq_len), as the data set's micro-batches are.
        longest = max(len(p) + len(r) for p, r in pairs)
        packed = pack_examples(pairs, min(longest, self.spec.training.max_seq_len), self.pad_id)
        device = batch["input_ids"].device
        return {k: torch.as_tensor(v, device=device) for k, v in packed.items()}

    def _sample(self, engine: Any, prompts: list[list[int]]) -> list[list[int]]:
        """One sampled response per prompt from the current student, EOS kept when it stopped."""
        self.micro += 1
        if self.replicas:
            return self._pool_sample(prompts)
        model = engine.module
        was_training = model.training
        model.eval()
        try:
            samples = generate_left_padded(
                model, prompts, pad_id=self.pad_id, stop_ids=[self.eos_id],
                max_new_tokens=self.spec.generation.max_new_tokens, temperature=self.cfg.sampling_temperature,
                top_p=self.cfg.top_p, synced_gpus=self.spec.training.zero_stage == 3, device=engine.device)
        finally:
            model.train(was_training)
        return [row[0][0] for row in samples]

    def _pool_sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """The samples of the live pool's replica of this rank, from the weights
        :meth:`push` pushed (seeded by the job's seed, the step, the rank and the micro-batch)."""
        import ray

        from kdray.pools.base import SamplingConfig
        from kdray.train.on_policy import sample_seed

        if self.served != self.step:
            raise RuntimeError(f"rank {self.rank}: fresh samples asked at step {self.step + 1} of a pool serving "
                               f"step {self.served}'s weights (push was not called)")
        sampling = SamplingConfig(temperature=self.cfg.sampling_temperature, top_p=self.cfg.top_p,
                                  max_new_tokens=self.spec.generation.max_new_tokens, n=1,
                                  seed=sample_seed(self.spec.training.seed, "replay", self.step, self.rank, self.micro))
        replica = self.replicas[self.rank % len(self.replicas)]
        return ray.get(replica.sample.remote(prompts, sampling))["responses"]

    def validate(self, engine: Any, rows: Any, device: Any) -> float:
        """The student's cross-entropy on the validation rows' reference responses, per label
        token over every rank's rows; feeds φ. This is what DistiLLM's ``evaluate`` feeds it
        (``finetune.py``: the dev set's ``CrossEntropyLoss``), the scale its ``loss_eps`` of 0.1
        was chosen on, and it does not move with the objective's schedules (POCL's temperature,
        DistiLLM-2's α and β). DistiLLM averages its batches' means; this is the tokens' mean."""
        import torch

        from kdray.losses import IGNORE_INDEX, token_cross_entropy
        from kdray.train.step import sum_over_ranks

        total, tokens = 0.0, 0
        was_training = engine.module.training
        engine.module.eval()
        try:
            with torch.no_grad():
                for batch in rows.iter_torch_batches(batch_size=self.spec.training.micro_batch_size_per_worker,
                                                     collate_fn=CollateExamples(self.pad_id)):
                    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                    logits = engine(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
                    target = labels[:, 1:]
                    total += float(token_cross_entropy(logits, target).sum())  # 0 at -100 labels
                    tokens += int((target != IGNORE_INDEX).sum())
        finally:
            engine.module.train(was_training)
        total, tokens = sum_over_ranks([total, float(tokens)])
        value = total / tokens if tokens else 0.0
        self.scheduler.on_validation(value)
        return value

    def metrics(self) -> dict[str, float]:
        return {**self.scheduler.metrics(), "replay_decision": self.decision}

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()
