"""The in-memory sink: publishes into a :class:`MemoryBroker`'s ``received`` list.

Part of the reference connector (see :mod:`connectors.memory.connector`): the smallest
:class:`~gateway.core.contract.Sink`. Its writer is handed whole batches; every item ends in
``flight.done()`` once the broker took it, or ``flight.fail(...)`` with the broker's refusal. The broker's
test controls stand in for a real broker's behaviour: ``hold`` (a stalled broker: nothing confirmed),
``reject`` (a refusal) and ``swallow`` (a publish lost without a report).
"""

from __future__ import annotations

from connectors.memory.broker import MemoryBroker, Record
from gateway.core.contract import Item, Sink


class MemorySink(Sink):
    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__()
        self.broker = broker

    async def write_batch(self, batch: list[Item]) -> None:
        broker = self.broker
        while broker.hold:
            broker.changed.clear()
            await broker.changed.wait()
        taken: list[Item] = []  # confirmed together, in order (Sink.confirmed), as a broker's batch ack would
        for item in batch:
            flight, delivery = item
            env = flight.env
            record = Record(delivery.address, env.payload, env.headers, delivery.key)
            if broker.swallow is not None and broker.swallow(record):
                continue
            error = broker.reject(record) if broker.reject is not None else None
            if error is None:
                broker.received.append(record)
                taken.append(item)
            else:
                self.confirmed(taken)
                taken = []
                flight.fail(delivery, error)
        self.confirmed(taken)
