"""Config files: YAML → validated, typed :class:`Config`."""

from gateway.config.loader import load_config, parse_config
from gateway.config.model import Config, GatewaySection, RouteConfig, RouteSection, TargetConfig

__all__ = ["Config", "GatewaySection", "RouteConfig", "RouteSection", "TargetConfig", "load_config", "parse_config"]
