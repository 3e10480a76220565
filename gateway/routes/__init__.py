"""Route kinds built on the core's :class:`~gateway.core.route.Route`: request/reply (``requests``:
:class:`RequestRoute`, :class:`ReplyRoute`), the disk spool (``spool``, ``spooled``: :class:`SpooledRoute`)
and the content stage (``transform``: ``where``, ``schema``, ``codec``, ``headers``) a route runs before
admission."""
