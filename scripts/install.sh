#!/usr/bin/env bash
# Install everything dmore-nova and its test suite need on Debian 12 (run as root from the checkout).
# Idempotent: a second run only checks. Set DMORE_SKIP_APT=1 to skip the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(python3-venv python3-dev gcc git
          chromium xvfb tigervnc-viewer tigervnc-tools vncsnapshot xdotool
          qemu-system-x86 libxen-dev)
if [ "${DMORE_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,jpeg]'

# noVNC (ES modules, loaded straight from a test page) and playwright-core (drives Debian's
# chromium; no browser download).
if [ ! -f tests/js/node_modules/@novnc/novnc/core/rfb.js ] || \
   [ ! -d tests/js/node_modules/playwright-core ]; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "install.sh: ok"
