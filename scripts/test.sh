#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: system packages (when
# root), a venv with flctl installed as users install it (a wheel, not an
# editable checkout) and its test tools, then ruff and pytest.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-torch: the lab hosts' admin-installed PyTorch, which layered agents
# (inventory `python: /usr/bin/python3`) train with. chromium: `flctl report`'s
# page is checked in a real headless browser; tmux: `flctl top` in a terminal;
# faketime: a lab host with a skewed clock for `flctl doctor`.
DEBIAN_PACKAGES=(python3-venv sudo openssh-server nftables wireguard-tools wireguard-go iproute2 iputils-ping
                 python3-torch chromium tmux faketime)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
fi

VENV=${FLCTL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
rm -rf build ./*.egg-info  # setuptools' build/ keeps deleted modules and would ship them
# Not editable: the tests, the CLI they start and every deploy they run use
# the installed copy, so what passes here is what `pip install flctl` gives.
# torch 2.13.0 is the CPU build (an unpinned torch would pull a CUDA build of
# several GB); flctl.torch's tests and the PyTorch example use it
"$VENV/bin/python" -m pip install -q --disable-pip-version-check '.[test,torch,safetensors,report,tensorboard,mlflow,prometheus]' 'torch==2.13.0'

"$VENV/bin/ruff" check flctl tests scripts
set +e
# pytest's own script (not `python -m pytest`, which would put this checkout's
# flctl/ first on sys.path); tests/test_install.py checks the import.
FLCTL_EXPECT_INSTALLED=1 "$VENV/bin/pytest" -q "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$status"
