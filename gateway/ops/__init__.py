"""What operators see of a running gateway: the HTTP endpoint (``endpoint`` and ``monitor``: health, readiness,
/varz, /routez, /connz, the status page, reload), its connection guard (``guard``, ``httpguard``), the
supervisor's endpoint over its workers (``fleet`` on ``lighthttp``), the Prometheus exposition (``metrics``)
and log configuration (``logs``)."""
