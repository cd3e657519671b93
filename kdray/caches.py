"""The node-local compile cache: where kdray and the libraries it drives keep what they build on
each node (torch extensions, vLLM's compiled graphs, the fused loss's kernels). It imports
nothing from kdray, so the pure packages (:mod:`kdray.losses`) may use it."""

from __future__ import annotations

import os


def local_cache_dir() -> str:
    """``$KDRAY_LOCAL_CACHE_DIR``, else ``~/.cache/kdray``: the node-local root of compile caches
    (torch extensions, vLLM's ``VLLM_CACHE_ROOT``, :mod:`kdray.losses._aot`'s kernels), never
    ``KDRAY_CACHE_DIR``, which a cluster may put on shared storage. Set it to a local disk where
    the home directory is shared (NFS)."""
    return os.environ.get("KDRAY_LOCAL_CACHE_DIR") or os.path.expanduser("~/.cache/kdray")
