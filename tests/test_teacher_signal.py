"""Teacher-signal modes without Ray: records (parquet round trip, alignment with the labels),
the per-step objective in each mode against the online teacher, the fused cross-entropy, the
spec rules, and vocabulary alignment between teacher and student."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kdray import losses
from kdray.errors import KdrayError, RecordsError
from kdray.models import load_causal_lm, load_output_head, load_tokenizer, resolve_model, shared_vocab_size
from kdray.curriculum.plan import plan_segments
from kdray.data.tokenize import IGNORE_INDEX
from kdray.data.records import (check_record_lengths, decode_signal, encode_signal, read_signal_records,
                                signal_tensors, topk_id_dtype, write_signal_records)
from kdray.errors import SpecError
from kdray.spec import parse_spec
from kdray.train.objectives import TOPK_TAIL_FLOOR, KDStep, topk_tail_mass
from kdray.train.teacher import TeacherHead, load_teacher
from kdray.data.examples import TokenizeForTraining, training_batch

PROMPTS = np.array(["Q: sort 3 1 2\nA:", "Q: reverse 4 5 6 7\nA:", "Q: sum 9 9\nA:"])
RESPONSES = np.array([" 1 2 3", " 7 6 5 4", " 18"])
FINISH = np.array(["stop", "length", "stop"])


def make(mode="online", objective=None, curriculum=None, **training):
    data = {"name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher", "dtype": "float32"},
            "student": {"model": "toy:student", "dtype": "float32"},
            "data": {"train": "toy:train", "heldout": "toy:heldout"},
            "teacher_signal": {"mode": mode, "k": 8},
            "objective": objective or {"kind": "forward_kl"},
            "training": {"num_workers": 1, "global_batch_size": 3, "micro_batch_size_per_worker": 3, **training}}
    if curriculum:
        data["curriculum"] = curriculum
    return parse_spec(data)


class Engine:
    """What the worker calls: a callable with ``.module``, as DeepSpeed's engine is."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.fixture(scope="module")
def models(toy_world):
    return load_causal_lm("toy:student", "float32"), load_causal_lm("toy:teacher", "float32", trainable=False)


def hf_records(teacher, batch, k):
    """The records a scorer would store, computed here by a plain HF forward of the teacher."""
    ids, attn, labels = (torch.as_tensor(batch[c]) for c in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    rows = []
    for i in range(ids.shape[0]):
        pos = torch.nonzero(labels[i] != IGNORE_INDEX).squeeze(-1)
        lp = out.logits[i, pos - 1].log_softmax(-1)
        values, top = lp.topk(k)
        rows.append({"n_tokens": len(pos), "topk_ids": top.numpy().astype(np.int32),
                     "topk_logprobs": values.numpy(), "hidden": out.hidden_states[-1][i, pos - 1].numpy()})
    return rows


def stored_batch(teacher, mode, k, tmp_path, max_seq_len=32):
    """A training micro-batch exactly as the trainer gets it in ``mode``: scored, written to a
    records file, read back, and aligned by TokenizeForTraining."""
    plain = training_batch(TokenizeForTraining("toy:student", max_seq_len=max_seq_len),
                           {"prompt": PROMPTS, "response": RESPONSES, "finish_reason": FINISH})
    records = hf_records(teacher, plain, k)
    vocab = teacher.config.vocab_size
    meta = {"mode": mode, "vocab_size": vocab, "teacher": "toy:teacher"}
    meta.update(k=k, id_dtype=topk_id_dtype(vocab)) if mode == "topk" else meta.update(
        hidden_dtype="float32", hidden_size=teacher.config.hidden_size)
    keys = [f"r{i}#0" for i in range(len(PROMPTS))]
    write_signal_records(tmp_path / f"{mode}.parquet", keys, records, meta)
    meta, stored = read_signal_records(tmp_path / f"{mode}.parquet")
    raw = {"prompt": PROMPTS, "response": RESPONSES, "finish_reason": FINISH}
    for column in stored[keys[0]]:
        raw[column] = np.array([stored[key][column] for key in keys], dtype=object)
    tok = TokenizeForTraining("toy:student", max_seq_len=max_seq_len, signal_meta=meta)
    return training_batch(tok, raw)


# -- records -------------------------------------------------------------------------------------

def test_topk_records_round_trip_exactly_and_report_their_size(tmp_path):
    rng = np.random.default_rng(0)
    k, vocab = 20, 32_000
    records = []
    for n in (5, 1, 17, 0):
        lps = np.sort(rng.normal(-6, 3, size=(n, k)).astype(np.float32), axis=1)[:, ::-1]
        lps[:, -2:] = -np.inf if n else lps[:, -2:]  # padding slots survive too
        ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k))
        records.append({"topk_ids": ids.astype(np.int32), "topk_logprobs": lps})
    meta = {"mode": "topk", "k": k, "vocab_size": vocab, "id_dtype": topk_id_dtype(vocab), "teacher": "x"}
    keys = ["a#0", "b#0", "b#1", "c#0"]
    stats = write_signal_records(tmp_path / "r.parquet", keys, records, meta)
    meta2, stored = read_signal_records(tmp_path / "r.parquet")
    assert meta2["k"] == k and meta2["id_dtype"] == "<u2" and set(stored) == set(keys)
    for key, record in zip(keys, records):
        got = decode_signal(stored[key], meta2)
        assert got["topk_ids"].dtype == np.int64 and np.array_equal(got["topk_ids"], record["topk_ids"])
        # the stored precision is float16, and the round trip is exact at that precision
        assert np.array_equal(got["topk_logprobs"], record["topk_logprobs"].astype(np.float16).astype(np.float32))
    # decoding and re-encoding gives the same bytes: nothing is lost beyond the first quantisation
    again = [decode_signal(stored[key], meta2) for key in keys]
    write_signal_records(tmp_path / "s.parquet", keys, again, meta)
    _, stored2 = read_signal_records(tmp_path / "s.parquet")
    assert all(stored2[key] == stored[key] for key in keys)
    assert stats["tokens"] == 23 and stats["bytes_per_token"] == stats["bytes"] / 23
    # the layout itself: 20 uint16 ids + 20 float16 log-probs = 80 bytes per token before parquet
    assert len(stored["c#0"]["topk_ids"]) == 0 and len(stored["b#1"]["topk_ids"]) == 17 * k * 2
    assert topk_id_dtype(65_536) == "<u2" and topk_id_dtype(151_936) == "<u4"


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_hidden_records_round_trip(tmp_path, dtype, tol):
    hidden = np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32)
    meta = {"mode": "hidden", "hidden_size": 64, "hidden_dtype": dtype, "vocab_size": 10, "teacher": "x"}
    write_signal_records(tmp_path / "h.parquet", ["x#0"], [{"hidden": hidden}], meta)
    meta2, stored = read_signal_records(tmp_path / "h.parquet")
    got = decode_signal(stored["x#0"], meta2)["hidden"]
    assert got.shape == (7, 64) and got.dtype == np.float32
    assert np.abs(got - hidden).max() <= tol * np.abs(hidden).max()
    assert len(stored["x#0"]["hidden"]) == 7 * 64 * (4 if dtype == "float32" else 2)


def test_bad_records_are_refused(tmp_path):
    meta = {"mode": "topk", "k": 4, "vocab_size": 10, "id_dtype": "<u2", "teacher": "x"}
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        write_signal_records(tmp_path / "r.parquet", ["a#0"], [{"topk_ids": np.full((2, 4), 12),
                                                                "topk_logprobs": np.zeros((2, 4))}], meta)
    with pytest.raises(ValueError, match=r"expected \[n, 4\]"):
        write_signal_records(tmp_path / "r.parquet", ["a#0"], [{"topk_ids": np.zeros((2, 3)),
                                                                "topk_logprobs": np.zeros((2, 3))}], meta)
    assert not (tmp_path / "r.parquet").exists()  # nothing half-written
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(RecordsError, match="not a kdray teacher-signal file"):
        read_signal_records(tmp_path / "plain.parquet")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_records_are_placed_at_the_label_positions_in_their_stored_dtype(dtype):
    meta = {"mode": "hidden", "hidden_size": 2, "hidden_dtype": dtype}
    values = [np.arange(6, dtype=np.float32).reshape(3, 2) + 10 * i for i in range(2)]
    stored = [encode_signal({"hidden": v}, meta) for v in values]
    out = signal_tensors(stored, [2, 3], 6, meta)["t_hidden"]  # labels at 2:5 and 3:6
    assert out.shape == (2, 6, 2) and out.dtype == getattr(torch, dtype)  # not copied to float32
    assert torch.equal(out[0, 2:5].float(), torch.from_numpy(values[0]))  # small integers: exact in every dtype
    assert torch.equal(out[1, 3:6].float(), torch.from_numpy(values[1]))
    assert not out[0, :2].any() and not out[1, :3].any()
    topk = {"mode": "topk", "k": 2, "vocab_size": 10, "id_dtype": "<u2"}
    rec = encode_signal({"topk_ids": np.array([[3, 1]]), "topk_logprobs": np.array([[-0.5, -1.5]])}, topk)
    out = signal_tensors([rec], [4], 5, topk)
    assert out["t_topk_ids"].dtype == torch.int64 and out["t_topk_logprobs"].dtype == torch.float16
    assert out["t_topk_ids"][0, 4].tolist() == [3, 1] and out["t_topk_logprobs"][0, 4].tolist() == [-0.5, -1.5]
    assert out["t_topk_logprobs"][0, 0].tolist() == [0.0, float("-inf")]  # the filler: one certain token
    with pytest.raises(RecordsError, match="covers 2 response tokens but the trainer labels 3"):
        check_record_lengths([3, 2], [3, 3], meta)


# -- the objective in each mode ------------------------------------------------------------------

def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind,params,kd_ratio", [
    ("forward_kl", {}, 1.0),
    ("skew_reverse_kl", {"alpha": 0.1, "detach_mixture_student": True}, 0.7),
    ("adaptive_kl", {"mu": 0.5}, 1.0),
])
def test_hidden_and_fused_online_modes_match_the_online_teachers_logits_in_value_and_gradient(models, tmp_path, kind, params, kd_ratio):
    student, teacher = models
    objective = {"kind": kind, **params, "kd_ratio": kd_ratio}
    results = {}
    for mode, zero, fused in (("online", 2, False), ("online", 2, True), ("online", 3, True), ("hidden", 2, True),
                              ("hidden", 3, True)):
        spec = make(mode, objective, zero_stage=zero)
        step = KDStep(spec, plan_segments(spec, 3)[0])
        assert step.fused  # at every ZeRO stage (a ZeRO-3 engine computes it in its lm_head: test_zero3_teacher)
        step.fused = fused  # off: the reference, both models' full logits
        held = load_teacher(spec)
        batch = stored_batch(teacher, mode, 8, tmp_path) if mode == "hidden" else stored_batch(teacher, "topk", 8, tmp_path)
        student.zero_grad()
        loss, parts, n = step(Engine(student), held, batch)
        loss.backward()
        results[(mode, zero, fused)] = (float(loss.detach()), _grads(student).clone(), parts, n)
    ref_loss, ref_grad, ref_parts, ref_n = results.pop(("online", 2, False))
    for key, (got_loss, got_grad, parts, n) in results.items():
        assert n == ref_n and set(parts) == set(ref_parts)
        assert got_loss == pytest.approx(ref_loss, rel=1e-5), key
        assert torch.allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-7), key


def test_topk_mode_is_the_bucket_divergence_and_exact_at_full_k(models, tmp_path):
    student, teacher = models
    vocab = teacher.config.vocab_size
    spec = make("topk", {"kind": "forward_kl"})
    step = KDStep(spec, plan_segments(spec, 3)[0])
    assert load_teacher(spec) is None  # no teacher in the worker
    online = KDStep(make("online"), plan_segments(spec, 3)[0])
    full = stored_batch(teacher, "topk", vocab, tmp_path)
    loss_full, _, _ = step(Engine(student), None, full)
    loss_online, _, _ = online(Engine(student), teacher, full)
    # k = V: the records hold the whole distribution (at float16), so the loss is the dense one
    assert float(loss_full.detach()) == pytest.approx(float(loss_online.detach()), rel=2e-3)
    sparse = stored_batch(teacher, "topk", 8, tmp_path)
    loss_k, _, _ = step(Engine(student), None, sparse)
    s = student(input_ids=sparse["input_ids"], attention_mask=sparse["attention_mask"]).logits[:, :-1]
    mask = sparse["labels"][:, 1:] != IGNORE_INDEX
    lps = sparse["t_topk_logprobs"][:, 1:]
    ref = losses.masked_token_mean(losses.sparse_forward_kl(
        s, sparse["t_topk_ids"][:, 1:], lps, teacher_tail_mass=topk_tail_mass(lps)), mask)
    assert float(loss_k.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert float(loss_k.detach()) <= float(loss_online.detach()) + 1e-6  # the bucket KL is a lower bound of the dense one


@pytest.mark.parametrize("kind,params", [
    ("forward_kl", {}), ("reverse_kl", {}), ("adaptive_kl", {"mu": 0.5}), ("jsd", {"beta": 0.5}), ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.1, "detach_mixture_student": True}),
])
def test_every_divergence_trains_from_topk_records_with_finite_gradients(models, tmp_path, kind, params):
    """A peaked teacher's top-k can hold all its mass once rounded to float16; the tail is then
    floored, not zero, so reverse-KL-type terms stay finite (a zero tail gave AKL NaN gradients)."""
    student, teacher = models
    spec = make("topk", {"kind": kind, **params})
    batch = stored_batch(teacher, "topk", 20, tmp_path)
    tail = topk_tail_mass(batch["t_topk_logprobs"])
    assert float(tail.min()) == pytest.approx(TOPK_TAIL_FLOOR)  # the toy teacher does saturate its top 20
    student.zero_grad()
    loss, _, _ = KDStep(spec, plan_segments(spec, 3)[0])(Engine(student), None, batch)
    loss.backward()
    grads = _grads(student)
    assert torch.isfinite(loss) and torch.isfinite(grads).all() and float(grads.norm()) > 0


def test_fused_cross_entropy_matches_a_float64_reference():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    got = losses.fused_linear_cross_entropy(h, w, labels, mask=mask, bias=b, chunk_size=3)
    got.backward()
    g = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    logits = h @ w.T + b
    nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = (labels != IGNORE_INDEX) & mask
    ref = (nll * keep).sum() / keep.sum()
    ref.backward()
    assert torch.allclose(got, ref, rtol=1e-12)
    for a, t in zip(g, (h, w, b)):
        assert torch.allclose(a, t.grad, rtol=1e-10, atol=1e-12)


# -- spec rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,objective,curriculum,needle", [
    ("topk", {"kind": "distillm2"}, {"kind": "distillm2", "rounds": 2}, "cannot serve objective 'distillm2'"),
    ("hidden", {"kind": "forward_kl"}, {"kind": "replay"}, "cannot serve the replay curriculum"),
    ("topk", {"kind": "forward_kl", "kd_temperature": 2.0}, None, "cannot be re-tempered"),
    ("topk", {"kind": "forward_kl"}, {"kind": "pocl"}, "cannot be re-tempered"),
])
def test_spec_rejects_signal_modes_that_cannot_serve_the_objective(mode, objective, curriculum, needle):
    data = {"name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student"},
            "data": {"train": "toy:train", "heldout": "toy:heldout"}, "teacher_signal": {"mode": mode},
            "objective": objective}
    if curriculum:
        data["curriculum"] = curriculum
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert any(needle in msg for _, msg in info.value.errors), info.value.errors


def test_hidden_mode_accepts_pocl_temperatures():
    spec = make("hidden", None, {"kind": "pocl"})
    assert spec.teacher_signal.mode == "hidden" and spec.curriculum_of("pocl").t_end == 2.0


# -- vocabulary alignment ------------------------------------------------------------------------

def test_the_lm_head_is_read_without_building_the_model(models):
    _, teacher = models
    weight, bias = load_output_head("toy:teacher", "float32")
    assert bias is None and torch.equal(weight, teacher.get_output_embeddings().weight)
    head = TeacherHead(weight, bias, 100)
    assert head.weight.shape[0] == 100


def test_a_padded_teacher_vocabulary_is_sliced_to_the_shared_one(models, tmp_path):
    student, teacher = models
    vocab = student.config.vocab_size
    padded = load_causal_lm("toy:teacher", "float32", trainable=False)
    padded.resize_token_embeddings(vocab + 64, mean_resizing=False)
    with torch.no_grad():
        padded.get_output_embeddings().weight[vocab:] = 5.0  # padding rows that would grab mass
    padded.save_pretrained(tmp_path / "padded")
    load_tokenizer("toy:teacher").save_pretrained(tmp_path / "padded")
    ref = str(tmp_path / "padded")
    assert shared_vocab_size(ref, "toy:student") == vocab
    spec = make()
    spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"model": ref})})
    batch = stored_batch(teacher, "topk", 4, tmp_path)
    step = KDStep(spec, plan_segments(spec, 3)[0])
    loss_padded, _, _ = step(Engine(student), padded, batch)
    loss_plain, _, _ = KDStep(make(), plan_segments(spec, 3)[0])(Engine(student), teacher, batch)
    assert float(loss_padded.detach()) == pytest.approx(float(loss_plain.detach()), rel=1e-6)


def test_different_tokenizers_are_rejected_with_the_reason(tmp_path, toy_world):
    from kdray.toy.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(resolve_model("toy:student"), other)
    tok = train_tokenizer(["completely different text " * 50, "another corpus 123"], vocab_size=300)
    tok.save_pretrained(other)
    with pytest.raises(KdrayError, match="different tokenizers .* pick a student from the teacher's model family"):
        shared_vocab_size("toy:teacher", str(other))


def test_kdray_validate_rejects_a_student_with_another_tokenizer(tmp_path, toy_world):
    import subprocess
    import sys

    import yaml

    from kdray.toy.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(resolve_model("toy:student"), other)
    train_tokenizer(["unrelated words " * 40, "more 456"], vocab_size=300).save_pretrained(other)
    spec = {"name": "t", "output_dir": str(tmp_path / "o"), "teacher": {"model": "toy:teacher"},
            "student": {"model": str(other)}, "data": {"train": "toy:train", "heldout": "toy:heldout"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "kdray.cli", "validate", str(tmp_path / "spec.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "teacher.model / student.model" in res.stdout + res.stderr
    assert "different tokenizers" in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_prompts_go_through_the_chat_template_when_the_tokenizer_has_one(toy_world):
    from kdray.data.tokenize import encode_batch, prompt_token_ids, uses_chat_template

    tok = load_tokenizer("toy:student")
    assert not uses_chat_template(tok, "auto")  # the toy tokenizer has no template: raw prompts
    plain = prompt_token_ids(tok, ["Q: sum 1 2\nA:"], False)
    assert plain == [tok("Q: sum 1 2\nA:").input_ids]
    tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert uses_chat_template(tok, "auto") and not uses_chat_template(tok, "never")
    wrapped = prompt_token_ids(tok, ["Q: sum 1 2\nA:"], True)[0]
    assert tok.decode(wrapped) == "<s>[user] Q: sum 1 2\nA:\n[assistant]"
    assert wrapped.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    # the trainer's and the scorer's encoding use the same ids, then the response and EOS
    (prompt, response), = encode_batch(tok, ["Q: sum 1 2\nA:"], [" 3"], ["stop"], True)
    assert prompt == wrapped and response[-1] == tok.eos_token_id
