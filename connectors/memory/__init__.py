"""An in-process broker connector, for tests and examples: no network, same contract."""

from connectors.memory.config import PLUGIN

__all__ = ["PLUGIN"]
