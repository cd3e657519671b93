"""The vLLM backend of the pools (``backend: vllm``, the default).

:class:`VLLMGenerator` answers prompts (teacher responses, student samples, held-out answers,
the judge) and can score given responses in the same ``generate`` call (POCL's difficulty);
:class:`VLLMScorer` records the teacher's signal on the training responses (``teacher_signal``
``topk`` or ``hidden``). Both take token ids from :mod:`kdray.data.tokenize`, never raw text:
the generator encodes prompts with the job's :class:`~kdray.data.tokenize.PromptEncoding`, the
scorer receives the trainer's ids, so a prompt means the same tokens in every pool and in the
trainer.

Scoring, for every response token ``j``, reads the teacher at the position that predicts it
(position ``len(prompt) + j - 1``):

* ``topk``: the k most likely token ids and their log-probs (log-softmax of the raw logits,
  temperature 1), from vLLM's ``prompt_logprobs`` with ``max_logprobs`` raised to k;
* ``hidden``: the teacher's final hidden state (after the final norm: what its lm_head
  multiplies), from vLLM's pooling runner with per-token output and no activation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdray.data.tokenize import PromptEncoding, encode_batch
from kdray.errors import ModelError, first_line, node
from kdray.models import resolve_model
from kdray.pools.base import PoolCallable, SamplingConfig, check_lengths, check_score_mode


def start_engine(model: str, **kwargs: Any) -> Any:
    """A vLLM engine for ``model``, or a :class:`ModelError` naming the model, the node and what
    vLLM said: its start fails on the model's files, its architecture, or the memory it needs."""
    from vllm import LLM

    try:
        return LLM(model=resolve_model(model), **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, NotImplementedError) as exc:
        raise ModelError(
            f"vLLM could not start model {model!r} on node {node()} ({first_line(exc)}); check that vLLM supports "
            "its architecture, that its max_model_len fits the model and this node's GPU memory (lower it, or "
            "generation.batch_size), or use backend: hf"
        ) from None


class VLLMGenerator(PoolCallable):
    """Ray Data callable class holding one vLLM engine.

    Constructed once per actor; ``__call__`` receives a numpy batch with ``_row`` and
    ``prompt`` and returns one row per generated sample. With ``score_gold=True`` the batch
    also carries ``gold_response`` / ``gold_finish_reason``, and each output row gets
    ``gold_ce``: the model's mean token cross-entropy (nats) on that response, scored as
    vLLM prompt log-probs of prompt + response ids, tokenized exactly as the trainer does
    (:func:`kdray.data.tokenize.encode_batch`). Generation and scoring share one ``generate`` call.

    Prompts are encoded with ``encoding``, the job's :class:`~kdray.data.tokenize.PromptEncoding`
    (None: this model's own chat template, for direct use outside a job).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str,
        max_model_len: int,
        tensor_parallel_size: int,
        enforce_eager: bool,
        sampling: SamplingConfig,
        env: dict[str, str],
        score_gold: bool = False,
        encoding: PromptEncoding | None = None,
        progress: Any = None,
        output_prefix: str = "",
    ):
        super().__init__(env, progress, output_prefix)
        from vllm import SamplingParams

        self.model, self.max_model_len = model, max_model_len
        self.llm = start_engine(
            model,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=sampling.seed,
        )
        self.params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
        )
        self.score_gold = score_gold
        self.encoding = encoding if encoding is not None else PromptEncoding.resolve("auto", self.llm.get_tokenizer(),
                                                                                      f"{model}'s")
        # One token out, and the log-prob of every prompt token (the realized one is always
        # included, whatever the top-k): what scoring a given response needs.
        self.score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def _score_requests(self, batch: dict[str, np.ndarray]) -> tuple[list[Any], list[int]]:
        from vllm.inputs import TokensPrompt

        pairs = encode_batch(self.llm.get_tokenizer(), list(batch["prompt"]), list(batch["gold_response"]),
                             list(batch["gold_finish_reason"]), self.encoding)
        return [TokensPrompt(prompt_token_ids=p + r) for p, r in pairs], [len(p) for p, _ in pairs]

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        ids = self.encoding.token_ids(self.llm.get_tokenizer(), [str(p) for p in batch["prompt"]])
        check_lengths([len(p) for p in ids], self.max_model_len, self.model, "prompt")
        prompts: list[Any] = [TokensPrompt(prompt_token_ids=p) for p in ids]
        params = [self.params] * len(prompts)
        starts: list[int] = []
        if self.score_gold:
            scoring, starts = self._score_requests(batch)
            check_lengths([len(q["prompt_token_ids"]) for q in scoring], self.max_model_len, self.model,
                          "prompt + response")
            prompts += scoring
            params += [self.score_params] * len(scoring)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        n = len(batch["prompt"])
        ce = [_mean_nll(req.prompt_logprobs, req.prompt_token_ids, start)
              for req, start in zip(outputs[n:], starts)]
        samples = [[(c.text, list(c.token_ids), str(c.finish_reason)) for c in request.outputs]
                   for request in outputs[:n]]
        return self.sample_rows(batch, samples, ce if self.score_gold else None)


def _mean_nll(prompt_logprobs: list[Any], token_ids: list[int], start: int) -> float:
    """Mean −log p of ``token_ids[start:]`` from vLLM's per-position prompt log-probs."""
    values = [prompt_logprobs[i][token_ids[i]].logprob for i in range(start, len(token_ids))]
    return -float(np.mean(values))


class VLLMScorer(PoolCallable):
    """Ray Data callable class holding one vLLM engine that scores prompt + response ids.

    ``__call__`` takes a numpy batch of compact examples (``input_ids``, ``prompt_len``) and
    returns it with, per row of ``R`` response tokens, ``topk_ids`` (int32 ``[R, k]``) and
    ``topk_logprobs`` (float32 ``[R, k]``, descending), or ``hidden`` (float32 ``[R, H]``);
    stored bytes with ``signal_meta`` (:meth:`~kdray.pools.base.PoolCallable.scored_rows`).
    """

    def __init__(self, model: str, *, mode: str, k: int, dtype: str, max_model_len: int,
                 tensor_parallel_size: int, enforce_eager: bool, env: dict[str, str],
                 signal_meta: dict[str, Any] | None = None, progress: Any = None):
        check_score_mode(mode)
        super().__init__(env, progress)
        self.signal_meta = signal_meta
        from vllm import SamplingParams

        self.mode, self.k, self.model, self.max_model_len = mode, k, model, max_model_len
        common = dict(dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=enforce_eager)
        if mode == "topk":
            self.llm = start_engine(model, **common, max_logprobs=k)
            # One token out (vLLM must generate one); the prompt's top-k log-probs are the point.
            self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        else:
            from vllm.config import PoolerConfig

            self.llm = start_engine(model, **common, runner="pooling", pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False))

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        pairs = self.example_pairs(batch)
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        check_lengths([len(p) + len(r) for p, r in pairs], self.max_model_len, self.model, "prompt + response")
        requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in pairs]
        if self.mode == "topk":
            results = self.llm.generate(requests, self.params, use_tqdm=False)
            tops = [_topk_rows(res.prompt_logprobs, len(p), len(r), self.k)
                    for res, p, r in zip(results, prompts, responses)]
            return self.scored_rows(batch, {"topk_ids": [ids for ids, _ in tops],
                                            "topk_logprobs": [lps for _, lps in tops]})
        results = self.llm.encode(requests, pooling_task="token_embed", use_tqdm=False)
        hidden = []
        for res, p, r in zip(results, prompts, responses):
            states = res.outputs.data.float().cpu().numpy()  # [len(p) + len(r), H]
            hidden.append(np.ascontiguousarray(states[len(p) - 1: len(p) + len(r) - 1], dtype=np.float32))
        return self.scored_rows(batch, {"hidden": hidden})


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
