# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detforge-installed
SYSTEM_STAMP := $(VENV)/.detforge-system
# Debian packages the tests need (real servers and tools, never mocked): see docs/architecture.md.
SYSTEM_PACKAGES := mosquitto chromium poppler-utils libturbojpeg0 ffmpeg postgresql openssl

.PHONY: setup system demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

# Installs the missing Debian packages when we are root (CI, containers); elsewhere says what is missing.
system: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): Makefile scripts/install-system-packages.sh | $(STAMP)
	bash scripts/install-system-packages.sh $(SYSTEM_PACKAGES)
	touch $(SYSTEM_STAMP)

demo: setup
	$(VENV)/bin/detforge demo --out demo

test: setup system
	$(PY) -m pytest -n 2 --dist loadfile -q

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: setup system
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
