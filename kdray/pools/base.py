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
from kdray.errors import DataError
from kdray.spec import GenerationSpec

#: Environment of vLLM actors on CPU-only replicas (``generation.num_gpus_per_replica: 0``):
#: the in-process engine (halves start-up; vLLM's default multiprocess engine is for GPUs), and
#: a small KV cache (GiB; vLLM's CPU default takes a share of host memory).
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}

#: The pool backends (``ModelSpec.backend``) and the roles a pool plays.
BACKENDS = ("vllm", "hf")
ROLES = ("generator", "scorer")

#: Teacher-signal modes a scorer records (``teacher_signal.mode`` other than ``online``).
SCORE_MODES = ("topk", "hidden")


def pool_env(pool: GenerationSpec, cache_root: str | None = None) -> dict[str, str]:
    """Environment for the pool's actors: a private vLLM compile cache everywhere, plus
    :data:`VLLM_CPU_ENV` when the replicas reserve no GPU. Values already set in the actor's
    environment win (:meth:`PoolCallable.__init__`)."""
    env = {} if pool.num_gpus_per_replica > 0 else dict(VLLM_CPU_ENV)
    env["VLLM_CACHE_ROOT"] = cache_root or os.path.join(
        os.environ.get("KDRAY_CACHE_DIR", os.path.expanduser("~/.cache/kdray")), "vllm"
    )
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
    backend imports its engine (vLLM reads it at import), and assembles output rows."""

    def __init__(self, env: dict[str, str]):
        for key, value in env.items():
            os.environ.setdefault(key, value)

    @staticmethod
    def sample_rows(batch: dict[str, np.ndarray], samples: list[list[tuple[str, list[int], str]]],
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
            int32 arrays), ``sample_index`` (0..n-1) and ``finish_reason`` (``stop``/``length``).
        """
        out: dict[str, list[Any]] = {k: [] for k in batch}
        out.update(response=[], response_token_ids=[], sample_index=[], finish_reason=[])
        if gold_ce is not None:
            out["gold_ce"], out["gold_rouge_l"] = [], []
        for row, row_samples in enumerate(samples):
            for j, (text, token_ids, finish) in enumerate(row_samples):
                for k in batch:
                    out[k].append(batch[k][row])
                out["response"].append(text)
                out["response_token_ids"].append(np.asarray(token_ids, dtype=np.int32))
                out["sample_index"].append(j)
                out["finish_reason"].append(str(finish))
                if gold_ce is not None:
                    out["gold_ce"].append(gold_ce[row])
                    out["gold_rouge_l"].append(rouge_l(text, str(batch["gold_response"][row])))
        result = {k: np.asarray(v) for k, v in out.items() if k != "response_token_ids"}
        result["response_token_ids"] = objects(out["response_token_ids"])
        return result


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
