"""Fidelity and size of top-k teacher records, for ``kdray bench generation``.

For each k, the toy teacher's top-k log-probs on real training responses are written with the
same encoder the job uses (:func:`kdray.data.records.write_signal_records`), read back, and fed to
the sparse forward KL; its gradient with respect to the toy student's parameters is compared
with the gradient of the dense forward KL against the full teacher distribution (cosine
similarity), and the file's size is divided by the tokens it holds (bytes/token). The
teacher's distribution comes from a plain HF forward, which matches the vLLM scorer's top-k
to 1e-5 (``tests/test_e2e_signal.py``), so this section needs no vLLM engine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

TARGET_BYTES_PER_TOKEN = 100.0
TARGET_COSINE = 0.99


def topk_fidelity(ks: tuple[int, ...] = (4, 8, 16, 20, 32), n_rows: int = 64, max_seq_len: int = 64) -> list[dict[str, Any]]:
    """One row per k: bytes/token of the records and the gradient cosine sparse vs dense."""
    import numpy as np
    import torch

    from kdray import losses
    from kdray.data.datasets import read_rows
    from kdray.models import load_causal_lm
    from kdray.data.tokenize import IGNORE_INDEX
    from kdray.data.records import (read_signal_records, record_bytes_per_token, signal_tensors, topk_id_dtype,
                                    write_signal_records)
    from kdray.train.objectives import topk_tail_mass
    from kdray.data.examples import TokenizeForTraining, training_batch

    rows = read_rows("toy:train")[:n_rows]
    batch = training_batch(TokenizeForTraining("toy:student", max_seq_len=max_seq_len), {
        "prompt": np.array([r["prompt"] for r in rows]), "response": np.array([r["response"] for r in rows]),
        "finish_reason": np.array(["stop"] * len(rows))})
    ids, attn, labels = (batch[c] for c in ("input_ids", "attention_mask", "labels"))
    teacher = load_causal_lm("toy:teacher", "float32", trainable=False)
    student = load_causal_lm("toy:student", "float32")
    vocab = teacher.config.vocab_size
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    positions = [torch.nonzero(labels[i] != IGNORE_INDEX).squeeze(-1) for i in range(len(rows))]

    def gradient(loss_of: Any) -> torch.Tensor:
        student.zero_grad()
        s = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss_of(s).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    dense = gradient(lambda s: losses.masked_token_mean(losses.forward_kl(s, t_logits[:, :-1]), mask))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            k = min(k, vocab)
            records = []
            for i, pos in enumerate(positions):
                values, top = t_logits[i, pos - 1].log_softmax(-1).topk(k)
                records.append({"topk_ids": top.numpy(), "topk_logprobs": values.numpy()})
            meta = {"mode": "topk", "k": k, "vocab_size": vocab, "id_dtype": topk_id_dtype(vocab), "teacher": "toy:teacher"}
            path = Path(tmp) / f"k{k}.parquet"
            stats = write_signal_records(path, [str(i) for i in range(len(rows))], records, meta)
            meta, stored = read_signal_records(path)
            aligned = signal_tensors([stored[str(i)] for i in range(len(rows))], [int(p[0]) for p in positions],
                                     labels.shape[1], meta)  # as a worker's micro-batch holds them
            t_ids, t_lps = aligned["t_topk_ids"][:, 1:], aligned["t_topk_logprobs"][:, 1:]
            tail = topk_tail_mass(t_lps)  # as the trainer computes it
            sparse = gradient(lambda s: losses.masked_token_mean(
                losses.sparse_forward_kl(s, t_ids, t_lps, teacher_tail_mass=tail), mask))
            cosine = float(torch.nn.functional.cosine_similarity(sparse, dense, dim=0))
            out.append({"k": k, "vocab": vocab, "tokens": stats["tokens"], "bytes_per_token": stats["bytes_per_token"],
                        "raw_bytes_per_token": record_bytes_per_token("topk", k=k, vocab_size=vocab),
                        "grad_cosine": cosine})
    return out


def topk_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"top-k teacher records on the toy teacher (V = {rows[0]['vocab']}): size and fidelity")
    for name in ("k", "bytes/token (parquet)", "bytes/token (layout)", "vs 100 B target", "grad cosine vs dense FKL",
                 "vs 0.99 target"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["k"]), f"{r['bytes_per_token']:.1f}", str(r["raw_bytes_per_token"]),
                      "ok" if r["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN else "over",
                      f"{r['grad_cosine']:.4f}", "ok" if r["grad_cosine"] >= TARGET_COSINE else "below")
    return table


def section_topk(args: argparse.Namespace, model_dir: str) -> tuple[list[Any], list[tuple[str, bool]]]:
    """Top-k teacher records on the toy teacher: bytes/token and gradient cosine at several k
    (the toy world, not the random throughput model, since a
    trained teacher's distribution is what the records must keep)."""
    from kdray.toy import build_toy_world

    build_toy_world()
    rows = topk_fidelity(ks=(4, 16, 20) if args.quick else (4, 8, 16, 20, 32), n_rows=16 if args.quick else 64)
    checks = [(f"top-k k={r['k']}: {r['bytes_per_token']:.1f} bytes/token <= {TARGET_BYTES_PER_TOKEN:.0f}, "
               f"grad cosine {r['grad_cosine']:.4f} >= {TARGET_COSINE}",
               r["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN and r["grad_cosine"] >= TARGET_COSINE)
              for r in rows if 16 <= r["k"] <= 20]  # the targets are for k = 16-20
    return [topk_table(rows)], checks
