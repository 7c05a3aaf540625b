#!/usr/bin/env bash
# Set up .venv (pinned CPU torch and Flower) and run the linter and the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0 "flwr[simulation]==1.41.0"
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when no test ran; set -e turns that (like any failure) into a failed run.
.venv/bin/python -m pytest -q "$@"
