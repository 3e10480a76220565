"""The connector contract: everything a connector package may use of the core, in one place.

A connector package (``connectors/<kind>/``, built in or third party) imports from the gateway only:

- this module, for the runtime: the :class:`Connector` base class and its :class:`ConnectorContext`, the
  :class:`Channel` a connection runs in (and :func:`first`, for a wait on either of two events), the
  :class:`Source` protocol its sources conform to and the :class:`Dispatcher` they hand messages to, the
  :class:`Envelope` they build (:data:`Headers`) with its :class:`Receipt`, the :class:`Sink` base class
  and the :data:`Item` it is handed (a :class:`Flight` and its :class:`Delivery`), and the :class:`Route`
  that a source reads for (its ``spec``, ``patterns``, ``policy``: :class:`Overflow`);
- :mod:`gateway.errors` (the one error tree: translate the broker library's errors at the edge);
- :mod:`gateway.config` (its config Structs' bases: ``ConnectorPlugin``, ``SourceSpec``, ``TargetSpec``,
  ``Replies``), :mod:`gateway.routing` (pure: topic syntaxes, patterns, header conversions) and
  :mod:`gateway.util` (backoff, bounds, TLS, redaction, flood-limited logging).

Never another ``gateway.core`` module, the route kinds (:mod:`gateway.routes`), the endpoint
(:mod:`gateway.ops`) or the application: what is not named here may change without notice.
``connectors/memory`` is the reference to copy: config.py, connector.py, source.py, sink.py.
"""

from __future__ import annotations

from gateway.core.channel import Channel, ConnectorState, first
from gateway.core.connector import Connector, ConnectorContext
from gateway.core.dispatch import Delivery, Dispatcher, Flight, Route
from gateway.core.envelope import Envelope, Headers, Receipt
from gateway.core.policies import Overflow
from gateway.core.sink import Item, Sink
from gateway.core.source import Source, measure_until
from gateway.core.stats import LAG_EVERY, Backlog

__all__ = [
    "LAG_EVERY",
    "Backlog",
    "Channel",
    "Connector",
    "ConnectorContext",
    "ConnectorState",
    "Delivery",
    "Dispatcher",
    "Envelope",
    "Flight",
    "Headers",
    "Item",
    "Overflow",
    "Receipt",
    "Route",
    "Sink",
    "Source",
    "first",
    "measure_until",
]
