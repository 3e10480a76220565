#!/usr/bin/env bash
# Create (or reuse) loadtests/.venv-peer with the peer product, mq-bridge 1.2.0.
# Kept apart from the project's .venv: the peer must not share packages with it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/../.venv-peer"
want="1.2.0"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import mq_bridge, sys; sys.exit(mq_bridge.__version__ != '$want')" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "mq-bridge==$want"
"$venv/bin/python" -c "import mq_bridge; print('mq-bridge', mq_bridge.__version__, 'in', '$venv')"
