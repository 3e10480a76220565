"""What operators see of a running gateway: the HTTP endpoint (``monitor``: health, readiness, /varz,
/routez, /connz, the status page, reload), its connection guard (``httpguard``), the Prometheus exposition
(``metrics``) and log configuration (``logs``)."""
