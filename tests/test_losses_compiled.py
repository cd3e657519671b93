"""The fused path's compiled chunk kernel (kdray.losses._compiled, built ahead of time by
kdray.losses._aot): the same values and gradients as the float64 reference and the eager
kernel, no new build when a scalar parameter changes, no compiler in the computing process, and
a real compilation failure (no C++ compiler) falling back to eager.

Each compiled variant costs seconds of TorchInductor time once per machine (its package is
cached), so this module covers the kernel's structure (parameters as tensors, per-token α, the
mixture gradient, the values-only pass and backward's recomputation) on a few divergences; every
divergence's math is the eager kernel's own (kdray.losses._kernels.kernel), checked in
tests/test_losses_fused.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kdray.losses as L
from kdray.losses import _compiled
from kdray.losses._compiled import COMPILE_MIN_VOCAB, use_compiled
from kdray.losses.chunking import chunk_rows, chunk_working_set_bytes
from kdray.losses._core import make_spec

pytestmark = pytest.mark.usefixtures("one_thread")

N, HS, HT, V = 23, 8, 12, 40
CASES = [
    ("jsd", {"beta": 0.3}),
    # per-token α (a [N] tensor) and the gradient through the student inside the mixture
    ("skew_reverse_kl", {"alpha": "per-token", "detach_mixture_student": False}),
]


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    hs, ws, bs = mk(N, HS).requires_grad_(True), mk(V, HS, scale=0.6).requires_grad_(True), mk(V, scale=0.3)
    ht, wt, bt = mk(N, HT), mk(V, HT, scale=0.6), mk(V, scale=0.3)
    mask = torch.rand(N, generator=g) > 0.25
    return hs, ws, bs.requires_grad_(True), ht, wt, bt, mask


def _kw(kw):
    alpha = torch.linspace(0.05, 0.5, N) if kw.get("alpha") == "per-token" else kw.get("alpha")
    return {**kw, **({"alpha": alpha} if alpha is not None else {})}


def _run(kind, kw, dtype, compiled, reduction):
    hs, ws, bs, ht, wt, bt, mask = _inputs(dtype)
    out = L.fused_linear_divergence(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, divergence=kind,
                                    reduction=reduction, temperature=1.7, mask=mask, chunk_size=7,
                                    compiled=compiled, **_kw(kw))
    weights = torch.arange(1.0, N + 1, dtype=out.dtype)  # a non-uniform upstream gradient for "none"
    loss = out if reduction == "token_mean" else (out * weights).sum()
    return (out.detach(), *torch.autograd.grad(loss, (hs, ws, bs)))


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
@pytest.mark.parametrize("kind,kw", CASES, ids=[c[0] for c in CASES])
def test_compiled_kernel_matches_the_float64_reference_and_the_eager_kernel(kind, kw, reduction):
    # float64 through the compiled kernel against the dense float64 reference (autograd)
    hs, ws, bs, ht, wt, bt, mask = _inputs(torch.float64)
    dense = L.DIVERGENCES[kind](hs @ ws.t() + bs, ht @ wt.t() + bt, temperature=1.7, **_kw(kw))
    dense = torch.where(mask, dense, 0.0)
    dense = dense.sum() / mask.sum() if reduction == "token_mean" else dense
    weights = torch.arange(1.0, N + 1, dtype=torch.float64)
    ref = (dense.detach(), *torch.autograd.grad(dense if reduction == "token_mean" else (dense * weights).sum(),
                                                (hs, ws, bs)))
    got = _run(kind, kw, torch.float64, True, reduction)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # float32: compiled and eager agree to rounding
    for a, b in zip(_run(kind, kw, torch.float32, True, reduction), _run(kind, kw, torch.float32, False, reduction)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # bfloat16 weights: the logits are upcast copies (no reused buffers); the same code path
    for a, b in zip(_run(kind, kw, torch.bfloat16, True, reduction), _run(kind, kw, torch.bfloat16, False, reduction)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert _compiled._state["broken"] is None  # the compiled kernel ran: no fallback to eager


def test_a_new_alpha_or_temperature_reuses_the_compiled_code(monkeypatch):
    """DistiLLM's adaptive α and POCL's temperature change between steps: they are inputs of
    the compiled kernels, not constants, so a new value builds and loads nothing. A one-row
    chunk (23 = 11 + 11 + 1 rows) runs eager, with the same result."""
    from kdray.losses import _aot

    hs, ws, bs, ht, wt, bt, mask = _inputs(torch.float32)

    def step(alpha, temperature, compiled=True):
        hs.grad = ws.grad = None
        out = L.fused_linear_divergence(hs, ws, ht, wt, divergence="skew_forward_kl", alpha=alpha,
                                        reduction="token_mean", temperature=temperature, chunk_size=11,
                                        compiled=compiled)
        out.backward()
        return out.detach(), hs.grad.clone(), ws.grad.clone()

    before = set(_aot._loaded)
    step(0.1, 1.0)
    loaded = dict(_aot._loaded)
    assert len(set(loaded) - before) == 2  # the row pass and the gradient pass

    def no_build(*args):
        raise AssertionError("a new value built a kernel")

    monkeypatch.setattr(_aot, "_build", no_build)
    for alpha, temperature in ((0.35, 2.0), (0.05, 1.25)):
        for a, b in zip(step(alpha, temperature), step(alpha, temperature, compiled=False)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert _aot._loaded == loaded and _compiled._state["broken"] is None


def test_two_processes_build_a_kernel_once_and_never_import_the_compiler(tmp_path):
    """The kernels are built in a child process and loaded as AOTInductor packages: a process
    running the loss imports neither TorchDynamo nor TorchInductor (about 137 MiB resident,
    ``kdray bench losses``). Two processes that need the same kernels at once (two ranks on a
    node, an empty cache) build each package once, whole."""
    script = textwrap.dedent("""
        import sys, torch
        import kdray.losses as L
        from kdray.losses import _aot, _compiled
        hs, ws = torch.randn(9, 4, requires_grad=True), torch.randn(30, 4, requires_grad=True)
        out = L.fused_linear_divergence(hs, ws, torch.randn(9, 6), torch.randn(30, 6), divergence="jsd", beta=0.3,
                                        reduction="token_mean", chunk_size=4, compiled=True)
        out.backward()
        assert _compiled._state["broken"] is None and len(_aot._loaded) == 2, _compiled._state
        print(len(_aot.built), sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
    """)
    env = dict(os.environ, KDRAY_LOCAL_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    assert all(rc == 0 for _, rc in results), results
    built, imported = zip(*(out.split(" ", 1) for (out, _), _ in results))
    assert sorted(map(int, built)) in ([0, 2], [1, 1]) and set(imported) == {"[]\n"}, results
    # the user sees each build on stderr (Python's last-resort handler prints a WARNING line)
    assert sum(err.count("building the fused loss's kernel") for (_, err), _ in results) == 2, results
    files = sorted(p.name for p in (tmp_path / "kernels").rglob("*") if p.is_file())
    packages = [f for f in files if f.endswith(".pt2")]
    assert len(packages) == 2 and not any(".tmp" in f for f in files), files  # no half-written package


def test_a_killed_process_leaves_no_unpacked_kernel_behind(tmp_path):
    """torch's package loader unpacks a package into ``$TMPDIR/aotinductor_XXXXXX`` and removes
    it only at a clean exit; Ray kills a cancelled job's workers (SIGKILL), and each left 1.6 MB
    per package behind. kdray removes the unpacked files once the library is mapped: a process
    killed after its loss (still right) leaves nothing under its TMPDIR."""
    script = textwrap.dedent("""
        import os, signal, torch
        import kdray.losses as L
        from kdray.losses import _aot
        hs, ws = torch.randn(9, 4, requires_grad=True), torch.randn(30, 4, requires_grad=True)
        ht, wt = torch.randn(9, 6), torch.randn(30, 6)
        out = [L.fused_linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=0.3, reduction="token_mean",
                                         chunk_size=4, compiled=c) for c in (True, False, True)]
        torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[2], out[1], rtol=1e-5, atol=1e-6)  # loaded and run again
        print("LOADED", len(_aot._loaded), len(_aot._unpacked_dirs()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, TMPDIR=str(tmp)), timeout=600)
    assert res.returncode == -signal.SIGKILL and "LOADED 2 2" in res.stdout, res.stdout + res.stderr[-3000:]
    assert list(tmp.iterdir()) == []


def test_packages_unused_for_a_month_are_pruned_with_their_locks(tmp_path):
    from kdray.losses import _aot

    machine = tmp_path / "torch-0.0-cpu-old"
    machine.mkdir()
    stale, fresh = machine / "rows-jsd-aaaa.pt2", machine / "rows-jsd-bbbb.pt2"
    for package in (stale, fresh):
        package.write_bytes(b"pt2")
        package.with_suffix(".lock").touch()
    month_ago = time.time() - _aot.PRUNE_AFTER_S - 60
    os.utime(stale, (month_ago, month_ago))
    assert _aot.prune(tmp_path) == [stale]
    assert sorted(p.name for p in machine.iterdir()) == ["rows-jsd-bbbb.lock", "rows-jsd-bbbb.pt2"]
    assert _aot.prune(tmp_path) == []


def test_after_a_failed_compilation_a_chunk_runs_eager_in_parts_of_the_eager_size():
    """A chunk sized for the compiled kernel (two buffers) runs through the eager kernel (about
    eight) in parts, each part's gradient written over its rows: the same values and gradient."""
    from kdray.losses._kernels import value_and_grad, value_and_grad_in_parts

    g = torch.Generator().manual_seed(3)
    zs, zt, up = torch.randn(10, V, generator=g), torch.randn(10, V, generator=g), torch.rand(10, generator=g)
    spec = make_spec("skew_reverse_kl", (10,), torch.device("cpu"), alpha=torch.linspace(0.1, 0.4, 10),
                     detach_mixture_student=False)
    whole_v, whole_g = value_and_grad(spec, [zs.clone(), zt.clone()], 1.3, up)
    logits = [zs.clone(), zt.clone()]
    parts_v, parts_g = value_and_grad_in_parts(spec, logits, 1.3, up, rows=3)  # 3 + 3 + 3 + 1 rows
    assert logits == [] and parts_g.shape == (10, V)
    torch.testing.assert_close(parts_v, whole_v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts_g, whole_g, rtol=1e-6, atol=1e-7)
    values, none = value_and_grad_in_parts(spec, [zs.clone(), zt.clone()], 1.3, None, rows=4)
    assert none is None and torch.allclose(values, whole_v, rtol=1e-6)


def test_auto_compiles_from_the_large_vocabularies_and_sizes_its_chunk():
    jsd = make_spec("jsd", (4,), torch.device("cpu"), beta=0.5)
    akl = make_spec("adaptive_kl", (4,), torch.device("cpu"), mu=0.5)
    assert not use_compiled(None, jsd, COMPILE_MIN_VOCAB - 1) and use_compiled(None, jsd, COMPILE_MIN_VOCAB)
    assert use_compiled(True, jsd, 50) and not use_compiled(False, jsd, 128_256)
    assert not use_compiled(True, akl, 128_256)  # its sort stays eager
    with pytest.raises(ValueError, match="compiled must be True, False or None"):
        use_compiled("yes", jsd, 50)
    # two live buffers instead of about eight, together 1.5 times the lm_head gradient
    assert chunk_rows(2048, 128_256, None) == 49 and chunk_rows(2048, 128_256, None, True, hidden=256) == 192
    assert chunk_rows(16, 128_256, None, True, hidden=896) == 16 and chunk_rows(2048, 128_256, 5, True, 256) == 5
    assert chunk_rows(2048, 128_256, None, True, hidden=32) == 49  # a small student's: never below eager's
    assert chunk_working_set_bytes(2048, 128_256, 256, compiled=True) == 2 * 4 * 192 * 128_256
    assert chunk_working_set_bytes(2048, 128_256, 256, compiled=True, upcast=True) == 10 * 192 * 128_256
    assert chunk_working_set_bytes(2048, 128_256, 256, compiled=False) == 8 * 4 * 49 * 128_256


def test_without_a_cxx_compiler_it_warns_once_and_gives_the_eager_result(tmp_path):
    """A real failure: TorchInductor is pointed at a C++ compiler that does not exist (and
    kdray and TorchInductor at empty kernel caches), in a fresh process."""
    script = textwrap.dedent("""
        import warnings, torch
        import kdray.losses as L
        from kdray.losses import _compiled
        torch.manual_seed(0)
        hs, ws = torch.randn(9, 4, requires_grad=True), torch.randn(30, 4, requires_grad=True)
        ht, wt = torch.randn(9, 6), torch.randn(30, 6)
        def loss(compiled):
            out = L.fused_linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", reduction="token_mean",
                                            chunk_size=4, compiled=compiled)
            return (out.detach(), *torch.autograd.grad(out, (hs, ws)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallen = [loss(True) for _ in range(2)]
        eager = loss(False)
        assert all(torch.equal(a, b) for run in fallen for a, b in zip(run, eager))
        failed = [w for w in caught if "the fused loss's compiled kernel failed" in str(w.message)]
        messages = [str(w.message) for w in failed]
        assert len(messages) == 1, messages
        assert _compiled._state["broken"] and "compiled=False" in messages[0] and "C++ compiler" in messages[0]
        assert failed[0].filename == "<string>", failed[0].filename  # at the caller's line, not kdray's
        print("OK", messages[0])
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               KDRAY_LOCAL_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_an_unwritable_kernel_cache_warns_naming_the_fix_and_leaves_the_logits(tmp_path, monkeypatch):
    from kdray.losses._compiled import compiled_chunk

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KDRAY_LOCAL_CACHE_DIR", str(blocker))  # kernels/ cannot be made under a file
    monkeypatch.setitem(_compiled._state, "broken", None)
    spec = make_spec("reverse_kl", (4,), torch.device("cpu"))
    zs, zt = torch.randn(4, V), torch.randn(4, V)
    logits = [zs.clone(), zt]
    with pytest.warns(RuntimeWarning, match=r"kernel cache .*a-file/kernels.* is not writable.*KDRAY_LOCAL_CACHE_DIR") \
            as caught:
        assert compiled_chunk(spec, logits, 1.0, torch.ones(4)) is None
    assert "compiler" not in str(caught[0].message) and caught[0].filename == __file__  # no toolchain hint
    assert torch.equal(logits[0], zs) and not use_compiled(True, spec, V)  # untouched; eager from now on


def test_a_compiled_jsd_chunk_holds_no_buffer_beyond_its_two_logits():
    """JSD's log-mixture feeds two sums; by TorchInductor's default it became a third ``[C, V]``
    buffer (62.6 MiB a chunk at C = 128, V = 128,256). ``INDUCTOR_OPTIONS`` has it recomputed:
    a warm chunk's peak resident memory grows by less than a tenth of one ``[C, V]`` buffer. In
    a fresh process, with glibc returning freed large blocks (``MALLOC_MMAP_THRESHOLD_``)."""
    script = textwrap.dedent("""
        import gc, torch
        from kdray.losses._compiled import compiled_chunk
        from kdray.losses._core import make_spec
        def kib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
        C, V = 32, 32768
        spec = make_spec("jsd", (C,), torch.device("cpu"), beta=0.5)
        zs, zt = torch.randn(C, V), torch.randn(C, V)
        growth = []
        for _ in range(3):
            logits = [zs.clone(), zt]
            gc.collect()
            open("/proc/self/clear_refs", "w").write("5")
            before = kib("VmRSS")
            v, g = compiled_chunk(spec, logits, 1.3, torch.ones(C))
            growth.append(kib("VmHWM") - before)
            assert g is not None and torch.isfinite(v).all()
        print("GROWTH_KIB", growth[-1], "BUFFER_KIB", C * V * 4 // 1024)
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "GROWTH_KIB" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    growth, buffer = (int(x) for x in res.stdout.split()[1::2])
    assert growth < buffer / 10, f"a warm compiled JSD chunk grew the peak by {growth} KiB; one [C, V] buffer is {buffer} KiB"
