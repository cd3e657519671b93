"""The environment every kdray Ray process gets (kdray.ray_setup.job_env)."""

from __future__ import annotations

import subprocess
import sys

from kdray.ray_setup import extensions_dir, job_env


def test_each_python_environment_gets_its_own_extension_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path))
    here = job_env()["TORCH_EXTENSIONS_DIR"]
    assert here == extensions_dir(str(tmp_path))
    assert here.startswith(str(tmp_path / "torch_extensions") + "/py")
    # Another interpreter prefix (a venv made from this Python) gets another directory.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    other = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sys, hashlib; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:8])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert not here.endswith(other)
    # A value the user set wins.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/opt/ext")
    assert job_env()["TORCH_EXTENSIONS_DIR"] == "/opt/ext"
