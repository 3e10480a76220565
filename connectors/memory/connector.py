"""The in-memory connector: the reference a connector package copies.

Every connector package has the same skeleton, and this one is the smallest that keeps the whole contract
(:mod:`gateway.core.contract`, the only part of the core a connector imports):

- ``config.py``: the connector's config Struct (tagged by ``type``), its ``from`` and ``to`` Structs, and
  the ``PLUGIN`` that names them with the topic syntax and this module's :class:`MemoryConnector`;
- ``connector.py`` (here): the :class:`~gateway.core.contract.Connector`: its sessions (connect, start the
  sources, report connected, serve until the connection is lost), its sink, its sources;
- ``source.py``: the :class:`~gateway.core.contract.Source` objects and their receipts;
- ``sink.py``: the :class:`~gateway.core.contract.Sink`;
- the broker client or wire format (here ``broker.py``, an in-process broker for tests and examples).

A broker connector adds what a network needs: connecting (:meth:`Connector.guard` turns the client
library's errors into ``ConnectorError``), noticing a lost connection (:meth:`Connector.watch`), and its
own counters (``counters()``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from connectors.memory.broker import MemoryBroker
from connectors.memory.config import MemoryConfig
from connectors.memory.sink import MemorySink
from connectors.memory.source import MemorySource
from gateway.core.contract import Connector, ConnectorContext, Sink, Source


class MemoryConnector(Connector):
    config: MemoryConfig

    def __init__(self, name: str, config: MemoryConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        self.broker = MemoryBroker.named(config.broker)
        self._sources: list[MemorySource] = []
        """The sources of the session running now."""

    def endpoint(self) -> str:
        return f"memory:{self.config.broker}"

    def make_sink(self) -> Sink:
        return MemorySink(self.broker)

    def live_sources(self) -> Iterable[Source]:
        return self._sources

    async def session(self) -> None:
        # One source reads for every route (a broker connector may have one per route or per consumer group);
        # its dispatcher, cached by the base class, keeps its plan cache and flow gate across sessions.
        sources = [MemorySource(self.broker, self.dispatcher(self.routes))] if self.routes else []
        for source in sources:
            await source.start()
        self.mark_connected(broker=self.broker.name)
        self._sources = sources
        try:
            async with asyncio.TaskGroup() as tg:
                if self.has_sink:
                    tg.create_task(self.sink.run_writer(), name=f"{self.name}:writer")
                for source in sources:
                    tg.create_task(source.run(self.intake_stopped), name=f"{self.name}:source")
        finally:
            self._sources = []
