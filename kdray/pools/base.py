"""What every pool shares: sampling settings, the actor environment, and the output rows.

A *pool* is a Ray Data callable class run by ``map_batches`` on an ``ActorPoolStrategy``
(:mod:`kdray.pools.run`): a generator answers prompts, a scorer records what the teacher says
about given responses. Each backend (:mod:`kdray.pools.vllm`, :mod:`kdray.pools.hf`) has one
of each, built on :class:`PoolCallable` so that all four set up their actor the same way and
the two generators return the same rows; :func:`kdray.pools.run.pool_class` picks one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdray.data.text_scores import rouge_l
from kdray.errors import ClusterError, DataError, first_line, node
from kdray.caches import local_cache_dir
from kdray.spec import GenerationSpec

#: Environment of vLLM actors on CPU-only replicas (``generation.num_gpus_per_replica: 0``):
#: the in-process engine (halves start-up; vLLM's default multiprocess engine is for GPUs), and
#: a small KV cache (GiB; vLLM's CPU default takes a share of host memory).
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}

#: The CPU share of a light per-row actor or task (tokenizing, encoding requests, converting
#: an engine's output, adding keys, writing a stage's dataset): light next to the pools. Every
#: task a stage runs while its pool holds its CPUs takes this share: one with Ray Data's default
#: (a whole CPU) waits while a pool leaves less than one CPU of the cluster free, and once the
#: pool's output fills its share of the object store the pool waits on that task forever.
LIGHT_NUM_CPUS = 0.25

#: The pool backends (``ModelSpec.backend``) and the roles a pool plays.
BACKENDS = ("vllm", "hf")
ROLES = ("generator", "scorer")

#: Teacher-signal modes a scorer records (``teacher_signal.mode`` other than ``online``).
SCORE_MODES = ("topk", "hidden")


def pool_env(pool: GenerationSpec, cache_root: str | None = None) -> dict[str, str]:
    """Environment for the pool's actors: a private vLLM compile cache everywhere (under the
    node-local :func:`~kdray.caches.local_cache_dir`, never the shareable KDRAY_CACHE_DIR), plus
    :data:`VLLM_CPU_ENV` when the replicas reserve no GPU. Values already set in the actor's
    environment win (:meth:`PoolCallable.__init__`)."""
    env = {} if pool.num_gpus_per_replica > 0 else dict(VLLM_CPU_ENV)
    env["VLLM_CACHE_ROOT"] = cache_root or os.path.join(local_cache_dir(), "vllm")  # node-local: compiled graphs
    return env


@dataclass(frozen=True)
class SamplingConfig:
    """What one generation pass asks for; built from the spec by :meth:`from_spec`."""

    temperature: float
    top_p: float
    max_new_tokens: int
    n: int
    seed: int
    #: Generate exactly ``max_new_tokens`` tokens, past EOS (benchmarks; not a spec field).
    ignore_eos: bool = False

    @classmethod
    def from_spec(cls, gen: GenerationSpec, **overrides: Any) -> "SamplingConfig":
        base = dict(
            temperature=gen.sampling_temperature,
            top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens,
            n=gen.n,
            seed=gen.seed,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "SamplingConfig":
        return cls(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, n=1, seed=0)


class PoolCallable:
    """Base of the pools' Ray Data callable classes: applies the actor environment before the
    backend imports its engine (vLLM reads it at import), assembles output rows, and reports
    each batch's output rows to the driver's progress hub (``progress``: an actor with a
    ``record`` method, or None). Subclasses implement :meth:`process`.

    Args:
        env: environment variables for the actor (values already set win).
        progress: the stage's progress hub (:func:`kdray.stages.context.progress_hub`).
        output_prefix: a prefix for a generator's output columns (``student_``: a DistiLLM-2
            round's student responses sit beside the teacher's in the same rows).
    """

    def __init__(self, env: dict[str, str], progress: Any = None, output_prefix: str = ""):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        self.progress, self.output_prefix = progress, output_prefix

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`process` ``batch`` and report its rows.

        Raises:
            ClusterError: the GPU ran out of memory (``torch.OutOfMemoryError``), naming the
                node, the batch's rows and the settings that take less.
        """
        import torch

        try:
            out = self.process(batch)
        except torch.OutOfMemoryError as exc:
            raise ClusterError(
                f"a {type(self).__name__} replica ran out of GPU memory on node {node()} "
                f"({first_line(exc, typed=False)}), on a batch of "
                f"{len(next(iter(batch.values()), []))} rows. Lower generation.batch_size (or max_new_tokens, or the "
                "model's max_model_len), give each replica more of a GPU (generation.num_gpus_per_replica), or "
                "run fewer replicas on one GPU; then run the job again (it resumes)") from None
        if self.progress is not None:
            self.progress.record.remote({"rows": len(next(iter(out.values()))) if out else 0})
        return out

    def sample_rows(self, batch: dict[str, np.ndarray], samples: list[list[tuple[str, list[int], str]]],
                    gold_ce: list[float] | None = None) -> dict[str, np.ndarray]:
        """A generator's output batch: one row per sample of each input row.

        Args:
            batch: the input batch (every column is carried over, ``_row`` and ``id`` included).
            samples: per input row, its samples as (text, token ids, finish reason).
            gold_ce: per input row, the model's mean token cross-entropy (nats) on the row's
                ``gold_response``; adds the columns ``gold_ce`` and ``gold_rouge_l`` (ROUGE-L of
                each sample against the row's ``gold_response``, POCL's other measurement: made
                here, in the actor, not in the driver).

        Returns:
            The input columns plus ``response`` (str), ``response_token_ids`` (object array of
            int32 arrays), ``sample_index`` (0..n-1) and ``finish_reason`` (``stop``/``length``),
            each name with :attr:`output_prefix` in front.
        """
        p = self.output_prefix
        made = [f"{p}response", f"{p}response_token_ids", f"{p}sample_index", f"{p}finish_reason"]
        out: dict[str, list[Any]] = {k: [] for k in batch if k not in made}
        out.update({name: [] for name in made})
        if gold_ce is not None:
            out["gold_ce"], out["gold_rouge_l"] = [], []
        carried = [k for k in batch if k not in made]
        for row, row_samples in enumerate(samples):
            for j, (text, token_ids, finish) in enumerate(row_samples):
                for k in carried:
                    out[k].append(batch[k][row])
                out[made[0]].append(text)
                out[made[1]].append(np.asarray(token_ids, dtype=np.int32))
                out[made[2]].append(j)
                out[made[3]].append(str(finish))
                if gold_ce is not None:
                    out["gold_ce"].append(gold_ce[row])
                    out["gold_rouge_l"].append(rouge_l(text, str(batch["gold_response"][row])))
        result = {k: (objects(v) if isinstance(batch.get(k), np.ndarray) and batch[k].dtype == object
                      else np.asarray(v)) for k, v in out.items() if k != made[1]}
        result[made[1]] = objects(out[made[1]])
        return result

    @staticmethod
    def example_pairs(batch: dict[str, np.ndarray]) -> list[tuple[list[int], list[int]]]:
        """A scorer's input: per row (prompt ids, response ids) of the compact training example
        (``input_ids``, ``prompt_len``: :class:`kdray.data.examples.TokenizeForTraining`)."""
        return [([int(t) for t in ids[:start]], [int(t) for t in ids[start:]])
                for ids, start in zip(batch["input_ids"], batch["prompt_len"])]

    def scored_rows(self, batch: dict[str, np.ndarray], records: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """A scorer's output batch: the input columns plus, per row, its record. With the
        scorer's ``signal_meta`` (a job's records layout, :mod:`kdray.data.records`) the record
        is encoded here, in the actor, into the stored bytes (``n_tokens`` and the layout's
        columns); without, the arrays as computed (``topk_ids`` / ``topk_logprobs`` /
        ``hidden``, float32)."""
        out = dict(batch)
        meta = getattr(self, "signal_meta", None)
        if meta is None:
            out.update({k: objects(v) for k, v in records.items()})
            return out
        from kdray.data.records import encode_signal

        n = len(next(iter(records.values())))
        encoded = [encode_signal({k: v[i] for k, v in records.items()}, meta) for i in range(n)]
        out["n_tokens"] = np.asarray([e["n_tokens"] for e in encoded], dtype=np.int32)
        for column in records:
            out[column] = objects([e[column] for e in encoded])
        return out


def check_lengths(lengths: list[int], max_model_len: int, model: str, what: str) -> None:
    """Every sequence must fit the model's context (``ModelSpec.max_model_len``): a longer one is
    the data's or the spec's doing, and a :class:`DataError` that says which limit to change."""
    longest = max(lengths, default=0)
    if longest > max_model_len:
        over = sum(1 for n in lengths if n > max_model_len)
        raise DataError(
            f"{over} {what}(s) in a batch for model {model!r} exceed its max_model_len {max_model_len} (the "
            f"longest has {longest} tokens); raise teacher/student.max_model_len, or lower "
            "data.max_prompt_tokens, generation.max_new_tokens or training.max_seq_len"
        )


def check_score_mode(mode: str) -> None:
    """Raise ``ValueError`` (a kdray bug: the spec admits only these) for an unknown mode."""
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")


def objects(items: list[Any]) -> np.ndarray:
    """A 1-d object array holding ``items`` (arrays of different lengths, one per row)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
