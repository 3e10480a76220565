"""The per-message path, and the contract connectors implement.

One message: a connector's source reads it into an :class:`~gateway.core.envelope.Envelope` and hands it
to its :class:`~gateway.core.dispatch.Dispatcher` (the routing plan of its topic, cached); each matching
:class:`~gateway.core.route.Route` runs its content stage and admits it under its budget
(:mod:`~gateway.core.flow` pauses the source when full), as one :class:`~gateway.core.flight.Flight`
handed to every target's :class:`~gateway.core.sink.Sink`; each sink's writer publishes whole batches,
and when every target confirmed, the route settles the envelope's receipt: the source acknowledges
(PUBACK, +ACK, offset commit). :mod:`~gateway.core.supervisor` watches budgets and slow consumers;
:mod:`~gateway.core.connector` and :mod:`~gateway.core.channel` keep the broker connections up.

Connectors import this package only through :mod:`gateway.core.contract`. Nothing here imports the route
kinds (:mod:`gateway.routes`), the endpoint (:mod:`gateway.ops`) or the application."""
