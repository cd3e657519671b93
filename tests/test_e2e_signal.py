"""Teacher-signal modes on the real stack: the vLLM scorer against a plain HF forward, and
whole jobs trained from top-k and hidden-state records (Ray Data scoring pool → parquet
records → Ray Train + DeepSpeed ZeRO-2 workers with no teacher model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_e2e import kdray, reduced_demo

SCORE_SCRIPT = r"""
import sys, numpy as np
from kdray.data.datasets import read_rows
from kdray.pools.base import pool_env
from kdray.spec import GenerationSpec
from kdray.models import load_tokenizer
from kdray.data.tokenize import encode_batch
from kdray.pools.vllm import VLLMScorer

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    tok = load_tokenizer("toy:teacher")
    rows = read_rows("toy:heldout")[:8]
    pairs = encode_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], None)
    batch = {"_row": np.arange(len(pairs)), "prompt_ids": np.empty(len(pairs), object),
             "response_ids": np.empty(len(pairs), object), "input_ids": np.empty(len(pairs), object),
             "prompt_len": np.asarray([len(p) for p, _ in pairs], np.int32)}
    for i, (p, r) in enumerate(pairs):
        batch["prompt_ids"][i], batch["response_ids"][i] = np.asarray(p), np.asarray(r)
        batch["input_ids"][i] = np.asarray(p + r, np.int32)  # the scorer's input: a compact example
    scorer = VLLMScorer("toy:teacher", mode=mode, k=8, dtype="float32", max_model_len=128,
                        tensor_parallel_size=1, enforce_eager=True, env=pool_env(GenerationSpec()))
    result = scorer(batch)
    keys = ["topk_ids", "topk_logprobs"] if mode == "topk" else ["hidden"]
    np.savez(out, **{f"{k}_{i}": result[k][i] for k in keys for i in range(len(pairs))},
             **{f"prompt_{i}": batch["prompt_ids"][i] for i in range(len(pairs))},
             **{f"response_{i}": batch["response_ids"][i] for i in range(len(pairs))})
"""


def _scored(mode: str, tmp_path: Path) -> dict[str, np.ndarray]:
    out = tmp_path / f"{mode}.npz"
    res = subprocess.run([sys.executable, "-c", SCORE_SCRIPT, mode, str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "hidden"])
def test_vllm_scorer_reproduces_the_teacher(tmp_path, toy_world, mode):
    import torch

    from kdray.models import load_causal_lm

    scored = _scored(mode, tmp_path)
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    head = teacher.get_output_embeddings().weight
    for i in range(8):
        p, r = scored[f"prompt_{i}"], scored[f"response_{i}"]
        ids = torch.as_tensor(np.concatenate([p, r]))[None]
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True)
        at = slice(len(p) - 1, len(p) + len(r) - 1)  # the positions that predict the response tokens
        logits = out.logits[0, at]
        if mode == "topk":
            values, top = logits.log_softmax(-1).topk(8)
            assert scored[f"topk_ids_{i}"].shape == (len(r), 8)
            assert np.array_equal(scored[f"topk_ids_{i}"], top.numpy())
            assert np.allclose(scored[f"topk_logprobs_{i}"], values.numpy(), atol=1e-4)
        else:
            hidden = torch.as_tensor(scored[f"hidden_{i}"])
            assert hidden.shape == (len(r), teacher.config.hidden_size)
            # the stored hidden states through the teacher's lm_head are its logits
            assert torch.allclose(hidden @ head.T, logits, atol=1e-4, rtol=1e-4)


def _signal_job(tmp_path: Path, signal: dict, objective: dict) -> Path:
    path = reduced_demo(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["teacher_signal"] = signal
    spec["objective"] = objective
    spec["evaluation"] = {"enabled": False}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signal,objective", [
    ({"mode": "topk", "k": 20}, {"kind": "adaptive_kl", "mu": 0.5}),
    ({"mode": "hidden"}, {"kind": "forward_kl"}),
])
def test_a_job_trains_from_teacher_records(tmp_path, toy_world, signal, objective):
    res = kdray("run", str(_signal_job(tmp_path, signal, objective)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    phases = [json.loads(line)["phase"] for line in (out / "events.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "phase_end"]
    assert phases[:4] == ["prepare", "generate", "score", "train"]
    stats = report["teacher_signal"]
    assert stats["mode"] == signal["mode"] and stats["rows"] == 256 and stats["tokens"] > 256
    records = out / "records" / f"teacher-{signal['mode']}"
    marker = json.loads((records / "_kdray_dataset.json").read_text())  # committed by the scorer's writes
    assert marker["rows"] == 256 and stats["bytes"] == sum((records / f).stat().st_size for f in marker["files"])
    assert not list((out / "records").glob(".*partial*"))
    # The records are the training examples: their labels are the teacher pool's own ids.
    import pyarrow.parquet as pq

    examples = {r["key"]: r for f in marker["files"] for r in pq.read_table(records / f).to_pylist()}
    responses = out / "datasets" / "responses"
    generated = [r for f in json.loads((responses / "_kdray_dataset.json").read_text())["files"]
                 for r in pq.read_table(responses / f, columns=["key", "response_token_ids"]).to_pylist()]
    assert len(generated) == len(examples) == 256
    def ids(cell):  # ragged ids are Ray Data's variable-shaped tensors: {data, shape} structs, or
        # numpy arrays once ray.data has registered its Arrow extension types in this process
        return [int(t) for t in (cell["data"] if isinstance(cell, dict) else cell)]

    for row in generated:
        example = examples[row["key"]]
        labels = ids(example["input_ids"])[example["prompt_len"]:]
        assert labels == ids(row["response_token_ids"])[: len(labels)] and example["n_tokens"] == len(labels)
    if signal["mode"] == "topk":
        assert stats["bytes_per_token"] <= 100  # the budget at k = 20
    steps = [m for m in report["train_metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 17))
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in steps)
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    # the exported student is a plain HF model
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "student").config.vocab_size > 0
