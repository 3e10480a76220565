"""Broker connector packages: one per protocol, each with the same skeleton.

``config.py`` (msgspec Structs: connector, ``from``, ``to``), ``connector.py``
(the :class:`gateway.core.connector.Connector`: sessions, sources, sink), and an
``errors`` translation at the edge. Each package's ``__init__`` exposes
``PLUGIN`` and imports no broker library.
"""
