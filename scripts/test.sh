#!/usr/bin/env bash
# Installs the project with its test tools into .venv (CPU torch from this machine's wheel), runs the linter,
# the formatter check and the type checker (the same as .pre-commit-config.yaml), then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # schemas, worker, api_client (pyproject.toml [tool.mypy])
# Three pytest-xdist workers (DG_TEST_WORKERS): most slow tests wait on worker subprocesses, so three
# share two cores well; each worker is its own session with its own PostgreSQL database, Redis database
# number and tiny model (tests/conftest.py). DG_TEST_WORKERS=0 runs in one process.
# --dist worksteal: the CLI and worker-subprocess tests take 10-50 s each and sit together in the
# collection order; with the default `load` one worker got most of them and ended 85 s after the
# others, while an idle worker that steals half of a busy one's queue ends with them (a 2-core
# machine: 611 s against 520 s, both before the one-thread change in tests/conftest.py).
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider -n "${DG_TEST_WORKERS:-3}" --dist worksteal "$@"
