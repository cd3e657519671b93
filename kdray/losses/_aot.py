"""The compiled chunk kernels, built ahead of time: AOTInductor packages made in a subprocess
and run through torch's C++ package loader, so the process computing the loss never imports
TorchDynamo or TorchInductor.

``torch.compile`` in the training process cost it about 137 MiB of resident memory for good
(TorchDynamo, TorchInductor and the compiled code; ``kdray bench losses``: 768 against 631 MiB
before the step's own buffers, with the same kernel) and compiled on its first step. Here a
kernel is exported (``torch.export``, the chunk's rows and the vocabulary symbolic) and
compiled by ``torch._inductor.aoti_compile_and_package`` in a child process
(``python -m kdray.losses._compiled``), once per machine: the package lands in a cache directory
and every later process, on any rank, only loads it
(``torch._C._aoti.AOTIModelPackageLoader``, the loader behind
``torch._inductor.aoti_load_package`` without that module's imports; a loaded package adds
about 2 MiB). See PyTorch's AOTInductor documentation
(https://docs.pytorch.org/docs/stable/torch.compiler_aot_inductor.html).

The cache is ``kernels/`` in the node-local compile cache (``$KDRAY_LOCAL_CACHE_DIR``, else
``~/.cache/kdray``), one directory per torch version and processor (a package is built for the
machine's instruction set), a package per kernel and version of kdray's kernel code
(:data:`SOURCES`); it may be deleted at any time. Concurrent processes build a package once (a
lock file beside it); a package appears by rename, whole or not at all. Each build deletes the
packages unused for 30 days (:func:`prune`), so older versions' packages do not pile up.

Errors: :class:`KernelBuildError` (a ``RuntimeError``) when a package cannot be built or
loaded (no C++ compiler on a CPU host, an old Triton), naming the cause from the build's
output.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kdray.caches import local_cache_dir

#: The module whose ``python -m`` builds a package (it calls :func:`main`; kept by name, so
#: that this module imports nothing of the kernels it builds).
BUILDER = "kdray.losses._compiled"

#: Seconds a package build may take (two kernels compile in 10-30 s on a 2-core CPU).
BUILD_TIMEOUT_S = 900
#: Seconds after its last load that a package is deleted (:func:`prune`): 30 days.
PRUNE_AFTER_S = 30 * 86400

_loaded: dict[str, Any] = {}
_loading = threading.Lock()
#: The packages this process built (the others it found in the cache, or another process built).
built: list[Path] = []
log = logging.getLogger("kdray.losses")


class KernelBuildError(RuntimeError):
    """A compiled chunk kernel could not be built or loaded here; ``hint`` says what to install
    when the build itself failed ("" when the message names the fix)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _toolchain_hint(device: torch.device) -> str:
    return ("on GPU, TorchInductor needs Triton (it comes with CUDA builds of torch)" if device.type == "cuda"
            else "on CPU, TorchInductor needs a C++ compiler (g++, or CXX naming one)")


def cache_root() -> Path:
    """The package cache: ``kernels/`` in the node-local compile cache
    (:func:`kdray.caches.local_cache_dir`: ``$KDRAY_LOCAL_CACHE_DIR``, else ``~/.cache/kdray``)."""
    return Path(local_cache_dir()) / "kernels"


@functools.cache
def _machine(device: torch.device) -> str:
    """What a package is built for: the torch version and the processor (CPU model and the
    instruction set torch uses; a GPU's compute capability). Once per device and process:
    :func:`load` runs for every chunk, and ``/proc/cpuinfo`` need not be read each time."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"cuda-sm{major}{minor}"
    else:
        model = ""
        try:
            model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "")
        except OSError:
            pass
        where = f"{device.type}-{torch.backends.cpu.get_cpu_capability()}-{model}"
    return f"torch-{torch.__version__}-{where}"


#: The modules whose code a kernel is built from: a change to any of them (a fix to the math,
#: another TorchInductor option) builds new packages instead of loading stale ones.
SOURCES = ("_core.py", "_kernels.py", "_compiled.py", "_aot.py")


@functools.cache
def _source_digest() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in SOURCES)).hexdigest()


def package_path(key: dict[str, Any], device: torch.device) -> Path:
    """Where the package of kernel ``key`` (a JSON-able dict: pass, divergence, constants,
    dtype, which parameters are per row) lives for ``device``, as built from this kdray's
    :data:`SOURCES`."""
    machine = _machine(device)
    digest = hashlib.sha256(json.dumps([machine, _source_digest(), key], sort_keys=True).encode()).hexdigest()[:20]
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in machine)
    return cache_root() / label / f"{key['pass']}-{key['kind']}-{digest}.pt2"


def load(key: dict[str, Any], device: torch.device) -> Any:
    """The loaded package of kernel ``key`` on ``device``, built first if the cache lacks it.
    Its ``run(list of tensors)`` returns the kernel's outputs as a list. Raises
    :class:`KernelBuildError`."""
    path = package_path(key, device)
    loaded = _loaded.get(f"{path}:{device}")
    if loaded is not None:
        return loaded
    if not path.exists():
        _build(key, device, path)
    else:
        try:  # its modification time is its last use: packages unused for PRUNE_AFTER_S go
            os.utime(path)
        except OSError:
            pass  # a cache this process may only read
    index = -1  # the CPU
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    with _loading:  # one load at a time, so the directories that appear are this load's
        unpacked = _unpacked_dirs()
        try:
            loaded = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        except (AttributeError, RuntimeError) as exc:
            raise KernelBuildError(f"loading {path} (delete it to build it again): {exc}") from None
        if device.type == "cpu":
            # The loader unpacks the package into a directory of its own under $TMPDIR and
            # removes it at a clean exit only: each worker that Ray kills (a cancelled job's)
            # would leave 1.6 MB behind. On CPU the package is its shared library, now mapped
            # (an unlinked file stays mapped), and sources; on a GPU its kernels' binaries
            # load on first run.
            for directory in _unpacked_dirs() - unpacked:
                shutil.rmtree(directory, ignore_errors=True)
    _loaded[f"{path}:{device}"] = loaded
    return loaded


def _unpacked_dirs() -> set[str]:
    """The directories of AOTInductor packages this process has loaded, as the mapped files'
    paths in ``/proc/self/maps`` name them (``$TMPDIR/aotinductor_XXXXXX``; none off Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line for line in maps if "/aotinductor_" in line]
    except OSError:
        return set()
    dirs = set()
    for line in lines:
        path = line.split(maxsplit=5)[-1]
        end = path.find("/", path.index("/aotinductor_") + 1)
        if end > 0:
            dirs.add(path[:end])
    return dirs


def _build(key: dict[str, Any], device: torch.device, path: Path) -> None:
    """Build ``path`` in a child process, under a lock shared with other processes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as exc:
        raise KernelBuildError(f"the kernel cache {path.parent} is not writable ({exc}); point "
                               "KDRAY_LOCAL_CACHE_DIR at a writable local disk") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if path.exists():
            return
        log.warning("kdray: building the fused loss's kernel %s (once per machine and kdray version, "
                    "10-30 s; training.compile_loss: false skips it)", path)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # the packager wants .pt2
        cmd = [sys.executable, "-m", BUILDER, json.dumps(key), str(device), str(tmp)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise KernelBuildError(f"building {path} took over {BUILD_TIMEOUT_S} s") from None
        if res.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            cause = _cause(res.stderr) or f"the build exited with {res.returncode}"
            raise KernelBuildError(f"building {path}: {cause}", hint=_toolchain_hint(device))
        os.replace(tmp, path)
        built.append(path)
    prune(cache_root())


def prune(root: Path, older_than_s: float | None = None) -> list[Path]:
    """Delete the packages under ``root`` that no process has loaded for ``older_than_s``
    seconds (default :data:`PRUNE_AFTER_S`; a load touches its package), with their lock files:
    those of earlier kdray or torch versions, which nothing loads again. Run after each build,
    so the cache holds what its node used lately. Returns the packages deleted."""
    cutoff = time.time() - (PRUNE_AFTER_S if older_than_s is None else older_than_s)
    gone = []
    for package in root.glob("*/*.pt2"):
        try:
            if package.stat().st_mtime < cutoff:
                package.unlink()
                package.with_suffix(".lock").unlink(missing_ok=True)
                gone.append(package)
        except OSError:
            pass  # gone already (another process pruned it), or not ours to delete
    return gone


def _cause(stderr: str) -> str:
    """The last error line of a failed build's output (Python's exception line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":", 1)[0]]
    return (errors or lines or [""])[-1][:500]


def main(export: Any) -> int:
    """The build's child process (``python -m BUILDER KEY_JSON DEVICE OUT``): ``export(key,
    device, out)`` exports and compiles one kernel into the package ``out``."""
    key, device, out = json.loads(sys.argv[1]), torch.device(sys.argv[2]), sys.argv[3]
    export(key, device, out)
    return 0
