# One command per habit; CI (.ci/run) calls the same tools.
PY ?= python3

.PHONY: build test test-rust lint bench demo compat

build:            ## build the extension in release mode into the active venv
	maturin develop --release

test: test-rust   ## pytest under fork, spawn and forkserver, plus the core's cargo tests
	$(PY) -m pytest

test-rust:
	cargo test --release

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	ruff check python tests benches
	cd /tmp && $(PY) -m mypy.stubtest ferromp._core

bench:            ## ferromp vs the stdlib, full run
	$(PY) benches/bench.py

demo:             ## the short side-by-side demo of README command (1)
	$(PY) benches/bench.py --quick

compat:           ## CPython's own multiprocessing tests against ferromp (all 9 runs)
	sh ../shared/compat/run_baseline.sh ferromp compat-out --timeout 60
