"""Teacher scoring: the teacher's per-token signal on the training responses, computed once.

In ``teacher_signal.mode: topk`` or ``hidden`` the teacher does not run inside the training
workers. Instead, after the teacher pool has generated the training responses, a scoring
pass over prompt + response ids records, for every response token ``j``, what the teacher
says at the position that predicts it (position ``len(prompt) + j - 1``):

* ``topk``: the k most likely token ids and their log-probs (log-softmax of the raw logits,
  temperature 1), from vLLM's ``prompt_logprobs`` with ``max_logprobs`` raised to k;
* ``hidden``: the teacher's final hidden state (after the final norm: what its lm_head
  multiplies), from vLLM's pooling runner with per-token output and no activation.

:class:`VLLMScorer` is a Ray Data callable class like :class:`kdray.generation.VLLMGenerator`
(same pool sizing); :func:`score_teacher` runs it and returns one record per training row.
The ids are those of :func:`kdray.records.encode_batch`, so the records line up with the
labels the trainer builds from the same rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from kdray.spec import JobSpec

SCORE_MODES = ("topk", "hidden")


class VLLMScorer:
    """Ray Data callable class holding one vLLM engine that scores prompt + response ids.

    ``__call__`` takes a numpy batch with ``_row``, ``prompt_ids`` and ``response_ids``
    (object arrays of int arrays) and returns it with, per row of ``R`` response tokens,
    ``topk_ids`` (int32 ``[R, k]``) and ``topk_logprobs`` (float32 ``[R, k]``, descending),
    or ``hidden`` (float32 ``[R, H]``).
    """

    def __init__(self, model: str, *, mode: str, k: int, dtype: str, max_model_len: int,
                 tensor_parallel_size: int, enforce_eager: bool, env: dict[str, str]):
        if mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
        for key, value in env.items():
            os.environ.setdefault(key, value)
        from vllm import LLM, SamplingParams

        from kdray.models import resolve_model

        self.mode, self.k = mode, k
        common = dict(model=resolve_model(model), dtype=dtype, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager)
        if mode == "topk":
            self.llm = LLM(**common, max_logprobs=k)
            # One token out (vLLM must generate one); the prompt's top-k log-probs are the point.
            self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        else:
            from vllm.config import PoolerConfig

            self.llm = LLM(**common, runner="pooling", pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [list(map(int, p)) for p in batch["prompt_ids"]]
        responses = [list(map(int, r)) for r in batch["response_ids"]]
        requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)]
        out = dict(batch)
        if self.mode == "topk":
            results = self.llm.generate(requests, self.params, use_tqdm=False)
            pairs = [_topk_rows(res.prompt_logprobs, len(p), len(r), self.k)
                     for res, p, r in zip(results, prompts, responses)]
            out["topk_ids"] = _objects([ids for ids, _ in pairs])
            out["topk_logprobs"] = _objects([lps for _, lps in pairs])
        else:
            results = self.llm.encode(requests, pooling_task="token_embed", use_tqdm=False)
            hidden = []
            for res, p, r in zip(results, prompts, responses):
                states = res.outputs.data.float().cpu().numpy()  # [len(p) + len(r), H]
                hidden.append(np.ascontiguousarray(states[len(p) - 1: len(p) + len(r) - 1], dtype=np.float32))
            out["hidden"] = _objects(hidden)
        return out


def _objects(items: list[np.ndarray]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _topk_rows(prompt_logprobs: list[Any], n_prompt: int, n_response: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (ids, log-probs) at each response position from vLLM's prompt log-probs.

    vLLM adds the realised token to each position's dict when it is not in the top k; its
    ``rank`` says so, and it is dropped here (a record holds exactly the k best)."""
    ids = np.zeros((n_response, k), dtype=np.int32)
    lps = np.full((n_response, k), -np.inf, dtype=np.float32)
    for j in range(n_response):
        entries = prompt_logprobs[n_prompt + j]
        best = sorted(((lp.logprob, tok) for tok, lp in entries.items() if lp.rank is None or lp.rank <= k),
                      reverse=True)[:k]
        for slot, (value, tok) in enumerate(best):
            ids[j, slot], lps[j, slot] = tok, value
    return ids, lps


def score_teacher(rows: list[dict[str, Any]], spec: JobSpec, *,
                  on_rows: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Score every training row's response with the teacher pool, in the order of ``rows``.

    Returns per row ``{"n_tokens", "topk_ids", "topk_logprobs"}`` or ``{"n_tokens",
    "hidden"}`` (numpy arrays, one entry per response token as the trainer encodes it)."""
    import ray.data

    from kdray.generation import pool_class, vllm_env
    from kdray.models import load_tokenizer
    from kdray.records import encode_batch, uses_chat_template

    signal, teacher, pool = spec.teacher_signal, spec.teacher, spec.generation
    tok = load_tokenizer(spec.student.model)
    pairs = encode_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                         [r.get("finish_reason", "stop") for r in rows],
                         uses_chat_template(tok, spec.data.chat_template))
    limit = spec.training.max_seq_len
    items = []
    for i, (p, r) in enumerate(pairs):
        r = r[: max(0, limit - len(p))]  # the trainer cuts sequences at max_seq_len too
        items.append({"_row": i, "prompt_ids": np.asarray(p, dtype=np.int32),
                      "response_ids": np.asarray(r, dtype=np.int32)})
    ds = ray.data.from_items(items).map_batches(
        pool_class(teacher.backend, "scorer"),
        fn_constructor_kwargs=dict(model=teacher.model, mode=signal.mode, k=signal.k, dtype=teacher.dtype,
                                   max_model_len=teacher.max_model_len,
                                   tensor_parallel_size=pool.tensor_parallel_size,
                                   enforce_eager=pool.enforce_eager, env=vllm_env()),
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas),
        num_cpus=pool.num_cpus_per_replica,
        num_gpus=pool.num_gpus_per_replica,
    )
    keys = ("topk_ids", "topk_logprobs") if signal.mode == "topk" else ("hidden",)
    results: list[dict[str, Any] | None] = [None] * len(items)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["_row"])):
            record = {key: np.asarray(batch[key][i]) for key in keys}
            record["n_tokens"] = len(batch["response_ids"][i])
            results[int(batch["_row"][i])] = record
        if on_rows:
            on_rows(len(batch["_row"]))
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"the teacher pool returned no score for {len(missing)} rows (first: {missing[:5]})")
    return results  # type: ignore[return-value]
