"""Tests of the toy world (kdray.toy).

The module fixture builds the world once into the default cache
(``$KDRAY_CACHE_DIR/toy`` or ``~/.cache/kdray/toy``), so later runs reuse it;
the first run spends about three minutes building it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import kdray.toy as toy
from kdray.toy import world as toy_world


@pytest.fixture(scope="module")
def world() -> toy.ToyWorld:
    return toy.build_toy_world()


@pytest.fixture(scope="module")
def rows(world):
    return toy.read_jsonl(world.train_path), toy.read_jsonl(world.heldout_path)


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world.teacher_dir)


# ----------------------------------------------------------------- data


def test_rows_schema_families_and_sizes(world, rows):
    train, heldout = rows
    assert len(train) >= 2000 and 200 <= len(heldout) <= 1000
    for split in (train, heldout):
        assert {r["family"] for r in split} == set(toy.FAMILIES)
        assert set(toy.FAMILIES) >= {"arithmetic", "reversal", "sorting", "counting"}
        for r in split:
            assert set(r) == {"id", "family", "prompt", "response"}
            assert re.fullmatch(rf"{r['family']}-\d+", r["id"])
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))
    assert world.meta["n_train"] == len(train) and world.meta["n_heldout"] == len(heldout)
    # every family is well represented in the held-out split
    assert min(Counter(r["family"] for r in heldout).values()) >= 50


def test_splits_are_disjoint(rows):
    train, heldout = rows
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert not train_prompts & {r["prompt"] for r in heldout}


def _recompute(prompt: str) -> str:
    """Independent re-derivation of each family's answer from the prompt text."""
    m = re.fullmatch(r"Q: (\w+) (.*)\nA:", prompt, flags=re.S)
    assert m, prompt
    op, rest = m.group(1), m.group(2)
    items = rest.split(" ")
    if op == "add":
        assert 2 <= len(items) <= 4 and all(len(x) == 1 for x in items)
        return str(sum(int(x) for x in items))
    if op == "reverse":
        return " ".join(items[::-1])
    if op == "sort":
        return " ".join(sorted(items, key=int))
    if op == "count":
        return str(len(items))
    raise AssertionError(f"unexpected task {op!r}")


def test_answers_are_verifiable(rows):
    for r in rows[0] + rows[1]:
        assert r["response"].startswith(" ") and not r["response"].startswith("  ")
        assert r["response"][1:] == _recompute(r["prompt"]), r
        assert toy.solve(r["prompt"]) == r["response"].strip()


def test_answers_are_space_separated_symbols(rows):
    by_family = {r["family"]: r for r in rows[1]}
    for family in ("reversal", "sorting"):
        r = by_family[family]
        assert all(len(sym) == 1 for sym in r["response"].split()), r
    assert toy.solve("Q: sort 5 3 8 1\nA:") == "1 3 5 8"
    assert toy.solve("Q: reverse k d a m\nA:") == "m a d k"


def test_data_is_deterministic(world, rows):
    from kdray.toy.data import generate_splits

    a = generate_splits(toy_world.N_TRAIN_PER_FAMILY, toy_world.N_HELDOUT_PER_FAMILY, world.meta["seed"])
    b = generate_splits(toy_world.N_TRAIN_PER_FAMILY, toy_world.N_HELDOUT_PER_FAMILY, world.meta["seed"])
    assert a == b
    assert (a[0], a[1]) == rows
    c = generate_splits(toy_world.N_TRAIN_PER_FAMILY, toy_world.N_HELDOUT_PER_FAMILY, world.meta["seed"] + 1)
    assert c[1] != a[1]


# ------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_every_string(rows, tokenizer):
    extra = ["", " ", "Q: héllo wörld ✓ 123\n\tA: x", "  two  spaces ", "add 99 99"]
    for text in [r["prompt"] + r["response"] for r in rows[0] + rows[1]] + extra:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_bos(world, tokenizer, rows):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == world.meta["tokenizer"]["model_max_length"]
    prompt = rows[1][0]["prompt"]
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids[1:]
    # both model directories carry the same tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (world.teacher_dir / name).read_bytes() == (world.student_dir / name).read_bytes()


def test_prompt_response_tokenisation_is_consistent(rows, tokenizer):
    for r in rows[0] + rows[1]:
        p = tokenizer(r["prompt"])["input_ids"]
        q = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        assert p + q == tokenizer(r["prompt"] + r["response"])["input_ids"], r


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer("Q: add 12 345\nA: 357", add_special_tokens=False)["input_ids"]
    toks = [tokenizer.decode([i]) for i in ids]
    assert all(sum(ch.isdigit() for ch in t) <= 1 for t in toks), toks


def test_incremental_detokenisation_of_prefixes(rows, tokenizer):
    for r in rows[1][:50]:
        ids = tokenizer(r["prompt"] + r["response"], add_special_tokens=False)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for k in range(1, len(tokens) + 1):
            assert tokenizer.convert_tokens_to_string(tokens[:k]) == tokenizer.decode(ids[:k])
        assert tokenizer.convert_tokens_to_string(tokens) == r["prompt"] + r["response"]


def test_tokenizer_training_is_deterministic(rows, tokenizer):
    from kdray.toy.tokenizer import train_tokenizer

    texts = [r["prompt"] + r["response"] for r in rows[0]]
    again = train_tokenizer(texts)
    assert again.get_vocab() == tokenizer.get_vocab()
    sample = [r["prompt"] + r["response"] for r in rows[1][:100]]
    assert again(sample)["input_ids"] == tokenizer(sample)["input_ids"]


# --------------------------------------------------------------- models


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_models_load_with_auto_classes(world, tokenizer, which):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = getattr(world, f"{which}_dir")
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.head_dim == 32 == cfg.hidden_size // cfg.num_attention_heads
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == world.meta[which]["params"]
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == tokenizer.eos_token_id


def test_student_is_smaller_than_teacher(world):
    t, s = world.meta["teacher"], world.meta["student"]
    assert s["params"] * 4 < t["params"]
    assert s["config"]["num_hidden_layers"] < t["config"]["num_hidden_layers"]
    assert s["config"]["vocab_size"] == t["config"]["vocab_size"]


def test_meta_reports_teacher_good_student_weak(world):
    meta = json.loads((world.root / "meta.json").read_text())
    assert meta == world.meta
    assert meta["teacher_exact_match"] >= 0.7
    assert meta["student_exact_match"] < meta["teacher_exact_match"] - 0.3
    assert set(meta["teacher"]["heldout_exact_match_by_family"]) == set(toy.FAMILIES)
    assert 0 < meta["build_seconds"] and meta["version"] == toy.WORLD_VERSION


def test_teacher_really_solves_heldout_prompts(world, rows, tokenizer):
    from transformers import AutoModelForCausalLM

    from kdray.toy.train import greedy_answers

    model = AutoModelForCausalLM.from_pretrained(world.teacher_dir)
    sample = rows[1][::10]
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in sample], max_new_tokens=12)
    em = sum(a.strip() == r["response"].strip() for a, r in zip(answers, sample)) / len(sample)
    assert em >= 0.6, list(zip(answers, sample))[:5]


# ------------------------------------------------------ cache and resolve


def test_second_build_is_cached(world):
    mtime = world.root.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = toy.build_toy_world()
    assert time.perf_counter() - t0 < 2.0
    assert again == world and again.meta["build_id"] == world.meta["build_id"]
    assert world.root.stat().st_mtime_ns == mtime


def test_world_layout(world):
    assert world.root == toy.cache_root() / toy_world.world_dir_name()
    assert world.root.name.startswith(toy.WORLD_VERSION + "-")
    assert world.meta["fingerprint"] == toy_world.fingerprint()
    for d in (world.teacher_dir, world.student_dir):
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), d / name
    assert not list(world.root.parent.glob(f".{world.root.name}.*"))  # no leftover temp dirs


def test_cache_root_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path))
    assert toy.cache_root() == tmp_path / "toy"
    monkeypatch.delenv("KDRAY_CACHE_DIR")
    assert toy.cache_root() == Path.home() / ".cache" / "kdray" / "toy"


def test_resolve(world):
    assert toy.resolve("toy:teacher") == world.teacher_dir
    assert toy.resolve("toy:student") == world.student_dir
    assert toy.resolve("toy:train") == world.train_path
    assert toy.resolve("toy:heldout") == world.heldout_path
    assert toy.TOY_REFS == ("toy:teacher", "toy:student", "toy:train", "toy:heldout")
    with pytest.raises(ValueError) as err:
        toy.resolve("toy:nope")
    for ref in toy.TOY_REFS:
        assert ref in str(err.value)


def test_cli_prints_meta(world):
    env_root = str(toy.cache_root())
    out = subprocess.run(
        [sys.executable, "-m", "kdray.toy", "--cache-dir", env_root],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(out.stdout)["build_id"] == world.meta["build_id"]


# ----------------------------- locking and atomicity (with a fake, fast builder)


def _fake_builder(calls: list, delay: float = 0.3, fail: bool = False):
    def build(out: Path, progress) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "partial").write_text("x")
        time.sleep(delay)
        if fail:
            raise RuntimeError("boom")
        (out / "meta.json").write_text(json.dumps({"build_id": str(len(calls))}))
        progress("fake build done")

    return build


def test_concurrent_builds_build_once(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(toy_world, "_build_into", _fake_builder(calls))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(toy.build_toy_world(tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 4 and all(r.meta == {"build_id": "1"} for r in results)
    assert results[0].root == tmp_path / toy_world.world_dir_name()
    assert results[0].teacher_dir == results[0].root / "teacher"


def test_failed_build_leaves_nothing_half_written(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(toy_world, "_build_into", _fake_builder(calls, delay=0, fail=True))
    with pytest.raises(RuntimeError, match="boom"):
        toy.build_toy_world(tmp_path)
    assert not (tmp_path / toy_world.world_dir_name()).exists()
    assert not list(tmp_path.glob(".*"))


def test_force_rebuilds_and_progress_is_reported(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(toy_world, "_build_into", _fake_builder(calls, delay=0))
    first = toy.build_toy_world(tmp_path)
    assert toy.build_toy_world(tmp_path).meta == first.meta and len(calls) == 1
    messages: list[str] = []
    second = toy.build_toy_world(tmp_path, force=True, progress=messages.append)
    assert len(calls) == 2 and second.meta == {"build_id": "2"}
    assert messages == ["fake build done"]
    name = toy_world.world_dir_name()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.lock"]
