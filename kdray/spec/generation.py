"""The ``generation`` section: sampling, and the size and placement of every pool's replicas
(teacher, student samples, the judge, the teacher's scorer), CPUs, GPUs and vLLM's memory share."""

from __future__ import annotations

from pydantic import Field, model_validator

from kdray.spec.base import RestartCount, _Spec

#: vLLM's own default ``gpu_memory_utilization`` (``vllm.config.CacheConfig``): what a replica
#: that reserves a whole GPU per engine worker gets.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
#: Restarts of a pool replica whose process died, by default (``max_replica_restarts``).
MAX_REPLICA_RESTARTS = 3
#: The smallest share of a GPU a replica may reserve (Ray counts resources in 1e-4 units; a
#: model needs more than that of a GPU's memory).
MIN_GPU_SHARE = 0.01


class GenerationSpec(_Spec):
    """Sampling, and the sizing of every generation pool: teacher, student samples, the judge and
    the teacher's scorer."""

    sampling_temperature: float = Field(
        1.0,
        ge=0.0,
        description="Sampling temperature of generated responses (0 = greedy). Distinct from "
        "objective.kd_temperature, which softens logits inside the loss.",
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Nucleus sampling: sample from the smallest set of tokens whose probability "
        "reaches top_p (1: off).",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest generated response, in tokens.")
    n: int = Field(1, ge=1, description="Responses generated per prompt.")
    seed: int = Field(0, description="Sampling seed: the same seed gives the same responses.")
    replicas: int = Field(1, ge=1, description="Generation actors (model replicas) in the pool.")
    num_gpus_per_replica: float = Field(
        0.0, ge=0.0, description="GPUs each replica reserves from Ray: 0 on CPU hosts; otherwise "
        "tensor_parallel_size (a whole GPU per shard), or with tensor_parallel_size 1 a fraction of "
        "one GPU (0.5: two replicas share a GPU; see gpu_memory_utilization)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallelism: GPUs one replica's model is sharded over. "
        "backend: hf needs 1."
    )
    num_cpus_per_replica: float = Field(
        0.5,
        gt=0.0,
        description="CPUs each replica reserves while its stage runs. The stage's other tasks (reads, "
        "request encoding, writes) take 0.25 CPU each beside the replicas, so leave at least that much "
        "of the cluster free.",
    )
    batch_size: int = Field(
        64, ge=1, description="Prompts per batch handed to a replica (Ray Data map_batches batch_size)."
    )
    enforce_eager: bool = Field(
        False,
        description="Skip vLLM's torch.compile and CUDA graphs: quicker start-up, slower "
        "steady state. Worth it for tiny models and short jobs (the CPU demo).",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0,
        description="vLLM's gpu_memory_utilization: the fraction of each GPU's memory one replica's "
        "engine may take (weights, activations, KV cache). Default: 0.9 × the replica's share of a GPU "
        "(num_gpus_per_replica / tensor_parallel_size, at most 1), so replicas that Ray places on one "
        "GPU fit together (two replicas of 0.5 GPU: 0.45 each). At most that share. GPU replicas of "
        "backend vllm only (CPU replicas size their KV cache with VLLM_CPU_KVCACHE_SPACE).",
    )
    max_replica_restarts: RestartCount = Field(
        MAX_REPLICA_RESTARTS,
        ge=-1,
        description="Times Ray restarts a pool replica whose process died before the job fails, "
        "naming the cause: vLLM ends an engine on a fatal error (GPU out of memory, a CUDA or NCCL "
        "fault, a model it cannot run), and a crash or a lost node ends any replica. A restarted "
        "replica retries its batches. -1 restarts forever (Ray Data's default, under which an "
        "error every start meets left the job running for good), 0 fails at the first death.",
    )

    @property
    def gpu_share(self) -> float:
        """The fraction of one GPU each of a replica's engine workers reserves (0 on CPU)."""
        return self.num_gpus_per_replica / self.tensor_parallel_size

    def vllm_gpu_memory_utilization(self) -> float | None:
        """What the replicas' vLLM engines get as ``gpu_memory_utilization``: the spec's value,
        else :data:`VLLM_GPU_MEMORY_UTILIZATION` × :attr:`gpu_share`; None on CPU replicas."""
        if not self.num_gpus_per_replica:
            return None
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return round(VLLM_GPU_MEMORY_UTILIZATION * self.gpu_share, 4)

    @model_validator(mode="after")
    def _gpus_cover_tp(self) -> "GenerationSpec":
        # An engine worker uses one GPU or a fraction of one (small models sharing a GPU); vLLM's
        # Ray executor asks a whole GPU for each tensor-parallel worker, and Ray takes no
        # fraction above 1. More GPUs than shards would be reserved and never used.
        tp, gpus = self.tensor_parallel_size, self.num_gpus_per_replica
        if not gpus or gpus == tp or (tp == 1 and MIN_GPU_SHARE <= gpus < 1):
            return self
        if gpus < MIN_GPU_SHARE:
            raise ValueError(f"num_gpus_per_replica ({gpus:g}) is too small a share of a GPU to hold a model; "
                             f"give at least {MIN_GPU_SHARE}, or 0 for CPU replicas")
        fraction = " (or, with tensor_parallel_size 1, a fraction of one GPU)" if tp == 1 else ""
        raise ValueError(
            f"num_gpus_per_replica ({gpus:g}) does not match tensor_parallel_size ({tp}): each shard of a "
            f"replica runs on one whole GPU, so set num_gpus_per_replica to {tp}{fraction}")

    @model_validator(mode="after")
    def _replicas_sharing_a_gpu_fit(self) -> "GenerationSpec":
        util = self.gpu_memory_utilization
        if util is None:
            return self
        if not self.num_gpus_per_replica:
            raise ValueError(
                f"gpu_memory_utilization ({util}) is set but num_gpus_per_replica is 0 (CPU replicas, whose "
                "vLLM sizes its KV cache with VLLM_CPU_KVCACHE_SPACE); remove it, or give the replicas GPUs")
        together = int(1 / self.gpu_share + 1e-9)  # engines Ray may place on one GPU
        if together * util > 1 + 1e-9:
            raise ValueError(
                f"gpu_memory_utilization ({util}) is too much for replicas of {self.gpu_share:g} GPU: Ray may place "
                f"{together} of them on one GPU, which would claim {together * util:.0%} of its memory, and the "
                f"later ones would fail to start. Set it to at most {1 / together:.4g} (or leave it out: "
                f"{VLLM_GPU_MEMORY_UTILIZATION} × the share), or reserve more of a GPU per replica")
        return self
