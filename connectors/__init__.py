"""Broker connector packages: one per protocol, each with the same skeleton.

``config.py`` (msgspec Structs: connector, ``from``, ``to``; the ``PLUGIN``), ``connector.py`` (the
:class:`gateway.core.contract.Connector`: sessions, sources, sink), ``source.py`` (the
:class:`gateway.core.contract.Source` objects and their receipts), ``sink.py`` (the
:class:`gateway.core.contract.Sink`), plus the protocol's own client, codec or wire modules; broker errors
are translated at the edge into :mod:`gateway.errors`. ``memory`` is the reference to copy. Each package's
``__init__`` exposes ``PLUGIN`` and imports no broker library; of the gateway, a package imports only
:mod:`gateway.core.contract`, :mod:`gateway.errors` and the data and pure layers (``gateway.config``,
``gateway.routing``, ``gateway.util``).
"""
