"""What a supervisor hands its worker processes through the environment (the names only: a leaf module, read by
the slim supervisor and by the workers alike)."""

from __future__ import annotations

TOKEN_ENV = "GATEWAY_WORKER_TOKEN"  # noqa: S105 - the variable's name, not a secret
"""The token of a worker's endpoint, made by its supervisor for this run."""
SNAPSHOT_ENV = "GATEWAY_WORKER_CONFIG"
"""The copy of the config text the supervisor checked last: what a worker reads (relative paths in it stay
relative to the config file's own directory)."""
PORT_FILE_ENV = "GATEWAY_WORKER_PORT_FILE"
"""Where a worker writes the port its endpoint bound."""
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"
"""The supervisor's pid: a worker whose parent is another process drains and stops."""
