"""Light per-row work (tokenizing rows, encoding requests) as Ray Data *tasks* that keep their
callable in the worker process.

An ``ActorPoolStrategy`` starts fresh processes for every stage that uses one: each imports
torch and transformers and loads its tokenizer again (~7-14 CPU-seconds apiece on CPU hosts),
on the path of every job, before the first row moves. Ray reuses its worker processes across
tasks, so a task that finds its callable already built in the process (:func:`map_light`) pays
that once per worker process for the whole job, and the prepare stage's tasks have usually
paid it already. Concurrency stays bounded (``concurrency``) as the actor pool's size bounded it.
"""

from __future__ import annotations

import pickle
from typing import Any

#: Callables built in this worker process, by (class, pickled constructor arguments).
_BUILT: dict[tuple[type, bytes], Any] = {}
#: How many built callables a worker process keeps (the oldest goes first).
MAX_BUILT = 8


def cached_instance(cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``, built once per worker process for equal arguments (compared by their
    pickled bytes: the arguments are small settings, never data)."""
    key = (cls, pickle.dumps(kwargs))
    found = _BUILT.get(key)
    if found is None:
        if len(_BUILT) >= MAX_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        found = _BUILT[key] = cls(**kwargs)
    return found


def _call_cached(batch: Any, *, cls: type, kwargs: dict[str, Any]) -> Any:
    return cached_instance(cls, kwargs)(batch)


def map_light(ds: Any, cls: type, kwargs: dict[str, Any], *, num_cpus: float, concurrency: int | None = None,
              **map_kwargs: Any) -> Any:
    """``ds.map_batches`` running the callable class ``cls(**kwargs)`` in Ray tasks, each worker
    process building it once (:func:`cached_instance`); ``concurrency`` bounds the tasks at once
    (None: as many as ``num_cpus`` each lets run), through Ray Data's ``TaskPoolStrategy`` (its
    ``concurrency`` argument is deprecated since Ray 2.51). ``map_kwargs``: the other
    ``map_batches`` options (``batch_size``, ``batch_format``)."""
    from ray.data import TaskPoolStrategy

    return ds.map_batches(_call_cached, fn_kwargs=dict(cls=cls, kwargs=kwargs), num_cpus=num_cpus,
                          compute=TaskPoolStrategy(size=concurrency or None), **map_kwargs)
