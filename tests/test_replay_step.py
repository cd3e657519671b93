"""DistiLLM's adaptive replay in the worker, on the toy student without Ray: where each
step's micro-batches come from, what enters the buffer, and the validation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray import losses
from kdray.models import load_causal_lm, load_tokenizer
from kdray.data.tokenize import IGNORE_INDEX, pack_examples, split_prompt_response
from kdray.train.replay import FIXED, FRESH, REPLAY, ReplaySource
from kdray.spec import parse_spec
from kdray.data.examples import TokenizeForTraining, training_batch


def make(**replay):
    return parse_spec({
        "name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher", "dtype": "float32"},
        "student": {"model": "toy:student", "dtype": "float32"},
        "data": {"train": "toy:train", "heldout": "toy:heldout", "max_prompt_tokens": 32},
        "generation": {"max_new_tokens": 8},
        "objective": {"kind": "skew_forward_kl", "alpha": 0.1},
        "curriculum": {"kind": "replay", **replay},
        "training": {"num_workers": 1, "global_batch_size": 2, "micro_batch_size_per_worker": 2, "max_seq_len": 48},
    })


class Engine:  # what ReplaySource uses of a DeepSpeed engine: the module, its device, forward
    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)


@pytest.fixture(scope="module")
def world(toy_world):
    torch.manual_seed(0)
    tok = load_tokenizer("toy:student")
    student = load_causal_lm("toy:student", "float32", trainable=False)
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    enc = TokenizeForTraining("toy:student", max_seq_len=48)
    batch = training_batch(enc, {"prompt": np.array(["Q: sort 3 1 2\nA:", "Q: reverse 4 5\nA:"]),
                                 "response": np.array([" 1 2 3", " 5 4"]), "finish_reason": np.array(["stop", "stop"])})
    return tok, Engine(student), teacher, batch


def test_split_prompt_response_inverts_packing():
    pairs = [([1, 2, 3], [7, 8, 0]), ([4], [9])]
    packed = {k: torch.as_tensor(v) for k, v in pack_examples(pairs, 8, pad_id=5).items()}
    assert split_prompt_response(packed["input_ids"], packed["attention_mask"], packed["labels"]) == pairs


def test_fresh_steps_sample_the_student_fill_the_buffer_then_replay_from_it(world):
    tok, engine, _, batch = world
    src = ReplaySource(make(init_threshold=1.0, capacity=2), rank=0, state=None,
                       pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert src.begin_step(0, 10) == FRESH  # φ = 1 and the buffer is not full
    fresh = src.batch(engine, batch)
    assert len(src.scheduler) == 2
    prompts = split_prompt_response(batch["input_ids"], batch["attention_mask"], batch["labels"])
    got = split_prompt_response(fresh["input_ids"], fresh["attention_mask"], fresh["labels"])
    for (p, _), (q, response) in zip(prompts, got):
        assert q == p and 1 <= len(response) <= 8  # the same prompt, a new sampled response
        assert tok.eos_token_id not in response[:-1]  # generation stops at EOS (kept as label)
    assert (fresh["labels"][fresh["attention_mask"] == 0] == IGNORE_INDEX).all()

    assert src.begin_step(10, 10) == REPLAY  # t = T: never fresh; the full buffer replays
    replayed = src.batch(engine, batch)
    pairs = sorted(map(str, split_prompt_response(replayed["input_ids"], replayed["attention_mask"], replayed["labels"])))
    assert pairs == sorted(map(str, got))  # capacity 2, batch 2: exactly the buffered samples
    assert src.metrics()["replay_buffer_size"] == 2 and src.metrics()["replay_decision"] == REPLAY

    restored = ReplaySource(make(init_threshold=1.0, capacity=2), rank=0, state=src.state_dict(),
                            pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert restored.begin_step(5, 10) == src.begin_step(5, 10)  # same RNG state, same decision
    assert len(restored.scheduler) == 2


def test_threshold_zero_keeps_the_data_set_batch(world):
    tok, engine, _, batch = world
    src = ReplaySource(make(), rank=0, state=None, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert src.begin_step(0, 10) == FIXED and src.batch(engine, batch) is batch


def test_validation_loss_is_the_students_cross_entropy_over_all_rows_and_raises_the_threshold(world):
    """DistiLLM's evaluate feeds φ the student's CE on the dev set's responses (finetune.py), not
    the distillation objective: a token mean over every validation row, whatever the objective."""
    tok, engine, teacher, batch = world
    spec = make(loss_eps=0.0, threshold_step=0.25)

    compact = TokenizeForTraining("toy:student", max_seq_len=48)(
        {"prompt": np.array(["Q: sort 3 1 2\nA:", "Q: reverse 4 5\nA:"]), "response": np.array([" 1 2 3", " 5 4"]),
         "finish_reason": np.array(["stop", "stop"])})

    class Rows:  # the part of a Ray Data shard that validate() uses: two batches of one row
        def iter_torch_batches(self, batch_size, collate_fn):
            yield collate_fn({k: v[:1] for k, v in compact.items()})
            yield collate_fn({k: v[1:] for k, v in compact.items()})

    src = ReplaySource(spec, rank=0, state=None, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert src.needs_initial_validation
    value = src.validate(engine, Rows(), torch.device("cpu"))
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    whole = losses.masked_token_mean(losses.token_cross_entropy(logits, target), mask)  # over the whole batch
    assert value == pytest.approx(float(whole), rel=1e-5)
    assert not src.needs_initial_validation and src.scheduler.threshold == 0.0
    src.validate(engine, Rows(), torch.device("cpu"))  # not lower: a rise >= 0
    assert src.scheduler.threshold == 0.25
