"""A multi-protocol bridge gateway: MQTT, NATS (core and JetStream) and Kafka under config-file routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str

    from gateway.app import Gateway, GatewayState
    from gateway.config import Config, load_config
    from gateway.errors import ConfigError, GatewayError

__all__ = ["Config", "ConfigError", "Gateway", "GatewayError", "GatewayState", "__version__", "load_config"]

_WHERE = {
    "Gateway": "gateway.app",
    "GatewayState": "gateway.app",
    "Config": "gateway.config",
    "load_config": "gateway.config",
    "ConfigError": "gateway.errors",
    "GatewayError": "gateway.errors",
}


def __getattr__(name: str) -> Any:
    """The runtime is imported when first named (``from gateway import Gateway``), not by every process that
    imports a part of the package: a supervisor of worker processes never loads the per-message path."""
    if name == "__version__":  # importlib.metadata costs a supervisor ~1.7 MB: read when first asked
        global __version__
        from importlib.metadata import PackageNotFoundError, version

        try:
            __version__ = version("mp-gateway")
        except PackageNotFoundError:  # running from a source tree that is not installed
            __version__ = "0.0.0+source"
        return __version__
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
