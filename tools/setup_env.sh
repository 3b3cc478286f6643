#!/usr/bin/env bash
# Idempotent set-up used by both README commands: Debian packages, a virtual environment in .venv, the pinned
# Python packages of requirements.txt, torch-scatter (built from source against torch) and this project, editable,
# with its compiled ops. A second run with nothing changed returns in about a second.
#
# Environment: FUSION_VENV (default <repo>/.venv), PYTHON (default python3.11, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSION_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-$(command -v python3.11 || command -v python3)}"
cd "$ROOT"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages: open3d needs libusb-1.0-0 to import, and GL/EGL libraries for headless rendering.
debian_packages=(libusb-1.0-0 libgl1 libegl1 libgomp1)
missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        "${sudo_cmd[@]}" apt-get update >/dev/null
        "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
    }
fi

# 2. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PY_BOOT"
    "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

# 3. Python packages and the compiled ops, redone only when a pinned file or an op source changed.
stamp_file="$VENV/.fusion_setup_stamp"
stamp="$(cat requirements.txt setup.py "$0" cuda_ops/csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    log "installing pinned Python packages into $VENV (first run: ~10 min, torch-scatter compiles from source)"
    "${PIP[@]}" install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
    # torch first, pinned: the CPU wheel. An unpinned torch would pull several GB of CUDA packages.
    "${PIP[@]}" install "torch==2.13.0" "numpy==1.26.4"
    "${PIP[@]}" install -r requirements.txt
    # torch-scatter has no wheel for this torch: it compiles against the installed torch (pip caches the wheel).
    "${PIP[@]}" install --no-build-isolation "torch-scatter==2.1.2"
    log "building the compiled ops (fusion.cuda_ops._C)"
    "${PIP[@]}" install --no-build-isolation --no-deps -e .
    echo "$stamp" > "$stamp_file"
fi

# 4. A quick check that the environment imports, so a broken install fails here and not in the middle of a job.
# Run from / so that the repository's own folders are not on sys.path.
(cd / && "$PY" - <<'EOF'
import importlib.util, sys
for name in ("torch", "torch_scatter", "spconv.pytorch", "open3d", "nuscenes", "lightning", "fusion"):
    if importlib.util.find_spec(name.split(".")[0]) is None:
        sys.exit(f"[setup] {name} is not importable after set-up")
spec = importlib.util.find_spec("datasets")
if spec is not None and "site-packages" not in (spec.origin or ""):
    sys.exit(f"[setup] the install created a top-level `datasets` module ({spec.origin}); it must be fusion.datasets")
EOF
)
