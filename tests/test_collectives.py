"""kdray's own collectives (:func:`kdray.train.step.sum_over_ranks`: a step's item counts, its
metrics, replay's validation loss) on the device the process group takes: gloo takes CPU
tensors, NCCL only CUDA ones, so a CPU tensor under NCCL fails every GPU job's first step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.ranks import run_ranks

# A process group whose backend serves CUDA tensors only, as NCCL does: gloo underneath, so it
# runs on a machine without a GPU, registered for "cuda" alone.
_CUDA_ONLY = """
import sys
import torch, torch.distributed as dist
from torch.distributed import Backend, ProcessGroupGloo

from kdray.train.step import collective_device, sum_over_ranks

Backend.register_backend("cudaonly", lambda store, rank, size, timeout: ProcessGroupGloo(store, rank, size, timeout),
                         devices=["cuda"])
dist.init_process_group("cudaonly", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    dist.all_reduce(torch.zeros(1, dtype=torch.float64))
except RuntimeError as e:
    print("cpu tensor:", e)
print("device:", collective_device())
print("one rank:", sum_over_ranks([1.5, 2]))
"""


def test_a_backend_without_cpu_tensors_gets_them_on_its_device(tmp_path):
    res = subprocess.run([sys.executable, "-c", _CUDA_ONLY, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    # What NCCL does with a CPU tensor, and so what the old CPU float64 tensors did on a GPU job.
    assert "cpu tensor: No backend type associated with device type cpu" in res.stdout
    assert "device: cuda\n" in res.stdout
    assert "one rank: [1.5, 2.0]" in res.stdout  # a one-rank group: no collective, the values as floats


def test_sum_over_ranks_without_a_process_group():
    from kdray.train.step import sum_over_ranks

    assert sum_over_ranks([1, 2.5]) == [1.0, 2.5]
    assert sum_over_ranks([]) == []


def _sums(rank: int) -> dict:
    from kdray.train.step import collective_device, sum_over_ranks

    return {"device": str(collective_device()), "sums": sum_over_ranks([1.0, float(rank), 0.25 * (rank + 1)])}


def test_sum_over_ranks_sums_every_rank_on_the_cpu_under_gloo(tmp_path):
    got = run_ranks(_sums, tmp_path, world=3)
    assert got == {"device": "cpu", "sums": [3.0, 3.0, 1.5]}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_under_nccl_the_collectives_run_on_the_gpu(tmp_path):
    import torch
    import torch.distributed as dist

    from kdray.train.step import collective_device

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        device = collective_device()
        tensor = torch.ones(2, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1, dtype=torch.float64))
    finally:
        dist.destroy_process_group()
    assert device.type == "cuda" and tensor.tolist() == [1.0, 1.0]


class _Labels:
    """The one thing :func:`kdray.train.step.step_items` asks of a step objective: a
    micro-batch's items per term."""

    def items(self, batch: dict) -> dict:
        return {"kd": batch["labels"], "ce": batch["labels"] - 1}


def _carried(rank: int) -> dict:
    from kdray.train.step import RankSums, step_items

    carry = RankSums({"loss": 0.5 * (rank + 1), "report_due": float(rank == 0)})
    items = step_items(_Labels(), [{"labels": 3 + rank}, {"labels": 5}], carry)
    own = RankSums({"tokens": 10.0 * (rank + 1)}).sum_now()
    return {"items": items, "carried": carry.summed, "own": own.summed}


def test_a_steps_sums_ride_on_the_next_steps_item_counts(tmp_path):
    got = run_ranks(_carried, tmp_path)
    # items: rank 0 has 3 + 5 labels, rank 1 4 + 5; ce one fewer per micro-batch
    assert got == {"items": {"ce": 13.0, "kd": 17.0}, "carried": {"loss": 1.5, "report_due": 1.0},
                   "own": {"tokens": 30.0}}


def test_without_a_carry_nothing_is_summed_into_it():
    from kdray.train.step import RankSums, step_items

    carry = RankSums({"loss": 2.0})
    assert carry.summed is None
    assert step_items(_Labels(), [{"labels": 4}]) == {"ce": 3.0, "kd": 4.0}
    assert carry.summed is None
    assert step_items(_Labels(), [{"labels": 4}], carry) == {"ce": 3.0, "kd": 4.0}
    assert carry.summed == {"loss": 2.0}  # one rank: the values themselves
