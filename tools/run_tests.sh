#!/usr/bin/env bash
# README command two: set up (idempotent), then run the test suite. Heavy tests are marked `slow` and left out;
# run them with `tools/run_tests.sh -m slow`. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "${FUSION_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
