"""What every stage is given: the spec, the job's output directory, where progress goes, and
the job's one prompt encoding."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from kdray.data.artifacts import Artifact, write_dataset
from kdray.data.tokenize import PromptEncoding, job_encoding
from kdray.pools import SamplingConfig, generate
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generator_footprint
from kdray.pools.placement import releasing_placement_groups
from kdray.spec import JobSpec, ModelSpec


T = TypeVar("T")

#: Seconds between two drains of a progress hub while a run goes on.
DRAIN_INTERVAL_S = 0.5


def progress_hub() -> Any:
    """A Ray actor (no CPU) that buffers events (pool batches done, training steps) for the
    driver: ``record.remote(event)`` from anywhere in the cluster, ``drain`` from the driver.
    It lives on the driver's node, whose loss ends the job anyway: anywhere else, losing a
    worker node (a reclaimed spot instance) could take it and with it a job Ray Train would
    otherwise restart from its latest checkpoint."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class ProgressHub:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def record(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def drain(self) -> list[dict[str, Any]]:
            out, self.events = self.events, []
            return out

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressHub.options(scheduling_strategy=here).remote()


def run_draining(fn: Callable[[], Any], hub: Any, on_event: Callable[[dict[str, Any]], None],
                 on_tick: Callable[[], None] | None = None) -> Any:
    """Run the blocking ``fn`` in a thread while passing ``hub``'s events to ``on_event`` in
    this one, calling ``on_tick`` after each drain (every :data:`DRAIN_INTERVAL_S`); return its
    result or re-raise its error here."""
    import ray

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the calling thread below
            box["error"] = exc

    def drain() -> None:
        for event in ray.get(hub.drain.remote()):
            on_event(event)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=DRAIN_INTERVAL_S)
        drain()
        if on_tick is not None:
            on_tick()
    drain()
    if "error" in box:
        raise box["error"]
    return box.get("result")


@dataclass
class StageContext:
    """A job as its stages see it.

    Attributes:
        spec: the validated job spec.
        out: the job's output directory (absolute).
        reporter: a :class:`kdray.pipeline.progress.Reporter` (events, progress bars).
        timings: seconds spent per phase, summed over rounds (filled by :meth:`phase`).
    """

    spec: JobSpec
    out: Path
    reporter: Any
    timings: dict[str, float] = field(default_factory=dict)
    _encoding: PromptEncoding | None = field(default=None, init=False, repr=False)

    def prompt_encoding(self) -> PromptEncoding:
        """The job's prompt encoding (:func:`kdray.data.tokenize.job_encoding`), resolved and
        checked against the teacher on first use (the prepare stage), then the same object for
        every pool and the trainer.

        Raises:
            ModelError: the teacher and the student render a prompt differently, or a tokenizer
                does not load.
        """
        if self._encoding is None:
            self._encoding = job_encoding(self.spec)
        return self._encoding

    @contextmanager
    def phase(self, name: str, total: int | None, detail: str = "") -> Iterator[None]:
        """Report a phase's start, time it, and report its end (unless it raised)."""
        t0 = time.perf_counter()
        self.reporter.phase_start(name, total, detail)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
        self.reporter.phase_end(name, f"{detail} done in {elapsed:.0f}s".strip())

    def write(self, phase: str, build: Callable[[Any], Any], path: Path, kind: str,
              meta: dict[str, Any] | None = None,
              summarise: Callable[[list[Path]], dict[str, Any]] | None = None,
              row_bytes: int | None = None, expect_rows: int | None = None, release: bool = True,
              write_num_cpus: float = LIGHT_NUM_CPUS) -> Artifact:
        """Write the dataset ``build(hub)`` makes into the committed dataset ``path``
        (:func:`kdray.data.artifacts.write_dataset`, which commits it only with ``expect_rows``
        rows when given); its pools report rows to ``hub``, which advance ``phase``'s progress
        as the actors write. With ``release`` the placement groups made meanwhile are removed
        once it is written (:func:`~kdray.pools.placement.releasing_placement_groups`); pools
        running together (:meth:`each_pool`) are released together instead; ``write_num_cpus``:
        what each write task reserves (:func:`~kdray.data.artifacts.write_dataset`), a light
        share by default, since the writes run while the pools hold their CPUs
        (:data:`~kdray.pools.base.LIGHT_NUM_CPUS`)."""
        hub = progress_hub()
        ds = build(hub)
        with releasing_placement_groups() if release else nullcontext():  # the pools' GPUs back to Ray
            return write_dataset(ds, path, kind, meta, summarise=summarise, row_bytes=row_bytes,
                                 expect_rows=expect_rows, num_cpus=write_num_cpus,
                                 run=lambda fn: self._reporting(phase, hub, fn))

    def materialize(self, phase: str, build: Callable[[Any], Any]) -> Any:
        """The dataset ``build(hub)`` makes, executed into Ray's object store (its pools report
        rows to ``hub``, which advance ``phase``'s progress); the placement groups made
        meanwhile are removed once it is (:func:`~kdray.pools.placement.releasing_placement_groups`).

        For a pool's output that goes through an all-to-all step (a group-by): the step's sort
        tasks take a whole CPU each, outside any placement group, while a tensor-parallel
        replica's group keeps its CPUs after its stage is done, so with the group held they
        could wait for a CPU forever. It removes every group this Ray job made meanwhile, so
        it is not for pools running together (:meth:`each_pool`). Returns the materialized
        dataset."""
        hub = progress_hub()
        with releasing_placement_groups():
            return self._reporting(phase, hub, lambda: build(hub).materialize())

    def _reporting(self, phase: str, hub: Any, fn: Callable[[], T]) -> T:
        """``fn()``, run while the rows ``hub`` hears of advance ``phase``'s progress."""
        return run_draining(fn, hub, lambda event: self.reporter.advance(phase, int(event.get("rows", 0))))

    def generate(self, rows: list[dict[str, Any]], model: ModelSpec, label: str, phase: str,
                 sampling: SamplingConfig, score_gold: bool = False,
                 encoding: PromptEncoding | None = None) -> list[dict[str, Any]]:
        """``model``'s answers to ``rows`` through its pool (:func:`kdray.pools.generate`),
        advancing ``phase``'s progress as rows come back. Prompts are encoded with the job's
        encoding (:meth:`prompt_encoding`), whichever model answers, unless ``encoding`` is
        given (the LLM judge's own)."""
        with releasing_placement_groups():
            return self._generate(rows, model, label, phase, sampling, score_gold, encoding)

    def each_pool(self, work: list[tuple[str, ModelSpec]], phase: str,
                  run: Callable[[str, ModelSpec, bool], T]) -> dict[str, T]:
        """``run(label, model, release)`` for each ``(label, model)`` of ``work``, each running
        ``model``'s pool (``release``: whether that call removes its pool's placement groups
        itself): all at once when the cluster's free CPUs and GPUs hold every pool together
        (:func:`fit_together`) and no replica shares a GPU, else one after the other, since
        pools started together on a cluster with room for only some of their replicas could
        each wait for the rest forever. A pool's start-up (actors, model loads) is most of a
        short generation's time. A failing pool's error is raised once the others are done.
        Returns the results by label."""
        from concurrent.futures import ThreadPoolExecutor

        pool = self.spec.generation
        # vLLM engines starting together on one GPU measure each other's loading as their own
        # use and shrink (or fail to find) their KV cache: a GPU share never starts with another.
        shared_gpu = 0 < pool.num_gpus_per_replica < 1
        if len(work) < 2 or shared_gpu or not fit_together([generator_footprint(m, pool) for _, m in work]):
            # each pool's placement groups are removed before the next one starts
            return {label: run(label, model, True) for label, model in work}
        with releasing_placement_groups():
            self.prompt_encoding()  # resolved once, before the threads share it
            self.reporter.message(f"{phase}: {', '.join(label for label, _ in work)} answer at once "
                                  "(the cluster has room for all their pools)")
            with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="kdray-pool") as threads:
                futures = {label: threads.submit(run, label, model, False) for label, model in work}
                return {label: future.result() for label, future in futures.items()}

    def _generate(self, rows: list[dict[str, Any]], model: ModelSpec, label: str, phase: str,
                  sampling: SamplingConfig, score_gold: bool = False,
                  encoding: PromptEncoding | None = None) -> list[dict[str, Any]]:
        self.reporter.message(f"{phase}: {label} answers {len(rows)} prompts ({model.model})")
        return generate(
            rows, model, self.spec.generation, sampling, score_gold=score_gold,
            encoding=self.prompt_encoding() if encoding is None else encoding,
            on_rows=lambda n: self.reporter.advance(phase, n),
        )


def fit_together(footprints: list[dict[str, float]]) -> bool:
    """Whether the Ray cluster's free resources now hold all of ``footprints`` (CPU and GPU
    amounts, :func:`kdray.pools.run.generator_footprint`) at once, with a light task's CPU to
    spare (:data:`kdray.pools.base.LIGHT_NUM_CPUS`: the maps each side of the engines need one
    to run while the actors hold the rest)."""
    import ray

    free = ray.available_resources()
    need = {key: sum(f.get(key, 0.0) for f in footprints) for key in ("CPU", "GPU")}
    need["CPU"] += LIGHT_NUM_CPUS
    return all(need[key] <= free.get(key, 0.0) + 1e-9 for key in need)
