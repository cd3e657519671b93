"""Tiny Llama models, their SFT, and greedy held-out exact match."""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

# Model shapes. head_dim is 32 everywhere (vLLM's CPU attention supports it);
# input and output embeddings are tied.
TEACHER_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
HEAD_DIM = 32
MAX_POSITIONS = 128


@dataclass(frozen=True)
class SFTRecipe:
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01


def default_threads() -> int:
    """Intra-op threads for the build: ``$KDRAY_TOY_THREADS`` if set, else one per core that
    other processes leave idle now (:func:`idle_cores`), between 1 and 4. OpenMP threads that
    must share a core with another busy process slow these tiny models down several-fold."""
    env = os.environ.get("KDRAY_TOY_THREADS")
    if env:
        return max(1, int(env))
    cores = os.cpu_count() or 1
    return max(1, min(4, cores, round(idle_cores(cores))))


def idle_cores(cores: int, interval_s: float = 0.3) -> float:
    """Cores left idle over the next ``interval_s`` seconds, from ``/proc/stat`` (Linux); else
    the cores less the 1-minute load average. The load average trails by a minute: a build
    that starts right after an install (CI) would see the install's load and take one thread."""
    def busy_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    try:
        busy0, total0 = busy_total()
        time.sleep(interval_s)
        busy1, total1 = busy_total()
        return cores * (1 - (busy1 - busy0) / max(1, total1 - total0))
    except (OSError, ValueError):
        try:
            return cores - os.getloadavg()[0]
        except OSError:
            return 1.0


@contextmanager
def quiet_build(threads: int | None = None):
    """Set torch threads and silence transformers' progress bars; restore both after."""
    import torch
    from transformers.utils import logging as hf_logging

    old_threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads or default_threads())
    hf_logging.disable_progress_bar()
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            hf_logging.enable_progress_bar()


def make_model(shape: dict, tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        head_dim=HEAD_DIM,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def encode_sft(tokenizer, rows):
    """(input_ids, labels) tensors, right padded; loss on response + EOS only."""
    import torch

    from kdray.losses import IGNORE_INDEX

    seqs = []
    for row in rows:
        p = tokenizer(row["prompt"])["input_ids"]
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((p + r, [IGNORE_INDEX] * len(p) + r))
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def sft(model, tokenizer, rows, recipe: SFTRecipe, seed: int) -> float:
    """AdamW with linear warmup and cosine decay; returns the mean loss of the last 10% of steps."""
    import torch

    ids, labels = encode_sft(tokenizer, rows)
    mask = (ids != tokenizer.pad_token_id).long()
    lengths = mask.sum(1)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    tail = []
    perm = torch.randperm(len(ids), generator=gen)
    pos = 0
    for step in range(recipe.steps):
        if pos + recipe.batch_size > len(perm):
            perm, pos = torch.randperm(len(ids), generator=gen), 0
        idx = perm[pos : pos + recipe.batch_size]
        pos += recipe.batch_size
        w = int(lengths[idx].max())
        out = model(input_ids=ids[idx, :w], attention_mask=mask[idx, :w], labels=labels[idx, :w])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= recipe.steps * 0.9:
            tail.append(out.loss.item())
    model.eval()
    return sum(tail) / max(1, len(tail))


def greedy_answers(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """HF ``generate`` greedy, batched with left padding; decoded completions."""
    from kdray.pools.left_padded import generate_left_padded

    ids = tokenizer([str(p) for p in prompts])["input_ids"]
    outs: list[str] = []
    for i in range(0, len(ids), batch_size):
        for (response, _), in generate_left_padded(
                model, ids[i: i + batch_size], pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id],
                max_new_tokens=max_new_tokens):
            outs.append(tokenizer.decode(response, skip_special_tokens=True))
    return outs


def exact_match(model, tokenizer, rows, max_new_tokens: int) -> dict:
    """Overall and per-family held-out exact match (stripped string equality)."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    hits: dict[str, list[int]] = defaultdict(list)
    for row, ans in zip(rows, answers):
        hits[row["family"]].append(int(ans.strip() == row["response"].strip()))
    total = [h for v in hits.values() for h in v]
    return {
        "exact_match": round(sum(total) / len(total), 4),
        "by_family": {f: round(sum(v) / len(v), 4) for f, v in sorted(hits.items())},
    }
