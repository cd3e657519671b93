"""The HF-transformers backend of the generation and scoring pools (``backend: hf``).

For hosts without vLLM. Two Ray Data callable classes whose rows are those of their vLLM
counterparts, so :func:`kdray.pools.run.generate_dataset` and :func:`kdray.pools.run.score_dataset`
run either:

* :class:`HFGenerator` (≙ :func:`kdray.pools.vllm.generate_requests`): batched, left-padded
  ``model.generate`` on the prompt ids of the job's :class:`kdray.data.tokenize.PromptEncoding`; rows out carry
  ``response``, ``response_token_ids``, ``sample_index``, ``finish_reason`` (``'stop'`` or
  ``'length'``, as vLLM says) and, with ``score_gold``, ``gold_ce``.
* :class:`HFScorer` (≙ :class:`kdray.pools.vllm.VLLMScorer`): one forward pass over prompt +
  response ids; per response token the top-k log-probs or the final hidden state.

Both share :class:`_HFModel`: loading (one device per replica: a GPU when one is visible,
else the CPU) and right-padded forward passes that return the model's view of each response
position. The sampling semantics follow vLLM's, not ``transformers``' defaults: the model's own
``generation_config`` (top-k 50, repetition penalties, ...) is replaced by a neutral one,
temperature 0 is greedy, ``top_k`` is off, and generation stops at the tokenizer's EOS or any
EOS id of the model's generation config; the stop token is kept in ``response_token_ids`` and
dropped from the decoded text (``skip_special_tokens``), as vLLM does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from kdray.data.tokenize import PromptEncoding, encode_batch
from kdray.errors import KdrayError
from kdray.models import load_causal_lm, load_tokenizer, stop_token_ids
from kdray.pools.base import PoolCallable, SamplingConfig, check_lengths, check_score_mode
from kdray.pools.left_padded import generate_left_padded

#: Tokens (batch x padded length) per forward pass when scoring; bounds the [tokens, vocab]
#: logits a pass materialises (8192 x 128k float32 = 4 GiB).
TOKENS_PER_FORWARD = 8192


class _HFModel:
    """A frozen causal LM and its tokenizer on this replica's device, with the forward passes
    both backends' classes need."""

    def __init__(self, model: str, *, dtype: str, max_model_len: int, tensor_parallel_size: int):
        if tensor_parallel_size != 1:
            raise KdrayError(
                f"the hf backend runs one device per replica, but generation.tensor_parallel_size is "
                f"{tensor_parallel_size}; set it to 1 (scale out with generation.replicas) or use backend: vllm"
            )
        import torch
        from transformers import GenerationConfig

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model_ref = model
        self.tokenizer = load_tokenizer(model, need_pad=False)
        self.model = load_causal_lm(model, dtype, trainable=False).to(self.device)
        self.max_model_len = max_model_len
        tok = self.tokenizer
        # Padding is masked out, so any id will do when the tokenizer has no pad token.
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.stop_ids = stop_token_ids(tok, model)
        # transformers fills every unset generation field from the model's own config; a neutral
        # one keeps hub defaults (top_k=50, repetition_penalty, ...) out, as vLLM ignores them.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)

    def check_lengths(self, lengths: list[int], what: str) -> None:
        check_lengths(lengths, self.max_model_len, self.model_ref, what)

    def _micro_batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Consecutive index groups whose padded size stays within :data:`TOKENS_PER_FORWARD`."""
        group: list[int] = []
        width = 0
        for i, n in enumerate(lengths):
            if group and (len(group) + 1) * max(width, n) > TOKENS_PER_FORWARD:
                yield group
                group, width = [], 0
            group.append(i)
            width = max(width, n)
        if group:
            yield group

    def response_states(self, pairs: list[tuple[list[int], list[int]]], what: str) -> Iterator[Any]:
        """Per (prompt ids, response ids) pair, the model at positions ``len(prompt) + j - 1``
        (the ones predicting response token ``j``), float32 on the CPU: ``what="logprobs"``
        gives log-softmax of the raw logits ``[R, V]``, ``what="hidden"`` the final hidden
        state after the final norm ``[R, H]`` (what the lm_head multiplies)."""
        torch = self.torch
        seqs = [list(p) + list(r) for p, r in pairs]
        self.check_lengths([len(s) for s in seqs], "prompt + response")
        for group in self._micro_batches([len(s) for s in seqs]):
            width = max(len(seqs[i]) for i in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                if what == "hidden":
                    states = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                else:
                    states = self.model(input_ids=ids, attention_mask=mask).logits
                for row, i in enumerate(group):
                    start = len(pairs[i][0])
                    part = states[row, start - 1: start + len(pairs[i][1]) - 1].float()
                    if what != "hidden":
                        part = torch.log_softmax(part, dim=-1)
                    yield part.cpu()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 seed: int) -> list[list[tuple[list[int], str]]]:
        """``sampling.n`` (response ids, finish reason) per prompt
        (:func:`kdray.pools.left_padded.generate_left_padded`, seeded with ``seed``)."""
        self.check_lengths([len(p) for p in prompts], "prompt")
        self.torch.manual_seed(seed)
        return generate_left_padded(
            self.model, prompts, pad_id=self.pad_id, stop_ids=self.stop_ids, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, n=sampling.n, max_model_len=self.max_model_len,
            ignore_eos=sampling.ignore_eos, device=self.device)


class HFGenerator(PoolCallable):
    """Ray Data callable class holding one ``transformers`` model: the ``backend: hf`` twin of
    vLLM's generation (:func:`kdray.pools.vllm.generate_requests`), with the same output rows,
    except that ``gold_ce`` sits in the answer's row (``enforce_eager`` has no meaning here and
    is accepted as :func:`kdray.pools.run.map_pool` passes it).

    Responses are seeded per batch (``sampling.seed`` and the batch's first ``_row``), so the
    same rows in the same batches give the same responses. Prompts are encoded with ``encoding``,
    the job's :class:`~kdray.data.tokenize.PromptEncoding` (None: this model's own chat
    template, for direct use outside a job).
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
        self.hf = _HFModel(model, dtype=dtype, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size)
        self.sampling = sampling
        self.score_gold = score_gold
        self.encoding = encoding if encoding is not None else PromptEncoding.resolve("auto", self.hf.tokenizer,
                                                                                      f"{model}'s")

    def _gold_ce(self, batch: dict[str, np.ndarray]) -> list[float]:
        pairs = encode_batch(self.hf.tokenizer, list(batch["prompt"]), list(batch["gold_response"]),
                             list(batch["gold_finish_reason"]), self.encoding)
        torch = self.hf.torch
        ce = []
        for (_, response), logprobs in zip(pairs, self.hf.response_states(pairs, "logprobs")):
            target = torch.tensor(response, dtype=torch.long).unsqueeze(1)
            ce.append(-float(logprobs.gather(1, target).double().mean()))
        return ce

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self.hf.tokenizer
        ids = self.encoding.token_ids(tok, [str(p) for p in batch["prompt"]])
        rows = [int(r) for r in batch["_row"]] if "_row" in batch else [0]
        generated = self.hf.generate(ids, self.sampling, seed=self.sampling.seed * 1_000_003 + rows[0])
        ce = self._gold_ce(batch) if self.score_gold else []
        samples = [[(tok.decode(token_ids, skip_special_tokens=True), token_ids, finish)
                    for token_ids, finish in row_samples] for row_samples in generated]
        return self.sample_rows(batch, samples, ce if self.score_gold else None)


class HFScorer(PoolCallable):
    """Ray Data callable class: the ``backend: hf`` twin of :class:`kdray.pools.vllm.VLLMScorer`.

    ``__call__`` takes a numpy batch of compact examples (``input_ids``, ``prompt_len``) and
    returns it with, per row of ``R`` response tokens, ``topk_ids`` (int32 ``[R, k]``) and
    ``topk_logprobs`` (float32 ``[R, k]``, descending; log-softmax of the raw logits), or
    ``hidden`` (float32 ``[R, H]``, after the final norm); stored bytes with ``signal_meta``
    (:meth:`~kdray.pools.base.PoolCallable.scored_rows`).
    Row ``j`` is the teacher at position ``len(prompt) + j - 1`` of prompt + response.
    """

    def __init__(self, model: str, *, mode: str, k: int, dtype: str, max_model_len: int,
                 tensor_parallel_size: int, enforce_eager: bool, env: dict[str, str],
                 signal_meta: dict[str, Any] | None = None, progress: Any = None):
        check_score_mode(mode)
        super().__init__(env, progress)
        self.signal_meta = signal_meta
        self.mode, self.k = mode, k
        self.hf = _HFModel(model, dtype=dtype, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size)

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = self.example_pairs(batch)
        if self.mode == "hidden":
            return self.scored_rows(batch, {"hidden": [h.numpy().astype(np.float32, copy=False)
                                                       for h in self.hf.response_states(pairs, "hidden")]})
        ids, lps = [], []
        for logprobs in self.hf.response_states(pairs, "logprobs"):
            k = min(self.k, logprobs.shape[-1])
            top = logprobs.topk(k, dim=-1, sorted=True)
            ids.append(top.indices.numpy().astype(np.int32))
            lps.append(top.values.numpy().astype(np.float32))
        return self.scored_rows(batch, {"topk_ids": ids, "topk_logprobs": lps})
