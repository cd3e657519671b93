"""The environment every kdray Ray process gets (kdray.ray_setup.job_env)."""

from __future__ import annotations

import os
import subprocess
import sys

from kdray.ray_setup import extensions_dir, job_env


def test_compile_caches_are_node_local_whatever_kdray_cache_dir_is(tmp_path, monkeypatch):
    from kdray.pools.base import pool_env
    from kdray.spec import GenerationSpec

    for name in ("TORCH_EXTENSIONS_DIR", "KDRAY_LOCAL_CACHE_DIR", "VLLM_CACHE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    shared = tmp_path / "shared-cache"  # a KDRAY_CACHE_DIR on NFS, for the toy world
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(shared))
    env = job_env()
    assert env["KDRAY_CACHE_DIR"] == str(shared)
    home = os.path.expanduser("~/.cache/kdray")
    assert env["KDRAY_LOCAL_CACHE_DIR"] == home
    assert env["TORCH_EXTENSIONS_DIR"] == extensions_dir(home)
    assert pool_env(GenerationSpec())["VLLM_CACHE_ROOT"] == os.path.join(home, "vllm")
    for value in (env["TORCH_EXTENSIONS_DIR"], pool_env(GenerationSpec())["VLLM_CACHE_ROOT"]):
        assert not value.startswith(str(shared))
    monkeypatch.setenv("KDRAY_LOCAL_CACHE_DIR", str(tmp_path / "local"))
    assert job_env()["TORCH_EXTENSIONS_DIR"].startswith(str(tmp_path / "local" / "torch_extensions") + "/py")
    assert pool_env(GenerationSpec())["VLLM_CACHE_ROOT"] == str(tmp_path / "local" / "vllm")


def test_ray_train_polls_the_workers_at_least_twice_per_report_interval(monkeypatch):
    """A worker's report waits in a one-slot queue until Ray Train's next poll: polled at half
    the workers' metrics report interval or faster, a metrics report does not wait; the driver's
    own value wins."""
    from kdray.ray_setup import TRAIN_POLL_INTERVAL_S
    from kdray.train.worker import REPORT_INTERVAL_S

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert 0 < float(job_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) == TRAIN_POLL_INTERVAL_S <= REPORT_INTERVAL_S / 2
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    assert job_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"


def test_the_drivers_toy_build_ids_travel_with_the_job_env(monkeypatch):
    from kdray.toy import BUILD_ID_ENVS

    for name in BUILD_ID_ENVS.values():
        monkeypatch.delenv(name, raising=False)
        assert name not in job_env()
    monkeypatch.setenv(BUILD_ID_ENVS["toy"], "abc123")
    monkeypatch.setenv(BUILD_ID_ENVS["grammar"], "def456")
    assert job_env()[BUILD_ID_ENVS["toy"]] == "abc123" and job_env()[BUILD_ID_ENVS["grammar"]] == "def456"


def test_each_python_environment_gets_its_own_extension_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("KDRAY_LOCAL_CACHE_DIR", str(tmp_path))
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


def test_a_driver_prints_rays_warnings_but_not_its_notices_about_how_kdray_drives_it():
    script = """
import logging
from kdray.ray_setup import RAY_NOTICES, quiet_ray_notices
quiet_ray_notices()
quiet_ray_notices()  # idempotent: one filter per handler
# made after the call, as ray.data.llm makes its loggers when a processor first runs
from ray.llm._internal.common.utils import download_utils
for notice in RAY_NOTICES:
    logging.getLogger("ray._private.worker").warning(notice + " (a notice)")
    download_utils.logger.info(notice + " (a notice)")
logging.getLogger("ray._private.worker").warning("kept: a worker's warning")
download_utils.logger.info("kept: ray.llm's own line")
import warnings
from kdray.ray_setup import RAY_DATA_WARNING
warnings.warn(RAY_DATA_WARNING + "'MapBatches(_call_cached)' is set to 2 (a notice)", UserWarning)
warnings.warn("kept: another warning", UserWarning)
print(sum(len(h.filters) for h in logging.getLogger("ray").handlers))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if " -- " in line]
    assert "(a notice)" not in done.stderr
    assert [line.split(" -- ", 1)[1] for line in lines] == ["kept: a worker's warning", "kept: ray.llm's own line"]
    assert done.stdout.split()[-1] == "1"  # PlainRayHandler had none of its own
    assert "UserWarning: kept: another warning" in done.stderr
