"""The HF-transformers backend (``backend: hf``) on the real toy models, and the vLLM pool's
samples per prompt.

The vLLM side (Ray's batch LLM processor, through :func:`kdray.pools.generate`) runs in a
subprocess (vLLM binds threads process-wide and wants a ``__main__`` guard). HF's greedy
answers and gold cross-entropies equal the vLLM pool's row by row in the repro harness's run
(tests/test_repro.py: its difficulty pass is a vLLM pool that answers and scores the training
prompts), which spares CI a vLLM engine here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.errors import KdrayError, SpecError
from kdray.pools.base import SamplingConfig, pool_env
from kdray.spec import GenerationSpec
from kdray.pools.hf import HFGenerator, HFScorer

REPO = Path(__file__).resolve().parents[1]
N_PROMPTS = 24

VLLM_SAMPLES = """
import json, sys, tempfile
import ray
from kdray.pools.base import SamplingConfig
from kdray.pools.run import generate
from kdray.ray_setup import job_env
from kdray.spec import GenerationSpec, ModelSpec

if __name__ == "__main__":
    rows = json.loads(open(sys.argv[1]).read())
    ray.init(num_cpus=3, _temp_dir=tempfile.mkdtemp(prefix="kdray-ref-"), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": job_env()})
    model = ModelSpec(model="toy:teacher", dtype="float32", max_model_len=128)
    pool = GenerationSpec(replicas=1, batch_size=8, num_cpus_per_replica=0.5, enforce_eager=True)
    sampled = generate(rows[:4], model, pool, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=2, n=3,
                                                             seed=5))
    ray.shutdown()
    json.dump({"sampled": sampled}, open(sys.argv[2], "w"))
"""


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {
        "_row": np.arange(len(rows)),
        "id": np.asarray([r["id"] for r in rows]),
        "prompt": np.asarray([r["prompt"] for r in rows]),
        "gold_response": np.asarray([r["response"] for r in rows]),
        "gold_finish_reason": np.asarray(["stop"] * len(rows)),
    }


def _generator(model: str = "toy:teacher", sampling: SamplingConfig | None = None, **kw) -> HFGenerator:
    kw.setdefault("tensor_parallel_size", 1)
    return HFGenerator(model, dtype="float32", max_model_len=128, enforce_eager=True,
                       sampling=sampling or SamplingConfig.greedy(12), env=pool_env(GenerationSpec()), **kw)


@pytest.fixture(scope="module")
def heldout(toy_world) -> list[dict]:
    rows = toy_world.rows("heldout")
    return rows[:: max(1, len(rows) // N_PROMPTS)][:N_PROMPTS]  # every task family


@pytest.fixture(scope="module")
def vllm_samples(heldout, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm_ref")
    rows = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"], "finish_reason": "stop"}
            for r in heldout]
    (tmp / "batch.json").write_text(json.dumps(rows))
    res = subprocess.run([sys.executable, "-c", VLLM_SAMPLES, str(tmp / "batch.json"), str(tmp / "out.json")],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def hf_greedy(heldout) -> dict:
    return _generator(score_gold=True)(_batch(heldout))


def test_hf_greedy_answers_solve_most_prompts(hf_greedy, heldout):
    """The teacher solves most of these; a wrong backend (ids, positions, stopping) would not."""
    hits = sum(r.strip() == row["response"].strip() for r, row in zip(hf_greedy["response"], heldout))
    assert hits >= 0.7 * len(heldout)
    assert "stop" in list(hf_greedy["finish_reason"])


@pytest.mark.slow  # builds a vLLM engine in a subprocess (30 s to over a minute on 2 busy cores)
def test_vllm_samples_per_prompt_are_requests_of_their_own(vllm_samples, heldout):
    """n samples per prompt on Ray's processor: n rows per prompt in order, each seeded apart,
    with the finish reason the engine stage does not return (2 tokens and no EOS: cut)."""
    sampled = vllm_samples["sampled"]
    assert [(r["id"], r["sample_index"]) for r in sampled] == [(row["id"], j) for row in heldout[:4] for j in range(3)]
    for r in sampled:
        ids = r["response_token_ids"]
        assert 1 <= len(ids) <= 2
        assert r["finish_reason"] == ("stop" if len(ids) < 2 or ids[-1] == 2 else "length")
    assert any(r["finish_reason"] == "length" for r in sampled)
    by_prompt = [{tuple(r["response_token_ids"]) for r in sampled if r["id"] == row["id"]} for row in heldout[:4]]
    assert any(len(samples) > 1 for samples in by_prompt)  # the samples of a prompt are not one seed's


def test_responses_stop_at_eos_or_length(hf_greedy):
    gen = _generator(sampling=SamplingConfig.greedy(1))
    batch = {"_row": np.arange(2), "id": np.asarray(["a", "b"]),
             "prompt": np.asarray(["Q: reverse the letters: a b c d\nA:", "Q: sort the digits: 9 1 5 3\nA:"])}
    out = gen(batch)
    assert list(out["finish_reason"]) == ["length", "length"]
    assert [len(ids) for ids in out["response_token_ids"]] == [1, 1]
    eos = gen.hf.tokenizer.eos_token_id
    for ids, reason, text in zip(hf_greedy["response_token_ids"], hf_greedy["finish_reason"], hf_greedy["response"]):
        if reason == "stop":  # EOS kept in the ids, dropped from the text, as vLLM does
            assert int(ids[-1]) == eos and eos not in [int(t) for t in ids[:-1]]
            assert "</s>" not in text
        else:
            assert len(ids) == 12


def test_samples_per_prompt_and_seeds(heldout):
    rows = heldout[:6]
    batch = {"_row": np.arange(len(rows)), "id": np.asarray([r["id"] for r in rows]),
             "prompt": np.asarray([r["prompt"] for r in rows])}

    def sample(seed: int) -> list[tuple[int, ...]]:
        cfg = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=8, n=3, seed=seed)
        out = _generator("toy:student", sampling=cfg)(batch)
        assert list(out["id"]) == [r["id"] for r in rows for _ in range(3)]
        assert list(out["sample_index"]) == [0, 1, 2] * len(rows)
        return [tuple(int(t) for t in ids) for ids in out["response_token_ids"]]

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again  # same seed, same batch: same samples
    assert first != other
    assert len(set(first)) > len(rows)  # the 3 samples of a prompt are not copies of one another

    greedy = _generator(sampling=SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=8, n=2, seed=0))(batch)
    ids = [tuple(int(t) for t in x) for x in greedy["response_token_ids"]]
    assert ids[0::2] == ids[1::2]  # greedy with n=2: two copies, as vLLM gives


def _pairs(heldout, tokenizer) -> dict[str, np.ndarray]:
    from kdray.data.tokenize import encode_batch

    pairs = encode_batch(tokenizer, [r["prompt"] for r in heldout[:8]], [r["response"] for r in heldout[:8]], None)
    prompt_ids, response_ids = np.empty(len(pairs), object), np.empty(len(pairs), object)
    input_ids = np.empty(len(pairs), object)
    for i, (p, r) in enumerate(pairs):
        prompt_ids[i], response_ids[i] = np.asarray(p, np.int64), np.asarray(r, np.int64)
        input_ids[i] = np.asarray(p + r, np.int32)  # the scorer's input: a compact training example
    return {"_row": np.arange(len(pairs)), "input_ids": input_ids,
            "prompt_len": np.asarray([len(p) for p, _ in pairs], np.int32),
            "prompt_ids": prompt_ids, "response_ids": response_ids}


def _direct_logits(scorer: HFScorer, p: np.ndarray, r: np.ndarray) -> torch.Tensor:
    ids = torch.tensor(np.concatenate([p, r]))[None]
    with torch.inference_mode():
        logits = scorer.hf.model(input_ids=ids).logits[0]
    return logits[len(p) - 1: len(p) + len(r) - 1]


def test_scorer_topk_matches_a_direct_forward(heldout):
    scorer = HFScorer("toy:teacher", mode="topk", k=5, dtype="float32", max_model_len=128,
                      tensor_parallel_size=1, enforce_eager=True, env=pool_env(GenerationSpec()))
    batch = _pairs(heldout, scorer.hf.tokenizer)
    out = scorer(batch)
    assert list(out["_row"]) == list(batch["_row"])
    first_is_gold = []
    for p, r, ids, lps in zip(batch["prompt_ids"], batch["response_ids"], out["topk_ids"], out["topk_logprobs"]):
        assert ids.shape == lps.shape == (len(r), 5) and ids.dtype == np.int32 and lps.dtype == np.float32
        ref = torch.log_softmax(_direct_logits(scorer, p, r).float(), -1).topk(5)
        np.testing.assert_array_equal(ids, ref.indices.numpy())
        np.testing.assert_allclose(lps, ref.values.numpy(), atol=1e-5)
        assert (np.diff(lps, axis=1) <= 0).all()
        first_is_gold += list(ids[:, 0] == r)
    assert np.mean(first_is_gold) > 0.7  # the teacher mostly ranks the gold token first


def test_scorer_hidden_through_lm_head_gives_the_logits(heldout):
    scorer = HFScorer("toy:teacher", mode="hidden", k=5, dtype="float32", max_model_len=128,
                      tensor_parallel_size=1, enforce_eager=True, env=pool_env(GenerationSpec()))
    batch = _pairs(heldout, scorer.hf.tokenizer)
    out = scorer(batch)
    head = scorer.hf.model.get_output_embeddings()
    for p, r, hidden in zip(batch["prompt_ids"], batch["response_ids"], out["hidden"]):
        assert hidden.shape == (len(r), scorer.hf.model.config.hidden_size) and hidden.dtype == np.float32
        with torch.inference_mode():
            logits = head(torch.from_numpy(hidden))
        torch.testing.assert_close(logits, _direct_logits(scorer, p, r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["topk", "hidden"])
def test_a_scorer_given_the_records_layout_writes_the_stored_bytes_in_the_actor(heldout, mode):
    from kdray.data.records import decode_signal, topk_id_dtype

    kwargs = dict(k=5, dtype="float32", max_model_len=128, tensor_parallel_size=1, enforce_eager=True,
                  env=pool_env(GenerationSpec()))
    plain = HFScorer("toy:teacher", mode=mode, **kwargs)
    batch = _pairs(heldout, plain.hf.tokenizer)
    vocab, hidden = plain.hf.model.config.vocab_size, plain.hf.model.config.hidden_size
    meta = ({"mode": "topk", "k": 5, "vocab_size": vocab, "id_dtype": topk_id_dtype(vocab)} if mode == "topk"
            else {"mode": "hidden", "hidden_size": hidden, "hidden_dtype": "bfloat16"})
    stored = HFScorer("toy:teacher", mode=mode, signal_meta=meta, **kwargs)(batch)
    arrays = plain(batch)
    for i, r in enumerate(batch["response_ids"]):
        assert stored["n_tokens"][i] == len(r) and isinstance(stored[meta["mode"] if mode == "hidden" else "topk_ids"][i], bytes)
        decoded = decode_signal({c: stored[c][i] for c in stored}, meta)
        if mode == "topk":
            np.testing.assert_array_equal(decoded["topk_ids"], arrays["topk_ids"][i])
            np.testing.assert_allclose(decoded["topk_logprobs"], arrays["topk_logprobs"][i], rtol=1e-3)  # float16
        else:  # bfloat16 keeps 8 bits of mantissa
            np.testing.assert_allclose(decoded["hidden"], arrays["hidden"][i], rtol=1e-2, atol=1e-2)


def test_hf_backend_rejects_tensor_parallelism():
    with pytest.raises(KdrayError, match="generation.tensor_parallel_size is 2"):
        _generator(tensor_parallel_size=2)
    with pytest.raises(KdrayError, match="tensor_parallel_size"):
        HFScorer("toy:teacher", mode="topk", k=4, dtype="float32", max_model_len=128,
                 tensor_parallel_size=2, enforce_eager=True, env={})


def test_spec_rejects_hf_backend_with_tensor_parallelism():
    from kdray.spec import parse_spec

    spec = {"name": "t", "output_dir": "runs/t", "teacher": {"model": "toy:teacher", "backend": "hf"},
            "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
            "generation": {"tensor_parallel_size": 2, "num_gpus_per_replica": 2}}
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    message = " ".join(msg for _, msg in info.value.errors)
    assert "teacher.backend" in message and "generation.tensor_parallel_size" in message
    spec["generation"].update(tensor_parallel_size=1, num_gpus_per_replica=1)
    assert parse_spec(spec).teacher.backend == "hf"


@pytest.mark.slow
def test_hf_pools_generate_through_ray_data_in_order(heldout):
    """A job's teacher and student pools with ``backend: hf``, through the real
    :func:`kdray.pools.generate` (Ray Data actor pool): every row back, in order, equal to
    what the class gives when called directly."""
    import ray

    from kdray.pools.run import generate
    from kdray.ray_setup import job_env
    from kdray.spec import GenerationSpec, ModelSpec

    rows = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"], "finish_reason": "stop"}
            for r in heldout[:20]]
    pool = GenerationSpec(replicas=1, batch_size=6, num_cpus_per_replica=0.5)
    greedy = SamplingConfig.greedy(12)
    ray_tmp = tempfile.mkdtemp(prefix="kdray-hf-")  # short: Ray's socket paths must stay under 108 bytes
    ray.init(num_cpus=2, _temp_dir=ray_tmp, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": job_env()})
    try:
        out = {}
        for role in ("teacher", "student"):
            spec = ModelSpec(model=f"toy:{role}", backend="hf", dtype="float32", max_model_len=128)
            out[role] = generate(rows, spec, pool, greedy, score_gold=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for role, got in out.items():
        assert [r["id"] for r in got] == [r["id"] for r in rows]
        assert all(r["sample_index"] == 0 and r["finish_reason"] in ("stop", "length") for r in got)
        direct = _generator(f"toy:{role}", score_gold=True)(_batch(rows))
        assert [r["response"] for r in got] == list(direct["response"])
        assert [r["response_token_ids"] for r in got] == [[int(t) for t in x] for x in direct["response_token_ids"]]
        np.testing.assert_allclose([r["gold_ce"] for r in got], direct["gold_ce"], rtol=1e-5)
    assert [r["response"] for r in out["teacher"]] != [r["response"] for r in out["student"]]


@pytest.mark.slow
def test_bench_generation_quick_prints_the_ratios():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "kdray.cli", "bench", "generation", "--quick"],
                         capture_output=True, text=True, timeout=1200, cwd=REPO, env=env, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for label in ("vllm pool", "bare vllm", "hf pool", "bare hf"):
        assert label in out
    assert "unavailable" not in out, out
    assert "vllm pool / bare hf generate" in out and "vllm pool / hf pool" in out
    assert "vllm pool overhead vs bare vllm" in out
    assert out.count("x (") >= 2 and "% (" in out  # ratios measured, not '-'
    assert "targets:" in out and out.count("] ") >= 3
    assert "host load (1-min average)" in out  # --quick: one round; the variants interleave over --rounds
    # the top-k records section: bytes/token and gradient cosine at k = 16 and 20 are checked
    assert "top-k teacher records on the toy teacher" in out
    assert "top-k k=16:" in out and "top-k k=20:" in out
