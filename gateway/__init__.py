"""A multi-protocol bridge gateway: MQTT, NATS (core and JetStream) and Kafka under config-file routes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mp-gateway")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from gateway.app import Gateway, GatewayState
from gateway.config import Config, load_config
from gateway.errors import ConfigError, GatewayError

__all__ = ["Config", "ConfigError", "Gateway", "GatewayError", "GatewayState", "__version__", "load_config"]
