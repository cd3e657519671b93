"""``kdray bench scale``: the data plane of a job at N and 8N rows, side by side.

For each teacher-signal mode (``topk``: k = 20 uint32 ids at Qwen2.5's vocabulary of 152,064;
``hidden``: H = 3584 in bfloat16, at fewer rows) and each size, one subprocess with its own
local Ray runs the real data plane: a responses dataset (synthetic token ids of realistic
length, made by Ray Data tasks) → the teacher's records, made by a scorer actor pool and
encoded in the actors with the job's encoder (:func:`kdray.data.records.encode_signal`), written
with the job's writer (:func:`kdray.data.artifacts.write_dataset`) → Ray Train workers that
stream the job's training dataset (:func:`kdray.stages.train.training_dataset`) through the
job's collate function (:class:`kdray.data.examples.CollateExamples`). Records are random and
no optimizer step runs: this measures what the data costs (``kdray bench train``: the steps).

Printed per variant: the driver's peak RSS (``VmHWM`` after ``clear_refs``, with
``MALLOC_MMAP_THRESHOLD_=131072`` so freed buffers go back to the OS), the object store's peak
use (polled) and the bytes it spilled, bytes per response token on disk, and rows/s through the
workers' ingest; per mode, the driver's slope in bytes per row between N and 8N (when it grew
by more than the runs' noise), the object store's peak at 8N over its peak at N, and each
phase's own object-store peak and seconds (responses, records, training ingest).

``--compare-with DIR`` runs the same variants on another kdray checkout (e.g. ``git worktree add
/tmp/kdray-old <commit>``) with that checkout's data flow (records gathered in the driver, one
parquet file, ``from_items``, a materialised tokenized dataset), so a change to the data plane is
measured against the code before it in one invocation. Targets: a driver slope <= 2 KB per
row in every mode; an object-store peak that does not grow with N (8N / N <= 1.5); nothing
spilled at 8N."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kdray.bench.scale_targets import print_results

VOCAB, K, HIDDEN = 152_064, 20, 3584  # Qwen2.5's vocabulary (uint32 ids); Qwen2.5-7B's hidden size
PROMPT_TOKENS = (16, 64)
MICRO_BATCH, WORKERS = 8, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8000, help="N, top-k rows (default 8000)")
    p.add_argument("--factor", type=int, default=8, help="the larger size is factor x N (default 8)")
    p.add_argument("--hidden-divisor", type=int, default=64, help="hidden mode runs N / this many rows (default 64)")
    p.add_argument("--response-tokens", type=int, default=512, help="longest response (default 512; lengths vary "
                   "from half of it)")
    p.add_argument("--modes", default="topk,hidden", help="teacher-signal modes (default topk,hidden)")
    p.add_argument("--object-store-mb", type=int, default=512, help="each variant's object store (default 512 MiB: "
                   "Ray Data's budget, half of it, is smaller than the records at N and at 8N, as a cluster's store "
                   "is smaller than a real job's data; a store the N run does not fill compares unlike runs)")
    p.add_argument("--check", action="store_true", help="exit 1 when this checkout misses a target")
    p.add_argument("--compare-with", default=None, help="another kdray checkout to measure the same way")
    p.add_argument("--out", default=None, help="keep the variants' files here (default: a temporary directory)")
    p.add_argument("--variant", nargs=4, metavar=("MODE", "ROWS", "OUT", "STORE_MB"), help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=512, help=argparse.SUPPRESS)
    return p


# -- what runs in a variant's subprocess (with either checkout on the path) -------------------

def _lengths(i: int, response_tokens: int) -> tuple[int, int]:
    import numpy as np

    rng = np.random.default_rng(i)
    return int(rng.integers(*PROMPT_TOKENS)), int(rng.integers(response_tokens // 2, response_tokens + 1))


def synthetic_examples(batch: dict[str, Any], response_tokens: int) -> dict[str, Any]:
    """Ray Data task: row numbers → compact examples of random ids (``key``, ``input_ids``,
    ``prompt_len``), and the text columns an older kdray tokenizes (``prompt``,
    ``response_token_ids``, ``finish_reason`` ``length``: no EOS is added)."""
    import numpy as np

    keys, ids, starts, prompts, responses = [], [], [], [], []
    for i in batch["id"]:
        n_prompt, n_response = _lengths(int(i), response_tokens)
        rng = np.random.default_rng(10_000_000 + int(i))
        seq = rng.integers(5, VOCAB, n_prompt + n_response).astype(np.int32)
        keys.append(f"row-{int(i)}#0")
        ids.append(seq)
        starts.append(n_prompt)
        prompts.append(f"question {int(i)}")
        responses.append(seq[n_prompt:])
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # noqa: E731  (ragged rows)
    n = len(keys)
    return {"key": obj(keys), "id": obj([k.split("#")[0] for k in keys]), "sample_index": np.zeros(n, np.int64),
            "input_ids": obj(ids), "prompt_len": np.asarray(starts, np.int32), "prompt": obj(prompts),
            "response": obj([""] * n), "response_token_ids": obj(responses), "finish_reason": obj(["length"] * n)}


class SyntheticScorer:
    """Ray Data actor standing in for the teacher's scorer pool: random records of the real
    size per row (``n`` response tokens); with ``meta`` encoded in the actor as a job's scorer
    does (:func:`kdray.data.records.encode_signal`), without as float arrays (an older kdray
    gathered those in the driver)."""

    def __init__(self, mode: str, meta: dict[str, Any] | None):
        self.mode, self.meta = mode, meta

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from kdray.data.records import encode_signal

        records = []
        for key, ids, start in zip(batch["key"], batch["input_ids"], batch["prompt_len"]):
            n = len(ids) - int(start)
            rng = np.random.default_rng(abs(hash(str(key))) % 2**32)
            if self.mode == "topk":
                lps = np.sort(np.log(rng.dirichlet(np.ones(K), n).astype(np.float32) + 1e-9), axis=1)[:, ::-1]
                records.append({"topk_ids": rng.integers(0, VOCAB, (n, K)).astype(np.int32),
                                "topk_logprobs": np.ascontiguousarray(lps)})
            else:
                records.append({"hidden": rng.standard_normal((n, HIDDEN), dtype=np.float32)})
        out = {k: v for k, v in batch.items() if k in ("key", "input_ids", "prompt_len")}
        if self.meta is None:
            for column in records[0]:
                out[column] = np.array([r[column] for r in records] + [None], dtype=object)[:-1]
            return out
        encoded = [encode_signal(r, self.meta) for r in records]
        out["n_tokens"] = np.asarray([e["n_tokens"] for e in encoded], np.int32)
        for column in records[0]:
            out[column] = np.array([e[column] for e in encoded] + [None], dtype=object)[:-1]
        return out


def ingest_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stream the shard through the collate function, count what arrives."""
    import ray.train
    import torch

    from kdray.data.examples import CollateExamples

    shard = ray.train.get_dataset_shard("train")
    collate = CollateExamples(0, config["meta"])
    rows = tokens = 0
    t0 = time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=MICRO_BATCH, collate_fn=collate):
        rows += int(batch["input_ids"].shape[0])
        tokens += int(torch.count_nonzero(batch["attention_mask"]))
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - t0}))


def _store_stats() -> tuple[int, int]:
    """(object store bytes in use, bytes spilled so far), summed over the cluster (what ``ray
    memory --stats-only`` reads)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # this variant's own Ray (another may run on the host)
    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return int(stats.object_store_bytes_used), int(stats.spilled_bytes_total)


def _data_budget() -> int:
    """The object-store bytes one Ray Data execution may hold by default: its limit fraction
    (``RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION``, 0.5 in Ray 2.60) of the cluster's store."""
    import ray

    fraction = float(os.environ.get("RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION", 0.5))
    return int(fraction * ray.cluster_resources().get("object_store_memory", 0))


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _meta(mode: str) -> dict[str, Any]:
    if mode == "topk":
        return {"format": 1, "mode": "topk", "teacher": "synthetic", "vocab_size": VOCAB, "k": K, "id_dtype": "<u4"}
    return {"format": 1, "mode": "hidden", "teacher": "synthetic", "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "hidden_dtype": "bfloat16"}


def _records_after(mode: str, n: int, out: Path, response_tokens: int,
                   mark: Any) -> tuple[Any, dict[str, Any], int, int]:
    """This checkout's data flow: datasets written by actors, streamed to the workers."""
    import ray.data
    from kdray.data.artifacts import write_dataset
    from kdray.data.records import record_bytes_per_token
    from kdray.pools.base import LIGHT_NUM_CPUS
    from kdray.pools.run import pool_map
    from kdray.spec import GenerationSpec as Pool
    from kdray.stages.teacher_signal import record_tokens
    from kdray.stages.train import ordered_ingest, training_dataset

    meta = _meta(mode)
    longest = PROMPT_TOKENS[1] + response_tokens
    responses = write_dataset(ray.data.range(n).map_batches(synthetic_examples, fn_kwargs={
        "response_tokens": response_tokens}, batch_format="numpy", num_cpus=0.5), out / "responses", "responses",
        row_bytes=16 * longest)  # as the job sizes them (kdray.stages.generate.row_bytes)
    mark("responses")

    row_bytes = (record_bytes_per_token(mode, k=K, vocab_size=VOCAB, hidden_size=HIDDEN, hidden_dtype="bfloat16")
                 + 4) * longest  # as the job's scorer pool runs and its writer sizes files
    records = write_dataset(pool_map(responses.read(["key", "input_ids", "prompt_len"]), SyntheticScorer, Pool(
        replicas=2, num_cpus_per_replica=0.5, batch_size=32), "scorer", row_bytes=row_bytes, mode=mode, meta=meta),
        out / "records", "records", meta, summarise=record_tokens, row_bytes=row_bytes,
        num_cpus=LIGHT_NUM_CPUS)  # as a stage writes (kdray.stages.context.StageContext.write)
    mark("records")
    return training_dataset(records, None, meta), {"train": ordered_ingest()}, int(records.info["bytes"]), \
        int(records.info["tokens"])


def _records_before(mode: str, n: int, out: Path, response_tokens: int,
                    mark: Any) -> tuple[Any, dict[str, Any], int, int]:
    """An older checkout's data flow: rows and records back in the driver, one parquet file
    written and read back whole, ``from_items`` and a materialised tokenized dataset."""
    import numpy as np
    import ray.data

    from kdray.data.records import read_signal_records, write_signal_records
    from kdray.pipeline.progress import Reporter
    from kdray.spec import parse_spec
    from kdray.stages.context import StageContext
    from kdray.stages.train import tokenized_dataset

    meta = _meta(mode)
    meta.pop("format")
    rows = []  # the teacher's responses, held by the driver as the older generate stage did
    for batch in ray.data.range(n).map_batches(synthetic_examples, fn_kwargs={"response_tokens": response_tokens},
                                               batch_format="numpy", num_cpus=0.5).iter_batches(batch_format="numpy"):
        for i in range(len(batch["key"])):
            rows.append({"id": str(batch["id"][i]), "sample_index": 0, "prompt": str(batch["prompt"][i]),
                         "response": "", "finish_reason": "length",
                         "response_token_ids": [int(t) for t in batch["response_token_ids"][i]]})
    records = [None] * n  # the older score_teacher: every record back in the driver, in row order
    ds = ray.data.from_items([{"_row": i, "key": f"{r['id']}#0", "input_ids": np.concatenate(
        [np.zeros(_lengths(i, response_tokens)[0], np.int32), np.asarray(r["response_token_ids"], np.int32)]),
        "prompt_len": _lengths(i, response_tokens)[0]} for i, r in enumerate(rows)])
    ds = ds.map_batches(SyntheticScorer, fn_constructor_kwargs={"mode": mode, "meta": None}, batch_size=32,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    columns = ("topk_ids", "topk_logprobs") if mode == "topk" else ("hidden",)
    for batch in ds.iter_batches(batch_format="numpy"):
        for i in range(len(batch["key"])):
            records[int(str(batch["key"][i]).split("-")[1].split("#")[0])] = {c: batch[c][i] for c in columns}
    mark("responses and records in the driver")
    path = out / "records.parquet"
    stats = write_signal_records(path, [f"{r['id']}#0" for r in rows], records, meta)
    del records
    signal = read_signal_records(path)
    spec = parse_spec({"name": "scale", "output_dir": str(out), "teacher": {"model": "toy:teacher"},
                       "student": {"model": "toy:student"}, "data": {"train": "toy:train", "heldout": "toy:heldout",
                                                                      "chat_template": "never"},
                       "training": {"num_workers": WORKERS, "max_seq_len": PROMPT_TOKENS[1] + response_tokens + 8}})
    ctx = StageContext(spec, out, Reporter(None))
    ds = tokenized_dataset(ctx, rows, ["prompt", "response", "finish_reason", "response_token_ids"], signal)
    mark("records file, tokenized dataset")
    return ds, {}, int(stats["bytes"]), int(stats["tokens"])


def run_variant(mode: str, n: int, out: Path, response_tokens: int, store_mb: int) -> dict[str, Any]:
    """One variant in this process: the driver's peak RSS from here on, the object store's
    peak (polled), spilled bytes, bytes/token on disk and ingest rows/s."""
    import importlib.util

    import ray
    from ray.data import DataContext
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A Ray of its own (address "local": not another one running on this host), its temp dir
    # under /tmp: its socket paths must stay within 107 bytes
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, object_store_memory=store_mb * 2**20,
             _temp_dir=tempfile.mkdtemp(prefix="kdray-scale-"), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    Path("/proc/self/clear_refs").write_text("5")
    base_rss = _peak_rss()
    peak = {"store": 0, "phase": 0}  # the whole variant's, the current phase's
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                used = _store_stats()[0]
                peak["store"], peak["phase"] = max(peak["store"], used), max(peak["phase"], used)
            except Exception:  # Ray went down (the variant failed): its own error says why
                return
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    flow = "datasets" if importlib.util.find_spec("kdray.data.artifacts") else "driver"  # which checkout
    build = _records_after if flow == "datasets" else _records_before
    phases: list[dict[str, Any]] = []
    since = [t0]  # when the current phase began

    def mark(name: str) -> None:
        used, spilled = _store_stats()
        now = time.perf_counter()
        phases.append({"phase": name, "store_peak_bytes": peak["store"], "phase_store_peak_bytes": peak["phase"],
                       "store_used_bytes": used, "spilled_bytes": spilled, "driver_peak_bytes": _peak_rss(),
                       "seconds": now - since[0]})
        peak["phase"], since[0] = used, now

    ds, options, disk_bytes, tokens = build(mode, n, out, response_tokens, mark)
    meta = _meta(mode)
    TorchTrainer(ingest_loop, train_loop_config={"meta": meta, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=WORKERS), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name=f"scale-{mode}-{n}", storage_path=str(out / "ray_train")),
                 datasets={"train": ds}, dataset_config=DataConfig(execution_options=options or None)).fit()
    stop.set()
    poller.join()
    mark("training ingest")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"mode": mode, "rows": n, "flow": flow, "driver_peak_bytes": _peak_rss(), "driver_base_bytes": base_rss,
            "store_peak_bytes": peak["store"], "spilled_bytes": _store_stats()[1], "disk_bytes": disk_bytes,
            "data_budget_bytes": _data_budget(),
            "tokens": tokens, "bytes_per_token": disk_bytes / max(tokens, 1),
            "ingest_rows": sum(r["rows"] for r in ranks),
            "ingest_rows_per_s": sum(r["rows"] for r in ranks) / max(max(r["seconds"] for r in ranks), 1e-9),
            "seconds": time.perf_counter() - t0, "phases": phases}


# -- the parent: variants side by side ---------------------------------------------------------

def _spawn(checkout: Path | None, mode: str, n: int, out: Path, response_tokens: int, store_mb: int) -> dict[str, Any]:
    # Imported here, in the parent only: a copy of this file run against another checkout
    # (--compare-with) imports that checkout's kdray, which may predate the name.
    from kdray.ray_setup import TRAIN_POLL_INTERVAL_S

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(TRAIN_POLL_INTERVAL_S),
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "kdray.bench.scale"]
    if checkout is not None:  # the other checkout's kdray, this file's measurements
        env["PYTHONPATH"] = str(checkout)
        copy = out / "scale_bench.py"
        copy.write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
        command = [sys.executable, str(copy)]
    res = subprocess.run([*command, "--variant", mode, str(n), str(out), str(store_mb), "--tokens", str(response_tokens)],
                         env=env, capture_output=True, text=True)
    (out / "stderr.log").write_text(res.stderr, encoding="utf-8")
    result = out / "result.json"
    if res.returncode != 0 or not result.exists():
        errors = [line for line in res.stderr.splitlines() if "Error" in line and "Warning" not in line]
        return {"mode": mode, "rows": n, "error": "\n".join(errors[:3])[-1500:] + f" (all of it: {out / 'stderr.log'})"}
    return json.loads(result.read_text())


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.variant:
        mode, n, out = args.variant[0], int(args.variant[1]), Path(args.variant[2])
        result = run_variant(mode, n, out, args.tokens, int(args.variant[3]))
        (out / "result.json").write_text(json.dumps(result))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("kdray bench scale needs Linux /proc (VmHWM, clear_refs)", file=sys.stderr)
        return 2
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdray-bench-scale-"))
    checkouts: list[tuple[str, Path | None]] = [("this", None)]
    if args.compare_with:
        checkouts.insert(0, ("compared", Path(args.compare_with).resolve()))
    results = []
    for label, checkout in checkouts:
        for mode in args.modes.split(","):
            base = args.rows if mode == "topk" else max(args.rows // args.hidden_divisor, 4)
            for n in (base, base * args.factor):
                r = _spawn(checkout, mode, n, root / label / f"{mode}-{n}", args.response_tokens, args.object_store_mb)
                r["checkout"] = label
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "error"}) if "error" not in r
                      else f"{label} {mode} {n}: failed: {r['error'][-400:]}", flush=True)
    missed = print_results(results, args.factor)
    (root / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {root / 'scale.json'}")
    if any("error" in r for r in results if r["checkout"] == "this"):
        return 1
    return 1 if args.check and "this" in missed else 0


if __name__ == "__main__":
    sys.exit(run())
