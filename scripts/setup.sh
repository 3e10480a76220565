#!/usr/bin/env bash
# Set up everything the demo and the tests need, on a fresh machine; cheap when already done.
#   - Mosquitto and its command-line clients (Debian packages) when missing
#   - Chromium (Debian package) when missing: the status page's browser test drives it headless
#   - stunnel4 (Debian package) when missing: the Kafka TLS tests put it in front of the Tansu broker
#   - Prometheus and promtool (Debian package prometheus) when missing: the alert rules' tests and the
#     Prometheus end-to-end test (tests/integration/test_alerts.py, tests/e2e/test_prometheus.py)
#   - .venv with the gateway (editable) and its dev dependencies, incl. nats-server and the Tansu broker
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
apt_install() {
    echo "setup: installing $* (Debian packages)" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

{ have mosquitto && have mosquitto_pub; } || apt_install mosquitto mosquitto-clients
have chromium || apt_install chromium
{ have stunnel4 || have stunnel; } || apt_install stunnel4
{ have prometheus && have promtool; } || apt_install prometheus

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi

# Reinstall only when the dependency list changed.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python packages" >&2
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
