"""Several gloo ranks in spawned processes, for tests of what DeepSpeed and torch.distributed
do across workers without Ray: a file rendezvous (no TCP port to race for on a busy machine),
and a failing rank's traceback shown by the test instead of a wait for its result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


def _rank_main(body: Callable[[int], Any], rank: int, world: int, store: str, results: Any) -> None:
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        out = body(rank)
        results.put((rank, out if rank == 0 else None))  # every rank says it got through its body
    except BaseException:
        results.put((rank, traceback.format_exc()))  # the parent shows why, instead of waiting
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(body: Callable[[int], Any], tmp_path: Path, *, world: int = 2, timeout: float = 300) -> Any:
    """``body(rank)`` on ``world`` spawned processes, each a gloo rank of one process group
    (``body`` must be importable: a module-level function); returns what rank 0's returned,
    or fails the test with the first failing rank's traceback."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(body, rank, world, str(tmp_path / "store"), results))
             for rank in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[int, Any] = {}
    while len(outcomes) < world:
        rank, got = results.get(timeout=timeout)
        if isinstance(got, str):
            pytest.fail(f"rank {rank} failed:\n{got}")
        outcomes[rank] = got
    for p in procs:
        p.join(timeout=120)
    exits = [p.exitcode for p in procs]
    # Every body returned; a rank that then did not end cleanly (its process group's teardown,
    # the interpreter's exit) is named with its exit code (negative: the signal).
    assert exits == [0] * world, f"every rank's body returned, but the processes ended with exit codes {exits}"
    return outcomes[0]
