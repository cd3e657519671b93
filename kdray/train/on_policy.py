"""On-policy distillation inside the training worker (``curriculum: {kind: on_policy}``).

:class:`OnPolicySource` sits where DistiLLM's replay does (:mod:`kdray.train.replay`), between
the worker's data iterator and the objective. Optimizer step ``k`` (1-based) trains on student
samples when a generator seeded by (``training.seed``, ``k``) draws below ``lmbda`` (GKD's λ,
Agarwal et al. 2024, arXiv:2306.13649): every rank draws the same, a restored run too. Such a
step replaces each of the data set's micro-batches by the student's samples for its prompts
(``micro_batch_size_per_worker / samples_per_prompt`` of them, ``samples_per_prompt`` each),
asked of the live student pool (:mod:`kdray.pools.live`; rank ``r`` asks replica
``r mod replicas``). The objective then sees them as it sees any micro-batch: with
``teacher_signal: online`` the teacher in the worker scores them; with ``topk`` the samples go
on from the student replica to a replica of the live teacher pool (rank ``r``'s: ``r mod``
``generation.replicas``), which returns them with the teacher's top-k records, collated as the
records of the data set's rows are (:class:`~kdray.data.examples.CollateExamples`).

Weights reach the pool at the start (the segment's or the restored run's first step) and after
every ``sync_every_steps``-th optimizer step: all ranks gather the parameters (ZeRO-3), rank 0
merges LoRA and pushes, then all ranks pass a barrier, so a sample asked for afterwards comes
from the pushed weights. A push's version is the optimizer step of its weights.

* ``max_staleness: 0``: a step asks for its samples when it starts and waits for them
  (generate → train).
* ``max_staleness: 1``: while step ``k`` trains, the pool answers the prompts of step ``k``'s
  micro-batches for step ``k + 1``; the push after step ``k`` queues behind that generation.
  Step ``k + 1`` then trains on samples from weights one push old at most (its own prompts'
  samples when nothing was asked ahead: the first step, or the one after a restore).

Per step the metrics carry ``on_policy`` (1 or 0), and on an on-policy step ``sample_version``
(the oldest weights among its samples), ``staleness`` (pushes since those weights) and
``generate_s`` (the pool's generation time for this rank's samples), with a teacher pool
``teacher_score_s`` (its time scoring them); waiting for the samples (and their scores) is the
step's ``sampling_s``, pushing the weights ``weight_sync_s`` (:class:`~kdray.train.step.StepClock`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from kdray.data.examples import CollateExamples, sample_examples
from kdray.data.tokenize import split_prompt_response
from kdray.pools.base import SamplingConfig
from kdray.spec import JobSpec


def sample_seed(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (the same in every process and run)."""
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step ``step`` trains on student samples: a draw below ``lmbda`` from a
    generator seeded by (``seed``, ``step``), so every rank, and a restored run, draws the same.
    ``lmbda`` 1: every step; 0: none."""
    return random.Random(f"kdray-on-policy-{seed}-{step}").random() < lmbda


class OnPolicySource:
    """Which micro-batches each optimizer step trains on, and the pool's weights (module docstring).

    Args:
        spec: the job (its ``on_policy`` curriculum, ``training`` and ``generation``).
        rank: this worker's rank.
        replicas: the live pool's actor handles (:func:`kdray.pools.live.start_live_pools`).
        pad_id: the student's pad token id (the packed micro-batches' padding).
        end_step: the segment's last optimizer step (nothing is asked ahead past it).
        teachers: the live teacher pool's actor handles (``teacher_signal: topk``:
            :func:`kdray.pools.live.start_live_pools`), or none (``online``).
        signal_meta: the records layout the teacher pool answers in (with ``teachers``).
    """

    def __init__(self, spec: JobSpec, *, rank: int, replicas: list[Any], pad_id: int, end_step: int,
                 teachers: list[Any] = (), signal_meta: dict[str, Any] | None = None):
        self.spec, self.cfg, self.rank = spec, spec.curriculum_of("on_policy"), rank
        self.replicas, self.replica = replicas, replicas[rank % len(replicas)]
        self.teacher = teachers[rank % len(teachers)] if teachers else None
        self.collate = CollateExamples(pad_id, signal_meta if teachers else None)
        self.end_step = end_step
        self.max_new_tokens = self.cfg.max_new_tokens or spec.generation.max_new_tokens
        self.pushed: list[int] = []  # versions pushed by this run, oldest first
        self.step = 0  # the optimizer step being gathered (1-based)
        self.current: dict[int, tuple[list[list[int]], Any]] = {}  # micro index → (prompts, samples ref)
        self.ahead: dict[int, tuple[list[list[int]], Any]] = {}  # the same, asked for the next step
        self._metrics: dict[str, float] = {}

    def is_on_policy(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) trains on student samples."""
        return on_policy_step(self.spec.training.seed, step, self.cfg.lmbda)

    def begin_step(self, step: int) -> None:
        """Start gathering optimizer step ``step`` (1-based)."""
        self.step = step
        self.current, self.ahead = self.ahead, {}
        self._metrics = {"on_policy": float(self.is_on_policy(step))}

    def batch(self, batch: dict[str, Any], micro: int, clock: Any) -> dict[str, Any]:
        """The micro-batch ``micro`` (0-based within the step) to train on instead of ``batch``."""
        import ray

        n = self.cfg.samples_per_prompt
        prompts = [p for p, _ in split_prompt_response(batch["input_ids"], batch["attention_mask"], batch["labels"])]
        prompts = prompts[: len(prompts) // n]
        nxt = self.step + 1
        if self.cfg.max_staleness and nxt <= self.end_step and self.is_on_policy(nxt):
            self.ahead[micro] = (prompts, self._ask(prompts, nxt, micro))
        if not self.is_on_policy(self.step):
            return batch
        asked, ref = self.current.pop(micro, None) or (prompts, self._ask(prompts, self.step, micro))
        with clock.timing("sampling"):
            out = ray.get(ref)
        staleness = sum(1 for v in self.pushed if v > out["version"])
        if staleness > self.cfg.max_staleness:
            raise RuntimeError(f"rank {self.rank}: step {self.step} got samples of step {out['version']}'s weights, "
                               f"{staleness} pushes old (max_staleness {self.cfg.max_staleness}); pushed {self.pushed}")
        m = self._metrics
        m["sample_version"] = min(m.get("sample_version", out["version"]), out["version"])
        m["staleness"] = max(m.get("staleness", 0), staleness)
        m["generate_s"] = m.get("generate_s", 0.0) + out["generate_s"]
        if self.teacher is not None:  # the examples and their records, made by the teacher pool
            m["teacher_score_s"] = m.get("teacher_score_s", 0.0) + out["score_s"]
            examples = out
        else:
            examples = sample_examples(asked, out["responses"], self.spec.training.max_seq_len)
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in self.collate(examples).items()}

    def _ask(self, prompts: list[list[int]], step: int, micro: int) -> Any:
        sampling = SamplingConfig(temperature=self.cfg.sampling_temperature, top_p=self.cfg.top_p,
                                  max_new_tokens=self.max_new_tokens, n=self.cfg.samples_per_prompt,
                                  seed=sample_seed(self.spec.training.seed, step, self.rank, micro))
        samples = self.replica.sample.remote(prompts, sampling)
        if self.teacher is None:
            return samples
        # Ray hands the samples to the teacher replica when they are ready, not through this worker.
        return self.teacher.score.remote(prompts, samples, self.spec.training.max_seq_len)

    def metrics(self) -> dict[str, float]:
        """The step's on-policy metrics (module docstring)."""
        return dict(self._metrics)

    def after_step(self, engine: Any, step: int, clock: Any) -> None:
        """After optimizer step ``step``: push the weights when a sync is due (all ranks call)."""
        if step % self.cfg.sync_every_steps == 0 and step < self.end_step:
            with clock.timing("weight_sync"):
                self.push(engine, step)

    def push(self, engine: Any, version: int) -> None:
        """Every replica serves the engine's current weights as ``version`` when this returns on
        any rank (a collective: all ranks call it)."""
        push_student(engine, self.replicas, zero3=self.spec.training.zero_stage == 3, rank=self.rank, version=version)
        self.pushed.append(version)


def push_student(engine: Any, replicas: list[Any], *, zero3: bool, rank: int, version: int) -> None:
    """Push the trainers' weights (:func:`gathered_weights`) to every replica of the live pool
    as ``version``; when it returns on any rank, every replica serves them. A collective: all
    ranks call it (the ZeRO-3 gather, then a barrier)."""
    import torch.distributed as dist

    from kdray.pools.live import push_weights

    weights = gathered_weights(engine, zero3=zero3, rank=rank)
    if rank == 0:
        push_weights(replicas, weights, version)
    if dist.is_initialized():
        dist.barrier()


def gathered_weights(engine: Any, *, zero3: bool, rank: int) -> dict[str, Any] | None:
    """The student's whole weights, LoRA merged (:func:`kdray.train.setup.merged_state_dict`), on
    rank 0 (None elsewhere). Under ZeRO-3 every rank takes part in the gather."""
    import deepspeed

    from kdray.train.setup import merged_state_dict

    model = engine.module
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=zero3):
        return merged_state_dict(model) if rank == 0 else None
