"""Small tools every layer may use, with no state of the gateway: full-jitter backoff, ranged numeric
types for config Structs (``bounds``), rate-limited reporting of floods, secret masking, TLS contexts."""
