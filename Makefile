# The one place where kiln's commands are written. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYO3_PYTHON := $(abspath $(PY))
# cargo takes --manifest-path after the subcommand: $(call cargo,SUBCOMMAND) ARGS...
cargo = cargo $(1) --manifest-path rust/Cargo.toml
RUST_SRC := $(wildcard rust/src/*.rs rust/src/*/*.rs) rust/Cargo.toml
# Rebuild when the extension is missing even if the stamp says it was built.
EXT_MISSING := $(if $(wildcard python/kiln/_core*.so),,FORCE)
STATE_DIR ?= .state

# Debian packages the tests run for real: PostgreSQL (store tests), Postfix with smtp-source and
# smtp-sink (tests/test_postfix.py), redis-cli (tests/test_resp.py), Lua 5.1 with redis-lua
# (tests/test_kumomta_lua.py), headless Chromium and its driver (tests/test_dashboard.py).
DEB_PACKAGES := postgresql postfix redis-tools lua5.1 lua-redis lua-socket chromium chromium-driver
# Debian's Exim (tests/test_exim.py) from a private copy: exim4-daemon-light unpacked into
# .cache/exim4 with the libraries it links, run with its own configuration (-C). Debian will
# not install Exim beside Postfix (both provide mail-transport-agent), and the tests must
# never touch the machine's own mail setup anyway. Exim runs deliveries as Debian-exim.
EXIM := .cache/exim4/usr/sbin/exim4
EXIM_READY := .cache/exim4/.ready
.PHONY: help system-deps install build-dev build-prod run dist format lint lint-python lint-rust test test-rust test-python bench all clean soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'maturin>=1.7,<2'
	touch $@

system-deps: $(EXIM_READY) ## Debian packages the tests need (apt-get, as root), skipped when present
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(EXIM_READY):
	rm -rf .cache/exim4 .cache/exim4-deb && mkdir -p .cache/exim4-deb
	apt-get update -qq
	cd .cache/exim4-deb && apt-get download -qq -o APT::Sandbox::User=root exim4-daemon-light
	libs=$$(apt-cache depends exim4-daemon-light | awk '$$1 == "Depends:" && $$2 ~ /^lib/ {print $$2}' | sort -u); \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$libs
	dpkg-deb -x .cache/exim4-deb/exim4-daemon-light_*.deb .cache/exim4
	id Debian-exim >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
		--home-dir /nonexistent --shell /usr/sbin/nologin Debian-exim
	$(EXIM) -C /dev/null -bV >/dev/null || { echo "the unpacked exim does not start"; exit 1; }
	touch $@

install: $(VENV)/.installed ## virtualenv with maturin (dependencies come with build-dev)

FORCE:

$(VENV)/.built-dev: $(VENV)/.installed $(RUST_SRC) pyproject.toml $(EXT_MISSING)
	maturin develop --quiet --extras dev
	rm -f $(VENV)/.built-prod
	touch $@

$(VENV)/.built-prod: $(VENV)/.installed $(RUST_SRC) pyproject.toml $(EXT_MISSING)
	maturin develop --quiet --release --extras dev
	rm -f $(VENV)/.built-dev
	touch $@

build-dev: $(VENV)/.built-dev ## build the extension (debug) into the virtualenv, with dev dependencies

build-prod: $(VENV)/.built-prod ## build the extension (release) into the virtualenv

run: build-prod ## build, then start the daemon on the embedded example plan (SQLite in .state)
	$(VENV)/bin/kiln run --state-dir $(STATE_DIR)

dist: $(VENV)/.installed ## release wheel and sdist into dist/ (pip install dist/*.whl; docs/install.md)
	rm -f dist/kiln_warmup-*
	maturin build --quiet --release --interpreter $(PY) --out dist
	maturin sdist --out dist

format: $(VENV)/.built-dev ## ruff fix + format, cargo fmt
	$(PY) -m ruff check --fix python tests benches
	$(PY) -m ruff format python tests benches
	$(call cargo,fmt)

lint-python: build-prod ## ruff, mypy --strict, stubtest on kiln._core
	$(PY) -m ruff check python tests benches
	$(PY) -m ruff format --check python tests benches
	$(PY) -m mypy python tests benches
	$(PY) -m mypy.stubtest kiln._core --allowlist .stubtest-allowlist

lint-rust: $(VENV)/.installed ## cargo fmt --check, clippy with warnings denied
	$(call cargo,fmt) --check
	$(call cargo,clippy) --all-targets --all-features -- -D warnings

lint: lint-python lint-rust ## every linter

test-rust: ## cargo test for the core (no interpreter needed)
	$(call cargo,test)

test-python: build-prod system-deps ## pytest (tests/ and the correctness half of benches/)
	$(PY) -m pytest -q

test: test-rust test-python ## cargo test, then pytest: both languages in one command

bench: build-prod system-deps ## release build, benchmarks, JSON results in benches/results, ratio report
	mkdir -p benches/results
	$(call cargo,bench) --bench core -- --json $(CURDIR)/benches/results/rust.json
	$(PY) -m pytest benches -q -p no:cacheprovider --benchmark-enable --benchmark-only \
		--benchmark-json=benches/results/python.json
	$(PY) benches/memory.py --json benches/results/memory.json
	$(PY) benches/daemon_bench.py --json benches/results/daemon.json
	$(PY) benches/bench_classify.py --json benches/results/classify.json
	$(PY) benches/postfix_bench.py --json benches/results/postfix.json
	$(PY) benches/resp_bench.py --json benches/results/resp.json
	$(call cargo,bench) --bench suppress -- --json $(CURDIR)/benches/results/suppress-core.json
	$(PY) benches/suppress_bench.py --json benches/results/suppress.json
	$(PY) benches/suppress_import_bench.py --json benches/results/suppress_import.json
	$(PY) benches/suppress_restart_bench.py --json benches/results/suppress_restart.json
	$(PY) benches/simulate_bench.py --json benches/results/simulate.json
	$(PY) benches/compare.py benches/results

soak: build-prod ## 10 minute soak of the daemon under everything at once; report in benches/results/soak.json
	mkdir -p benches/results
	$(PY) tests/soak.py --duration 600 --json benches/results/soak.json

all: format lint test ## what CI runs, plus formatting

clean: ## remove build products and the virtualenv
	rm -rf $(VENV) rust/target dist .pytest_cache .mypy_cache .ruff_cache .hypothesis benches/results .cache
