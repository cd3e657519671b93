"""Benchmark: generation throughput of kdray's pools against the bare engines.

It builds a ~25M-parameter Llama (8 layers, hidden 512, head_dim 64, random initialisation;
the toy world's tokenizer) with ``save_pretrained`` into a temporary directory, then has four
variants answer the same toy prompts with the same sampling (temperature 1, top-p 1, a fixed
seed) and *fixed-length* responses (``ignore_eos``: every response is ``--new-tokens`` long,
so every variant generates the same number of tokens):

* ``vllm pool`` -- :func:`kdray.pools.generate` on Ray Data, one replica (``backend: vllm``:
  Ray's batch LLM processor, with kdray's request encoding around it);
* ``bare vllm`` -- ``vllm.LLM.generate`` in a plain process, the same prompts in the same
  batches, the same ``SamplingParams``;
* ``hf pool``   -- :func:`kdray.pools.generate` with ``backend: hf``
  (:class:`kdray.pools.hf.HFGenerator`);
* ``bare hf``   -- ``transformers``' ``model.generate``, left-padded batches, in a plain process.

Each variant runs in its own subprocess (``python -m kdray.bench.generation --worker V``), with
the same intra-op threads (``--threads``; a pool replica reserves as many CPUs). Two figures
per variant, labelled apart: *generating* -- tokens over the time spent generating, start-up
excluded: every batch for a bare engine; for a pool, the batches after the first over the time
from the first batch's arrival in the driver to the last's (Ray Data's hand-offs included) --
and *end to end* -- all tokens over the whole wall time, start-up included (for a pool: Ray
Data, the actor and the model load; for a bare engine: the model load). Targets (issue 5): vLLM pool / HF
generate >= 2x, and the pool's overhead over bare vLLM while generating, ``bare / pool - 1``
in tokens/s, <= 15%; each the median of ``--rounds`` interleaved rounds (:mod:`kdray.bench.interleave`).

The benchmark is a list of sections (:data:`SECTIONS`); each takes the parsed arguments and the
model directory and returns rich renderables and (target, ok) checks, so another section is
one function appended there. Usage: ``kdray bench generation [--quick] [--prompts 256]
[--new-tokens 128] [--check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.bench.interleave import HostLoad, add_rounds_option, interleave, median_row, ratio_summary, resolve_rounds
from kdray.bench.signal import section_topk

VARIANTS = ("vllm_pool", "bare_vllm", "hf_pool", "bare_hf")
LABELS = {"vllm_pool": "vllm pool", "bare_vllm": "bare vllm", "hf_pool": "hf pool", "bare_hf": "bare hf"}
TARGET_SPEEDUP = 2.0
TARGET_OVERHEAD = 0.15
#: The ~25M-parameter shape (3.2M per layer); head_dim 64 suits vLLM's CPU attention.
FULL_SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8}
QUICK_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
HEAD_DIM = 64
MAX_MODEL_LEN = 512


# ----------------------------------------------------------------------------- the model


def build_model(out_dir: Path, shape: dict[str, int], seed: int = 0) -> int:
    """A random-initialised Llama of ``shape`` with the toy tokenizer, saved into ``out_dir``;
    returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdray.toy import build_toy_world

    tok = AutoTokenizer.from_pretrained(build_toy_world().teacher_dir)
    config = LlamaConfig(
        vocab_size=len(tok), head_dim=HEAD_DIM, num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def bench_prompts(n: int) -> list[str]:
    """The first ``n`` held-out toy prompts (repeated if there are fewer)."""
    from kdray.toy import build_toy_world

    rows = build_toy_world().rows("heldout")
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


# ----------------------------------------------------------------------------- workers


def _sampling(args: argparse.Namespace) -> Any:
    from kdray.pools.base import SamplingConfig

    return SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, n=1, seed=0, ignore_eos=True)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def _timed_batches(run_batch: Callable[[list[Any]], int], batches: list[list[Any]]) -> tuple[float, int]:
    """(seconds, tokens) over every batch, run one after another as the pool does."""
    seconds, tokens = 0.0, 0
    for batch in batches:
        t0 = time.perf_counter()
        tokens += run_batch(batch)
        seconds += time.perf_counter() - t0
    return seconds, tokens


def _bare_vllm(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kdray.data.tokenize import prompt_token_ids, uses_chat_template

    s = _sampling(args)
    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, tensor_parallel_size=1,
              enforce_eager=args.enforce_eager, seed=s.seed)
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    ids = prompt_token_ids(tok, prompts, uses_chat_template(tok, "auto"))
    params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                            seed=s.seed, ignore_eos=True)
    lengths: list[int] = []

    def run_batch(batch: list[list[int]]) -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        got = [len(c.token_ids) for o in outs for c in o.outputs]
        lengths.extend(got)
        return sum(got)

    timing = _timed_batches(run_batch, _chunks(ids, args.batch_size))
    return _result(timing, load_s, lengths)


def _bare_hf(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = _sampling(args)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed length: generate past EOS, as ignore_eos does
    load_s = time.perf_counter() - t0
    torch.manual_seed(s.seed)
    lengths: list[int] = []

    def run_batch(batch: list[str]) -> int:
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,
                                 max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id)
        new = out.shape[1] - enc["input_ids"].shape[1]
        lengths.extend([new] * out.shape[0])
        return new * out.shape[0]

    timing = _timed_batches(run_batch, _chunks(prompts, args.batch_size))
    return _result(timing, load_s, lengths)


def _pool(args: argparse.Namespace, prompts: list[str], backend: str) -> dict[str, Any]:
    """The real :func:`kdray.pools.generate`, once, on a Ray of its own, timed by the rows' own
    arrivals (``on_rows``): *generating* is the tokens of every batch after the first over the
    time from the first batch's arrival to the last's (steady state: the engine, Ray Data's
    hand-offs and the driver's reads); *start-up* is the time to the first batch less one
    batch at that rate (Ray Data, the replica, the model load). Needs at least two batches
    arriving apart; else ``gen_s`` is None and only the end-to-end figure stands."""
    import ray

    from kdray.pools import generate
    from kdray.ray_setup import job_env
    from kdray.spec import GenerationSpec, ModelSpec

    rows = [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)]
    arrivals: list[tuple[float, int]] = []  # (perf_counter, rows) per arriving batch
    env = job_env()
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-ray-") as ray_tmp:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), _temp_dir=ray_tmp, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": str(args.threads)}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        model = ModelSpec(model=args.model_dir, backend=backend, dtype="float32", max_model_len=MAX_MODEL_LEN)
        pool = GenerationSpec(replicas=1, batch_size=args.batch_size, num_cpus_per_replica=args.threads,
                              enforce_eager=args.enforce_eager)
        t0 = time.perf_counter()
        out = generate(rows, model, pool, _sampling(args), on_rows=lambda n: arrivals.append((time.perf_counter(), n)))
        total_s = time.perf_counter() - t0
        ray.shutdown()
    lengths = [len(r["response_token_ids"]) for r in out]
    (first_at, first_rows), (last_at, _) = arrivals[0], arrivals[-1]
    steady_rows = len(prompts) - first_rows
    gen_s = last_at - first_at if steady_rows > 0 and last_at > first_at else None
    load_s = (first_at - t0) - (first_rows * gen_s / steady_rows if gen_s else 0.0)
    result = _result((gen_s, steady_rows * args.new_tokens), load_s, lengths)
    result.update(total_s=total_s, total_tokens=len(prompts) * args.new_tokens, batches_seen=len(arrivals),
                  in_order=[r["id"] for r in out] == [r["id"] for r in rows])
    return result


def _result(timing: tuple[float | None, int], load_s: float, lengths: list[int]) -> dict[str, Any]:
    gen_s, tokens = timing
    return {
        "load_s": load_s,
        "gen_s": gen_s,
        "tokens": tokens,
        "total_s": load_s + (gen_s or 0.0),
        "total_tokens": tokens,
        "responses": len(lengths),
        "response_tokens": sorted(set(lengths)),
    }


def _worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    prompts = bench_prompts(args.prompts)
    if args.worker == "bare_vllm":
        result = _bare_vllm(args, prompts)
    elif args.worker == "bare_hf":
        result = _bare_hf(args, prompts)
    else:
        result = _pool(args, prompts, "vllm" if args.worker == "vllm_pool" else "hf")
    if result["response_tokens"] != [args.new_tokens]:
        result["error"] = f"responses are not all {args.new_tokens} tokens long: {result['response_tokens'][:5]}"
    result.update(variant=args.worker, threads=args.threads)
    print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver


def _spawn(args: argparse.Namespace, variant: str, model_dir: str, round_: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "kdray.bench.generation", "--worker", variant, "--model-dir", model_dir,
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--batch-size",
           str(args.batch_size), "--threads", str(args.threads)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    from kdray.pools.base import pool_env
    from kdray.spec import GenerationSpec

    env = {**os.environ, **pool_env(GenerationSpec()), "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"round {round_ + 1}/{args.rounds}: {LABELS[variant]} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"variant": variant, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def _tps(r: dict[str, Any], generating: bool) -> float | None:
    """Tokens/s while generating (start-up excluded), or end to end (start-up included)."""
    if "error" in r:
        return None
    seconds = r["gen_s"] if generating else r["total_s"]
    tokens = r["tokens"] if generating else r.get("total_tokens", r["tokens"])
    return tokens / seconds if seconds else None


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def section_throughput(args: argparse.Namespace, model_dir: str) -> tuple[list[Any], list[tuple[str, bool]]]:
    """Tokens/s of the four variants side by side, and the two ratios against their targets."""
    from rich.table import Table

    rounds = interleave(lambda v, r: _spawn(args, v, model_dir, r), args.variants, args.rounds)
    results = {v: median_row(runs, lambda r: "error" not in r, ["gen_s", "total_s", "load_s"])
               for v, runs in rounds.items()}
    table = Table(title=f"generation throughput: {args.prompts} prompts x {args.new_tokens} new tokens, "
                        f"batch {args.batch_size}, {args.threads} thread(s), {args.model_label}")
    columns = ("variant", "generating tok/s", "end-to-end tok/s", "start-up s", "generating s", "total s",
               "start-up is")
    for col in columns:
        table.add_column(col, justify="left" if col in ("variant", "start-up is") else "right")
    for v, r in results.items():
        if "error" in r:
            table.add_row(LABELS[v], "-", "-", "-", "-", "-", f"unavailable: {r['error']}"[:200])
            continue
        note = ("Ray Data + actor + model load" if v.endswith("pool") else "model load") + (
            "" if r.get("in_order", True) else "; ROWS OUT OF ORDER")
        table.add_row(LABELS[v], _f(_tps(r, True)), _f(_tps(r, False)), _f(r["load_s"], "{:.1f}"),
                      _f(r["gen_s"], "{:.1f}"), _f(r["total_s"], "{:.1f}"), note)

    ratios = Table(title=f"ratios while generating, median of {args.rounds} round(s) (end to end in brackets)")
    for col in ("ratio", "measured", "target", "met"):
        ratios.add_column(col, justify="left" if col == "ratio" else "right")
    checks: list[tuple[str, bool]] = []

    def ratio(name: str, a: str, b: str, target: str, ok: Callable[[float], bool], as_overhead: bool = False) -> None:
        """Per round (a, b interleaved), a's tokens/s over b's (b's over a's, less 1, as an overhead)."""
        num, den = (rounds.get(v, [{"error": "not run"}] * args.rounds) for v in ((b, a) if as_overhead else (a, b)))
        summaries = [ratio_summary([_tps(r, g) for r in num], [_tps(r, g) for r in den]) for g in (True, False)]
        values = [None if sm is None else sm.median - 1 if as_overhead else sm.median for sm in summaries]
        fmt = "{:+.1%}" if as_overhead else "{:.2f}x"
        spread = f", spread {summaries[0].spread:.0%}" if summaries[0] is not None and args.rounds > 1 else ""
        measured = f"{_f(values[0], fmt)}{spread} ({_f(values[1], fmt)})"
        met = None if values[0] is None else ok(values[0])
        ratios.add_row(name, measured, target, "-" if met is None else "yes" if met else "NO")
        if met is not None:
            checks.append((f"{name} {target}: {_f(values[0], fmt)}", met))

    ratio("vllm pool / bare hf generate", "vllm_pool", "bare_hf", ">= 2x", lambda x: x >= TARGET_SPEEDUP)
    ratio("vllm pool / hf pool", "vllm_pool", "hf_pool", ">= 2x", lambda x: x >= TARGET_SPEEDUP)
    ratio("vllm pool overhead vs bare vllm (bare/pool - 1)", "vllm_pool", "bare_vllm", "<= 15%",
          lambda x: x <= TARGET_OVERHEAD, as_overhead=True)
    return [table, ratios], checks


#: The benchmark's sections, in order; each returns (rich renderables, [(target, met)]).
SECTIONS: dict[str, Callable[[argparse.Namespace, str], tuple[list[Any], list[tuple[str, bool]]]]] = {
    "throughput": section_throughput,
    "topk": section_topk,  # kdray.bench.signal
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray bench generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes: a 2-layer model, 24 prompts x 8 tokens, batches of 8, vLLM eager")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default 256)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch, pool and bare alike (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every variant; a pool replica reserves as many CPUs (default 1)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_rounds_option(p, "the variants")
    p.add_argument("--sections", nargs="+", default=None, help=f"sections to run (default all: {', '.join(SECTIONS)})")
    p.add_argument("--model-dir", default=None, help="benchmark this save_pretrained model instead of building one")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``kdray bench generation``; returns the process exit code."""
    args = _parser().parse_args(argv)
    quick = {"prompts": 24, "new_tokens": 8, "batch_size": 8}
    full = {"prompts": 256, "new_tokens": 128, "batch_size": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.enforce_eager = args.enforce_eager or args.quick  # a smoke run skips vLLM's compile
    resolve_rounds(args)
    if args.worker:
        return _worker(args)
    for name in args.sections or []:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
    from rich.console import Console

    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-gen-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            params = build_model(Path(model_dir), QUICK_SHAPE if args.quick else FULL_SHAPE)
            args.model_label = f"random Llama, {params / 1e6:.1f}M params"
        else:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(model_dir)  # fails early on a wrong directory
            args.model_label = model_dir
        checks: list[tuple[str, bool]] = []
        with HostLoad() as load:
            for name in args.sections or list(SECTIONS):
                renderables, section_checks = SECTIONS[name](args, model_dir)
                for item in renderables:
                    console.print(item)
                checks += section_checks
    console.print("targets:" if checks else "targets: none evaluated")
    for text, ok in checks:
        console.print(f"  [{'ok' if ok else 'MISS'}] {text}", highlight=False, markup=False)
    console.print(str(load))
    return 1 if args.check and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    raise SystemExit(run())
