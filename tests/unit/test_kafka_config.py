"""The Kafka connector's ``compression``: accepted values, config errors, and what each driver is given."""

from __future__ import annotations

import pytest

from connectors.kafka.config import COMPRESSIONS, KafkaConfig
from connectors.kafka.confluent_sink import producer_config
from gateway.config import parse_config
from gateway.errors import ConfigError

CONFIG = """
connectors:
  k: {{type: kafka, bootstrap_servers: ["127.0.0.1:9092"]{extra}}}
  m: {{type: memory}}
routes:
  - name: r
    from: {{connector: m, topic: "a/{{x}}"}}
    to: {{connector: k, topic: t}}
"""


def kafka_config(extra: str = "") -> KafkaConfig:
    config = parse_config(CONFIG.format(extra=extra))
    kafka = config.connectors["k"]
    assert isinstance(kafka, KafkaConfig)
    return kafka


def test_default_is_lz4() -> None:
    cfg = kafka_config()
    assert cfg.compression == "lz4"
    assert producer_config(cfg, "c")["compression.type"] == "lz4"


@pytest.mark.parametrize("codec", COMPRESSIONS)
def test_each_codec_reaches_librdkafka(codec: str) -> None:
    cfg = kafka_config(f", compression: {codec}")
    assert cfg.compression == codec
    assert producer_config(cfg, "c")["compression.type"] == codec


@pytest.mark.parametrize("value", ["lz5", "LZ4", "brotli", "zip"])
def test_other_values_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        kafka_config(f", compression: {value}")
    [issue] = info.value.issues
    assert issue.path == "connectors.k.compression"
    assert value in issue.message
