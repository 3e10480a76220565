"""Config files: YAML → validated, typed :class:`Config`. Config is data: the Structs (``model``,
``options``), what connector kinds declare (``plugin``, ``registry``), the loader, the JSON Schema
(``schema``) and the generated reference (``doc``). Nothing here imports the runtime."""

from gateway.config.loader import load_config, parse_config
from gateway.config.model import Config, GatewaySection, RouteConfig, RouteSection, TargetConfig

__all__ = ["Config", "GatewaySection", "RouteConfig", "RouteSection", "TargetConfig", "load_config", "parse_config"]
