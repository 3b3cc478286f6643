#!/usr/bin/env bash
# README command one: set up (idempotent), then run the main job on the embedded default data (synthetic
# nuScenes-format drives generated here, no download). Extra arguments go to tools/main.py (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec "${FUSION_VENV:-$ROOT/.venv}/bin/python" tools/main.py "$@"
