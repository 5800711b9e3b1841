#!/bin/sh
# Installs the servers the tests run against, when missing (idempotent):
#   - Debian's `redis-server` (the KV store and cluster tests),
#   - Debian's `prometheus` and `chromium` (needs root and apt; otherwise says what
#     to install and carries on: those tests then fail with a clear message),
#   - Arize Phoenix into the project's venv (the `dashboard` extra).
# Usage: deploy/observability/install-test-deps.sh [path/to/venv]
set -eu
VENV="${1:-.venv}"

missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    else
        echo "install-test-deps: please install:$missing (Debian: apt-get install$missing)" >&2
    fi
fi

if ! "$VENV/bin/python" -c "import phoenix.server.main" >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "arize-phoenix>=8"
fi
