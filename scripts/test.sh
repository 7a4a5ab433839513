#!/usr/bin/env bash
# The test suite (the README's second command). Runs as root: the engine tests start real sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench scripts
.venv/bin/ruff format --check --quiet src tests bench scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest -q --durations=25 "$@"
