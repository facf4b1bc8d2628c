#!/usr/bin/env bash
# Install flctl into a venv and run the local federation demo.
# Usage: scripts/demo.sh [flctl demo options...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q >&2 && apt-get install -y -q python3-venv >&2
    else
        echo "python3-venv is missing: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
VENV=${FLCTL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
rm -rf build ./*.egg-info  # setuptools' build/ keeps deleted modules and would ship them
"$VENV/bin/python" -m pip install -q --disable-pip-version-check .
exec "$VENV/bin/flctl" demo "$@"
