"""vLLM generation on Ray's batch LLM processor: the requests kdray hands it and the rows it
makes of the engine's output (no engine here; the slow tests in ``test_generation_hf.py`` and
the end-to-end jobs run the real one)."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.data.tokenize import PromptEncoding, encode_batch
from kdray.errors import DataError
from kdray.models import load_tokenizer
from kdray.pools.base import SamplingConfig
from kdray.pools.vllm import ANSWER, GOLD, IN, REQ, EncodeRequests, response_rows

PROMPTS = ["Q: add 1 2\nA:", "Q: reverse the letters: a b c\nA:"]
GOLDS = [" 3", " c b a"]


@pytest.fixture(scope="module")
def tok(toy_world):
    return load_tokenizer("toy:teacher", need_pad=False)


def batch(**extra):
    out = {"_row": np.arange(2), "id": np.asarray(["a", "b"], dtype=object), "prompt": np.asarray(PROMPTS, dtype=object)}
    out.update({k: np.asarray(v, dtype=object) for k, v in extra.items()})
    return out


def test_each_row_becomes_n_seeded_answer_requests_carrying_its_columns(tok):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=5, n=3, seed=11)
    encoding = PromptEncoding.resolve("never", tok)
    out = EncodeRequests("toy:teacher", max_model_len=64, sampling=sampling, encoding=encoding)(batch())
    assert list(out[IN + "id"]) == ["a"] * 3 + ["b"] * 3 and list(out[IN + "_row"]) == [0, 0, 0, 1, 1, 1]
    assert "prompt" not in out  # Ray's engine stage would take a "prompt" column as the text to run
    assert list(out[REQ + "kind"]) == [ANSWER] * 6 and list(out[REQ + "sample_index"]) == [0, 1, 2] * 2
    expected = encoding.token_ids(tok, PROMPTS)
    assert [t.tolist() for t in out["tokenized_prompt"]] == [expected[0]] * 3 + [expected[1]] * 3
    assert all(t.dtype == np.int32 for t in out["tokenized_prompt"])
    params = list(out["sampling_params"])
    assert [p["seed"] for p in params] == [11, 12, 13] * 2
    assert params[0] == dict(temperature=0.7, top_p=0.9, max_tokens=5, seed=11, ignore_eos=False, prompt_logprobs=None)


def test_score_gold_adds_one_gold_request_per_row_and_long_prompts_are_refused(tok):
    encoding = PromptEncoding.resolve("never", tok)
    make = EncodeRequests("toy:teacher", max_model_len=64, sampling=SamplingConfig.greedy(4), score_gold=True,
                          encoding=encoding)
    out = make(batch(gold_response=GOLDS, gold_finish_reason=["stop", "length"]))
    assert list(out[REQ + "kind"]) == [ANSWER, ANSWER, GOLD, GOLD]
    pairs = encode_batch(tok, PROMPTS, GOLDS, ["stop", "length"], encoding)
    assert [t.tolist() for t in out["tokenized_prompt"][2:]] == [p + q for p, q in pairs]
    assert list(out[REQ + "gold_start"][2:]) == [len(p) for p, _ in pairs]
    assert out["sampling_params"][2]["prompt_logprobs"] == 0 and out["sampling_params"][2]["max_tokens"] == 1
    # no field mixes ints and nulls (Arrow → numpy would make them floats, which vLLM refuses)
    assert [p["prompt_logprobs"] for p in out["sampling_params"]] == [0, 0, 0, 0]
    import pyarrow as pa

    struct = pa.array(list(out["sampling_params"]))
    assert struct.field("prompt_logprobs").null_count == 0 and pa.types.is_integer(struct.type.field("prompt_logprobs").type)
    short = EncodeRequests("toy:teacher", max_model_len=4, sampling=SamplingConfig.greedy(4), encoding=encoding)
    with pytest.raises(DataError, match="max_model_len 4"):
        short(batch())


def engine_output(rows):
    """What Ray's engine stage hands on: the request's kdray columns plus its own."""
    out = {IN + "id": np.asarray([r["id"] for r in rows], dtype=object),
           IN + "gold_response": np.asarray([r.get("gold", "") for r in rows], dtype=object),
           REQ + "kind": np.asarray([r["kind"] for r in rows]),
           REQ + "sample_index": np.asarray([r.get("j", -1) for r in rows]),
           REQ + "gold_start": np.asarray([r.get("start", 0) for r in rows]),
           "generated_tokens": np.asarray([r.get("tokens", []) for r in rows] + [None], dtype=object)[:-1],
           "generated_text": np.asarray([r.get("text", "") for r in rows], dtype=object),
           "prompt_token_ids": np.asarray([r.get("ids", []) for r in rows] + [None], dtype=object)[:-1],
           "prompt_logprobs": np.asarray([r.get("plp") for r in rows] + [None], dtype=object)[:-1],
           "time_taken_llm": np.zeros(len(rows)), "batch_uuid": np.asarray(["u"] * len(rows), dtype=object)}
    return out


def test_response_rows_give_the_finish_reason_and_the_gold_scores():
    sampling = SamplingConfig.greedy(3)
    plp = [None, {5: {"logprob": -0.5, "rank": 1}}, {"7": {"logprob": -1.5, "rank": 2}}]  # int or str keys
    rows = [
        dict(id="a", kind=ANSWER, j=0, tokens=[4, 2], text="x", gold="x y"),       # short: stopped
        dict(id="b", kind=ANSWER, j=0, tokens=[4, 5, 2], text="z", gold="z"),     # full, ends in EOS: stopped
        dict(id="c", kind=ANSWER, j=1, tokens=[4, 5, 6], text="q r s", gold="t"),  # full, no EOS: cut
        dict(id="a", kind=GOLD, ids=[9, 5, 7], start=1, plp=plp, gold="x y"),
    ]
    calls = []

    class Hub:
        class record:
            @staticmethod
            def remote(update):
                calls.append(update)

    out = response_rows(engine_output(rows), stop_ids=[2], sampling=sampling, score_gold=True,
                        output_prefix="student_", progress=Hub())
    assert set(out) == {"id", "gold_response", "student_response", "student_response_token_ids",
                        "student_sample_index", "student_finish_reason", "gold_rouge_l", "gold_ce"}
    assert list(out["student_finish_reason"]) == ["stop", "stop", "length", ""]
    assert [t.tolist() for t in out["student_response_token_ids"]] == [[4, 2], [4, 5, 2], [4, 5, 6], []]
    assert out["student_response_token_ids"][0].dtype == np.int32
    assert list(out["student_sample_index"]) == [0, 0, 1, -1]
    assert out["gold_ce"][3] == pytest.approx(1.0) and np.isnan(out["gold_ce"][:3]).all()
    assert out["gold_rouge_l"][0] == pytest.approx(2 / 3) and out["gold_rouge_l"][1] == 1.0
    assert np.isnan(out["gold_rouge_l"][3])
    assert calls == [{"rows": 3}]  # answers only
    ignore = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=3, n=1, seed=0, ignore_eos=True)
    plain = response_rows(engine_output(rows[1:2]), stop_ids=[2], sampling=ignore, score_gold=False,
                          output_prefix="", progress=None)
    assert list(plain["finish_reason"]) == ["length"] and "gold_ce" not in plain  # past EOS on purpose


def test_difficulty_joins_an_answer_and_a_gold_score_per_key():
    from kdray.stages.difficulty import per_key

    nan = float("nan")
    keys, rouge, ce = per_key(["b#0", "a#0", "a#0", "b#0"], [0.5, nan, 0.25, nan], [nan, 1.5, nan, 0.75],
                              where="curriculum/difficulty")
    assert keys.tolist() == ["a#0", "b#0"] and rouge.tolist() == [0.25, 0.5] and ce.tolist() == [1.5, 0.75]
    same = per_key(["a#0", "b#0"], [0.25, 0.5], [1.5, 0.75], where="x")  # hf: both in one row
    assert [v.tolist() for v in same] == [keys.tolist(), rouge.tolist(), ce.tolist()]
    with pytest.raises(DataError, match=r"curriculum/difficulty has no gold_ce for 1 training rows \(first: b#0\).*--restart"):
        per_key(["a#0", "b#0"], [0.25, 0.5], [1.5, nan], where="curriculum/difficulty")


def test_a_cpu_engine_that_could_not_run_the_model_is_refused_before_its_pool_starts(tmp_path, toy_world):
    """vLLM's CPU attention runs some head sizes only; with another, its engine starts and fails
    at its first request, which Ray's batch processor answers by restarting it without end (a
    job with a head_dim-16 teacher hung in generate)."""
    from transformers import LlamaConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from kdray.errors import ModelError
    from kdray.pools.run import pool_class_kwargs
    from kdray.pools.vllm import CPU_HEAD_SIZES, check_engine_support, generation_processor
    from kdray.spec import GenerationSpec, ModelSpec

    assert list(CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()  # the installed vLLM's
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=64).save_pretrained(tmp_path / "hd16")
    odd = ModelSpec(model=str(tmp_path / "hd16"), dtype="float32", max_model_len=64)
    cpu = GenerationSpec(replicas=1, num_cpus_per_replica=0.5)
    for start in (lambda: generation_processor(odd, cpu, seed=0), lambda: pool_class_kwargs(odd, cpu)):
        with pytest.raises(ModelError) as info:
            start()
        msg = str(info.value)
        assert "attention heads of 16 dimensions" in msg and "32, 64, 80" in msg and "backend: hf" in msg, msg
    check_engine_support(odd.model_copy(update={"backend": "hf"}), cpu)  # transformers runs any
    check_engine_support(odd, cpu.model_copy(update={"num_gpus_per_replica": 1.0}))  # another backend on GPUs
    check_engine_support(ModelSpec(model="toy:teacher", dtype="float32", max_model_len=64), cpu)  # 32

    # A max_model_len over the model's positions: refused on any replica (vLLM refuses it), unless
    # RoPE scaling stretches them (vLLM's own derivation then decides).
    LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64,
                max_position_embeddings=64).save_pretrained(tmp_path / "short")
    short = ModelSpec(model=str(tmp_path / "short"), dtype="float32", max_model_len=128)
    for pool in (cpu, cpu.model_copy(update={"num_gpus_per_replica": 1.0})):
        with pytest.raises(ModelError, match=r"max_model_len 128 is over the 64 positions of model .*set max_model_len "
                                             r"to 64 or less"):
            check_engine_support(short, pool)
    check_engine_support(short.model_copy(update={"max_model_len": 64}), cpu)
    LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64, max_position_embeddings=64,
                rope_scaling={"rope_type": "linear", "factor": 4.0}).save_pretrained(tmp_path / "stretched")
    check_engine_support(short.model_copy(update={"model": str(tmp_path / "stretched")}), cpu)
