"""The in-memory connector: reads a :class:`MemoryBroker` log, publishes into its ``received`` list."""

from __future__ import annotations

import asyncio
import time

from connectors.memory.broker import MemoryBroker, Record
from connectors.memory.config import MemoryConfig
from gateway.core.connector import Connector, ConnectorContext
from gateway.core.dispatch import Dispatcher
from gateway.core.envelope import Envelope, Receipt
from gateway.core.sink import Item, Sink
from gateway.routing.patterns import MQTT


class MemoryReceipt(Receipt):
    __slots__ = ("broker", "index")

    def __init__(self, broker: MemoryBroker, index: int) -> None:
        super().__init__()
        self.broker = broker
        self.index = index

    def settle(self) -> None:
        self.broker.acked.add(self.index)

    def release(self) -> None:
        self.broker.released.add(self.index)

    def position(self) -> str:
        return str(self.index)


class MemorySink(Sink):
    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__()
        self.broker = broker

    async def write_batch(self, batch: list[Item]) -> None:
        broker = self.broker
        while broker.hold:
            broker.changed.clear()
            await broker.changed.wait()
        for flight, delivery in batch:
            env = flight.env
            record = Record(delivery.address, env.payload, env.headers, delivery.key)
            if broker.swallow is not None and broker.swallow(record):
                continue
            error = broker.reject(record) if broker.reject is not None else None
            if error is None:
                broker.received.append(record)
                flight.done()
            else:
                flight.fail(delivery, error)


class MemoryConnector(Connector):
    config: MemoryConfig

    def __init__(self, name: str, config: MemoryConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        self.broker = MemoryBroker.named(config.broker)

    def endpoint(self) -> str:
        return f"memory:{self.config.broker}"

    def make_sink(self) -> Sink:
        return MemorySink(self.broker)

    async def session(self) -> None:
        self.mark_connected(broker=self.broker.name)
        async with asyncio.TaskGroup() as tg:
            if self.has_sink:
                tg.create_task(self.sink.run_writer(), name=f"{self.name}:writer")
            if self.routes:
                tg.create_task(self._read(Dispatcher(MQTT, self.routes, cache_size=self.context.cache_size)))

    async def _read(self, dispatcher: Dispatcher) -> None:
        broker, cursor = self.broker, 0
        while True:
            await dispatcher.gate.wait_open()
            if self.intake_stopped.is_set():
                return  # shutdown: read nothing more
            if cursor >= len(broker.log):
                broker.changed.clear()
                await broker.changed.wait()
                continue
            rec = broker.log[cursor]
            dispatcher.dispatch(
                Envelope(
                    rec.topic,
                    rec.payload,
                    headers=rec.headers,
                    received_ns=time.monotonic_ns(),
                    receipt=MemoryReceipt(broker, cursor),
                )
            )
            cursor += 1
            if cursor % 256 == 0:
                await asyncio.sleep(0)  # let sinks run between bursts
