"""``kdray bench train``'s memory section: the peak memory of a training worker per teacher
signal, measured beside kdray's estimate for the same job (:mod:`kdray.train.memory`, what
``kdray validate`` prints and ``training.gpu_memory_gb`` checks).

The measured figure is ``peak_rss_mb`` of the job's steps (``VmHWM`` of rank 0's process since
its models were loaded; the ranks are symmetric); on CPU workers the estimate counts the same memory (the worker's RAM).
So that the teacher's share is not lost in the process's own, the full run distils the toy
student from a randomly initialised Llama teacher of about 0.5B parameters
(:data:`MEMORY_TEACHER`, with the toy tokenizer; only memory is read, its answers are noise),
built once under the bench's output directory; ``--quick`` keeps the toy teacher.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

#: The memory section's teacher: Llama-shaped, 0.48B parameters with the toy vocabulary
#: (hidden 1024, 24 layers, MLP 5504, 16 heads of 64, 8 key/value heads).
MEMORY_TEACHER = dict(hidden_size=1024, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=64)
#: The estimate is held to within this of the measurement (issue 17: 25%).
ESTIMATE_TOLERANCE = 0.25
#: The memory section's row of the ``online`` job under ZeRO-3, whose teacher is partitioned.
PARTITIONED = "online, ZeRO-3"


def random_teacher(root: Path) -> str:
    """A randomly initialised :data:`MEMORY_TEACHER` with the toy tokenizer, saved (float32
    safetensors, about 1.9 GB) under ``root`` once and reused; returns its directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdray.models import load_tokenizer, resolve_model

    path = root / "teacher-0.5b"
    if (path / "model.safetensors").exists():
        return str(path)
    toy = Path(resolve_model("toy:teacher"))
    tok = load_tokenizer("toy:teacher")
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=128, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **MEMORY_TEACHER)
    torch.manual_seed(0)
    tmp = root / "teacher-0.5b.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (toy / name).exists():
            shutil.copy2(toy / name, tmp / name)
    tmp.rename(path)
    return str(path)


def add_estimate(result: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    """``result`` (a mode's job, :func:`kdray.bench.train.run_job`) with the estimate of its
    spec: ``estimate_mb``, its ``estimate_parts`` and ``estimate_ratio`` (estimate / measured)."""
    from kdray.spec import load_spec
    from kdray.train.memory import job_estimate

    estimate = job_estimate(load_spec(spec_path))
    result = dict(result, estimate_mb=estimate.total / 2**20,
                  estimate_parts={name: size / 2**20 for name, size in estimate.device})
    measured = result.get("peak_rss_mb")
    if result.get("status") == "ok" and measured and measured == measured:
        result["estimate_ratio"] = result["estimate_mb"] / measured
    return result


def render_memory(results: dict[str, Any], console: Any, fmt: Any) -> None:
    """The memory table: per mode, measured peak, estimate, their ratio, and the verdict."""
    from rich.table import Table

    teacher = results.get("memory_teacher", "toy:teacher")
    table = Table(title=f"peak memory of a training worker by teacher signal (VmHWM of rank 0; teacher {teacher})")
    for col in ("teacher_signal.mode", "status", "peak RSS MiB", "estimate MiB", "estimate / measured",
                "largest estimated parts"):
        table.add_column(col, justify="left" if col in ("teacher_signal.mode", "status", "largest estimated parts")
                         else "right")
    for mode, r in results["memory"].items():
        ok = r.get("status") == "ok"
        parts = sorted(r.get("estimate_parts", {}).items(), key=lambda kv: -kv[1])[:3]
        table.add_row(mode, "ok" if ok else f"[red]failed[/]: {r.get('error', '')}", fmt(r.get("peak_rss_mb")),
                      fmt(r.get("estimate_mb")), fmt(r.get("estimate_ratio"), ".2f"),
                      ", ".join(f"{name} {size:,.0f}" for name, size in parts))
    console.print(table)
    ratios = [r["estimate_ratio"] for r in results["memory"].values() if "estimate_ratio" in r]
    if ratios:
        worst = max(ratios, key=lambda x: abs(x - 1))
        verdict = "[green]meets[/]" if abs(worst - 1) <= ESTIMATE_TOLERANCE else "[red]misses[/]"
        console.print(f"estimate vs measured: worst {worst:.2f}x; {verdict} the target of "
                      f"±{ESTIMATE_TOLERANCE:.0%}")
    share = partitioned_share(results["memory"], results.get("workers", 2))
    if share is not None:
        verdict = "[green]meets[/]" if share["partitioned_mb"] <= share["allowed_mb"] else "[red]misses[/]"
        console.print(
            f"the teacher's share (the job's peak less the hidden job's, which holds only its lm_head): replicated "
            f"{share['replicated_mb']:,.0f} MiB, partitioned over {share['workers']} workers "
            f"{share['partitioned_mb']:,.0f} MiB ({share['partitioned_mb'] / share['replicated_mb']:.2f} of it); "
            f"{verdict} the target <= 1/{share['workers']} of the replicated one plus its working set "
            f"({share['allowed_mb']:,.0f} MiB)")


def partitioned_share(memory: dict[str, Any], workers: int) -> dict[str, Any] | None:
    """The teacher's measured share of a worker's peak, replicated (``online`` less ``hidden``,
    whose worker holds only the teacher's lm_head) and partitioned (:data:`PARTITIONED` less
    ``hidden``), and what the partitioned one may be: 1/``workers`` of the replicated plus the
    teacher's working set as the estimate counts it (its forward, its gathered modules, the
    lm_head copy for the loss). None unless all three jobs ran."""
    rows = [memory.get(k, {}) for k in ("online", PARTITIONED, "hidden")]
    if not all(r.get("status") == "ok" for r in rows):
        return None
    online, partitioned, hidden = (r["peak_rss_mb"] for r in rows)
    parts, whole = memory[PARTITIONED].get("estimate_parts", {}), memory["online"].get("estimate_parts", {})
    gathered = parts.get("teacher (1/N + gathered, ZeRO-3)", 0.0) - whole.get("teacher (replicated)", 0.0) / workers
    working = parts.get("teacher forward", 0.0) + parts.get("teacher lm_head (copy for the loss)", 0.0) + gathered
    replicated = online - hidden
    return {"workers": workers, "replicated_mb": replicated, "partitioned_mb": partitioned - hidden,
            "allowed_mb": replicated / workers + working}
