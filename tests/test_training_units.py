"""Pieces of the training worker that can be checked without a cluster."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdray.spec import parse_spec
from kdray.data.tokenize import IGNORE_INDEX
from kdray.data.examples import CollateExamples, TokenizeForTraining, training_batch
from kdray.train.setup import cosine_with_warmup, deepspeed_config


def spec(**training):
    return parse_spec({
        "name": "t", "output_dir": "o",
        "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student", "dtype": "float32"},
        "data": {"train": "toy:train", "heldout": "toy:heldout"},
        "training": training,
    })


def test_deepspeed_config_derives_accumulation_from_the_global_batch():
    cfg = deepspeed_config(spec(num_workers=2, global_batch_size=32, micro_batch_size_per_worker=4, zero_stage=3))
    assert cfg["train_batch_size"] == 32
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"]["enabled"] is False and "optimizer" not in cfg


def test_cosine_with_warmup_boundaries():
    assert cosine_with_warmup(0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, warmup_steps=10, total_steps=100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, warmup_steps=10, total_steps=100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, warmup_steps=10, total_steps=100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, warmup_steps=10, total_steps=100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(0, warmup_steps=0, total_steps=1) == pytest.approx(1.0)


def test_tokenize_labels_only_the_response_and_its_eos(toy_world):
    tok = TokenizeForTraining("toy:student", max_seq_len=24)
    batch = {
        "prompt": np.array(["Q: sort 3 1 2\nA:", "Q: sort 9 8 7 6 5 4 3 2 1\nA:"]),
        "response": np.array([" 1 2 3", " 1 2 3 4 5 6 7 8 9"]),
        "finish_reason": np.array(["stop", "length"]),
    }
    compact = tok(batch)  # unpadded int32 ids per row, and where the labels start
    out = training_batch(tok, batch)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 24)  # the longest row: cut at max_seq_len

    t = tok.tok
    prompt = t(batch["prompt"][0]).input_ids
    response = t(batch["response"][0], add_special_tokens=False).input_ids
    n = len(prompt) + len(response) + 1
    assert ids[0, :n].tolist() == prompt + response + [t.eos_token_id]
    assert (labels[0, : len(prompt)] == IGNORE_INDEX).all()
    assert labels[0, len(prompt) : n].tolist() == response + [t.eos_token_id]
    assert (labels[0, n:] == IGNORE_INDEX).all() and (ids[0, n:] == t.pad_token_id).all()
    assert mask[0].sum() == n
    assert compact["input_ids"][0].dtype == np.int32 and len(compact["input_ids"][0]) == n
    assert compact["prompt_len"].tolist() == [len(prompt), len(t(batch["prompt"][1]).input_ids)]

    # A response cut by max_new_tokens gets no EOS; too long a sequence is cut at max_seq_len.
    assert mask[1].sum() == 24 and t.eos_token_id not in ids[1].tolist()
    assert math.isclose(float((labels[1] != IGNORE_INDEX).sum()), 24 - len(t(batch["prompt"][1]).input_ids))


def test_tokenize_adds_the_paired_student_response_columns(toy_world):
    tok = TokenizeForTraining("toy:student", max_seq_len=24)
    batch = {
        "prompt": np.array(["Q: sort 3 1 2\nA:"]),
        "response": np.array([" 1 2 3"]),
        "finish_reason": np.array(["stop"]),
        "student_response": np.array([" 3 3"]),
        "student_finish_reason": np.array(["length"]),
    }
    out = training_batch(tok, batch)
    t = tok.tok
    prompt = t(batch["prompt"][0]).input_ids
    student = t(" 3 3", add_special_tokens=False).input_ids
    assert set(out) == {"input_ids", "attention_mask", "labels", "s_input_ids", "s_attention_mask", "s_labels"}
    assert out["s_input_ids"][0, : len(prompt)].tolist() == prompt  # the same prompt
    labelled = out["s_labels"][0][out["s_labels"][0] != IGNORE_INDEX].tolist()
    assert labelled == student  # cut at the length limit: no EOS
    assert out["labels"][0][out["labels"][0] != IGNORE_INDEX].tolist()[-1] == t.eos_token_id


def test_micro_batches_are_padded_to_their_own_longest_row(toy_world):
    """Compact examples are padded per micro-batch, not to max_seq_len; a DistiLLM-2 row's two
    responses share the width (the objective concatenates them)."""
    tok = TokenizeForTraining("toy:student", max_seq_len=64)
    raw = {"prompt": np.array(["Q: sort 3 1 2\nA:", "Q: sort 9\nA:", "Q: reverse 1 2 3 4 5 6\nA:"]),
           "response": np.array([" 1 2 3", " 9", " 6 5 4 3 2 1"]), "finish_reason": np.array(["stop"] * 3)}
    compact = tok(raw)
    lengths = [len(ids) for ids in compact["input_ids"]]
    assert len(set(lengths)) == 3 and max(lengths) < 64
    collate = CollateExamples(tok.pad_id)
    for rows in ([0, 1], [1], [0, 1, 2]):
        batch = collate({k: v[rows] for k, v in compact.items()})
        assert batch["input_ids"].shape == (len(rows), max(lengths[i] for i in rows))
        assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in rows]
    paired = tok({**{k: v[:2] for k, v in raw.items()}, "student_response": np.array([" 1 1 1 1 1 1 1 1", " 9"]),
                  "student_finish_reason": np.array(["stop", "stop"])})
    batch = collate(paired)
    width = max(len(ids) for ids in [*paired["input_ids"], *paired["s_input_ids"]])
    assert batch["input_ids"].shape == batch["s_input_ids"].shape == (2, width) and width > max(lengths[:2])


def test_a_generated_response_trains_on_the_pools_ids_not_its_re_encoded_text(toy_world):
    """A reply whose text holds the literal text of the EOS token: re-encoding the text would put
    an EOS inside the labels (teaching the student to stop there); the pool's ids do not."""
    tok = TokenizeForTraining("toy:student", max_seq_len=64)
    t = tok.tok
    eos = t.eos_token_id
    words = t(" 1 2", add_special_tokens=False).input_ids + t(" 3", add_special_tokens=False).input_ids
    text = f" 1 2{t.eos_token} 3"
    assert eos in t(text, add_special_tokens=False).input_ids  # the text alone would stop mid-reply
    raw = {"prompt": np.array(["Q: sort 3 1 2\nA:"] * 2), "response": np.array([text, text]),
           "finish_reason": np.array(["stop", "length"]),
           "response_token_ids": np.array([np.array(words + [eos]), np.array(words)], dtype=object),
           "student_response": np.array([" 9 9", " 8"]), "student_finish_reason": np.array(["stop", "stop"]),
           "student_response_token_ids": np.array([np.array([words[0]]), np.array(words[:2])], dtype=object)}
    batch = training_batch(tok, raw)
    labelled = [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]]
    assert labelled == [words + [eos], words]  # the generator's stop token stays the one EOS; cut: none
    s_labelled = [row[row != IGNORE_INDEX].tolist() for row in batch["s_labels"]]
    assert s_labelled == [[words[0], eos], words[:2] + [eos]]  # the student's ids, not " 9 9" / " 8"
    text_only = training_batch(tok, {k: raw[k][:1] for k in ("prompt", "response", "finish_reason")})
    assert text_only["labels"][0][text_only["labels"][0] != IGNORE_INDEX].tolist().count(eos) == 2


def test_the_data_sides_ignore_index_is_the_loss_librarys_and_tokenizing_needs_no_torch():
    """kdray.data.tokenize restates the label the losses skip, so that Ray Data's tokenizing and
    pool workers start without importing torch (seconds per worker process on a busy node)."""
    import subprocess
    import sys

    from kdray.losses import IGNORE_INDEX as LOSSES_IGNORE_INDEX

    assert IGNORE_INDEX == LOSSES_IGNORE_INDEX == -100
    code = ("import sys, kdray.data.tokenize, kdray.data.examples, kdray.pools.vllm, kdray.pools.run, "
            "kdray.stages.prepare; print(sorted(m for m in ('torch', 'torch._dynamo') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_step_clock_adds_each_part_and_starts_again_after_take():
    import time

    from kdray.train.step import StepClock

    clock = StepClock()

    def slow_items():
        for i in range(3):
            time.sleep(0.02)
            yield i

    assert list(clock.iterate(slow_items())) == [0, 1, 2]
    with clock.timing("forward"):
        time.sleep(0.01)
    try:
        with clock.timing("backward"):
            raise ValueError("a failing backward is timed too")
    except ValueError:
        pass
    parts = clock.take()
    assert set(parts) == {f"{p}_s" for p in StepClock.PARTS}
    assert parts["data_wait_s"] >= 0.06 and parts["forward_s"] >= 0.01 and parts["backward_s"] > 0
    assert parts["optimizer_s"] == parts["report_s"] == parts["sampling_s"] == 0.0
    assert set(clock.take().values()) == {0.0}  # take() started it again


def test_step_clock_laps_tell_computing_from_waiting():
    import time

    from kdray.train.step import StepClock

    clock = StepClock()
    time.sleep(0.2)  # waiting: wall time without CPU time
    waited = clock.lap()
    end = time.process_time() + 0.2
    while time.process_time() < end:  # computing: CPU time as long as the wall time, or nearly
        pass
    computed = clock.lap()
    assert set(waited) == set(computed) == {"step_s", "cpu_s"} == {f"{k}_s" for k in StepClock.LAPS}
    assert StepClock.KEYS[-2:] == ("step_s", "cpu_s") and len(StepClock.KEYS) == len(StepClock.PARTS) + 2
    assert waited["step_s"] >= 0.2 and waited["cpu_s"] < 0.05, waited
    assert computed["cpu_s"] >= 0.2 and computed["step_s"] >= computed["cpu_s"] * 0.9, computed
    assert computed["step_s"] < 0.2 + waited["step_s"]  # each lap from the previous one's end, not the start


_INIT_BACKEND = """
import os, sys
os.environ.update(TORCH_EXTENSIONS_DIR=sys.argv[1], MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2],
                  RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
from kdray.train.setup import training_deepspeed
deepspeed = training_deepspeed()
deepspeed.init_distributed(dist_backend="gloo")
from deepspeed.comm import comm
print("shm_comm_op:", comm.cdb.shm_comm_op)
"""


def test_training_deepspeed_starts_the_backend_without_building_the_inference_kernel(tmp_path):
    """DeepSpeed's torch backend on CPU builds its shared-memory all-reduce kernel (a C++
    extension, 45-70 s on 2 cores) unless it is marked unavailable; training never calls it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extensions = tmp_path / "torch_extensions"
    res = subprocess.run([sys.executable, "-c", _INIT_BACKEND, str(extensions), str(port)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shm_comm_op: None" in res.stdout
    assert "built successfully" not in res.stdout + res.stderr
    assert not extensions.exists() or not any(extensions.rglob("*.so"))  # nothing compiled


def test_the_last_checkpoint_before_a_preemption_deadline_leaves_its_margin():
    """15 s before the deadline at least; three checkpoints and two steps before it where
    those take longer; none where that moment has passed."""
    import time

    from kdray.train.worker import PREEMPTION_MARGIN_S, _last_checkpoint_at

    now = time.time()
    assert _last_checkpoint_at(now + 60, 1.0, 0.5) == pytest.approx(now + 60 - PREEMPTION_MARGIN_S)
    assert _last_checkpoint_at(now + 120, 20.0, 5.0) == pytest.approx(now + 120 - 70)
    assert _last_checkpoint_at(now + 10, 1.0, 0.5) is None
