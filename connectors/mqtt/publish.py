"""PUBLISH packets from envelopes: what MQTT brokers accept, and how headers become MQTT 5 properties.

A broker drops the connection over a PUBLISH it finds malformed (Mosquitto:
"malformed UTF-8", "protocol error"), taking every other message on it down
too. :class:`PublishEncoder` refuses such a message before it is encoded, with
an error that fails that message alone:

- the topic: empty, a wildcard (``+`` ``#``), a character of
  ``gateway.routing.headers.MQTT_UNSAFE`` or a non-character of planes 1-16, longer
  than 65535 bytes (checked once per distinct topic: a set lookup per message);
- MQTT 5 only, and only for a message that has them: header names and values
  (a value MQTT cannot carry travels as ``NAME-bin`` with base64, by
  :func:`gateway.routing.headers.to_text`; a name it cannot carry fails the message),
  the response topic, the 65535-byte limit of each string and of the
  correlation data;
- the broker's maximum packet size (from its CONNACK), and whatever the codec
  itself refuses (it raises, or panics, for one message: that message fails).

Two headers become properties instead of user properties (any case):
``content-type`` the Content Type, ``message-expiry-interval`` the Message
Expiry Interval, less the whole seconds the message spent in the gateway (a
message that expired here fails, it is not delivered late). The MQTT source
makes the same two headers from those properties.
"""

from __future__ import annotations

from time import monotonic_ns

from connectors.mqtt.codec import CONTENT_TYPE, MESSAGE_EXPIRY, Codec5, is_codec_panic
from gateway.core.contract import Envelope, Headers
from gateway.errors import GatewayError, HeaderError, PayloadTooLarge, SinkError, TemplateError
from gateway.routing.headers import BIN_SUFFIX, MQTT_UNSAFE, to_text

UNSAFE = MQTT_UNSAFE

_MAX_STRING = 65535
_TOPIC_CACHE = 4096
"""Distinct topics (and header names) remembered as checked; the set starts over when full."""
_NEVER_TOO_LONG = _MAX_STRING // 4
"""A string of at most this many characters fits in 65535 UTF-8 bytes whatever it holds."""
_MAX_EXPIRY = 0xFFFF_FFFF
_PLAIN_OVERHEAD = 5 + 2 + _MAX_STRING + 2 + 1
"""The largest packet without properties, less its payload: fixed header, topic, packet id, property length."""


def _show(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def _too_long(text: str) -> bool:
    return len(text) > _NEVER_TOO_LONG and len(text.encode("utf-8", "surrogatepass")) > _MAX_STRING


def _unsafe(text: str) -> bool:
    return not (text.isascii() and text.isprintable()) and UNSAFE.search(text) is not None


def topic_problem(topic: str) -> str:
    """Why an MQTT broker would refuse ``topic`` as the topic of a PUBLISH (and drop the connection), or ""."""
    if not topic:
        return "the MQTT topic is empty"
    if "+" in topic or "#" in topic:
        return f"MQTT topic {_show(topic)} holds a wildcard (+ or #), which a PUBLISH may not"
    if _unsafe(topic):
        return (
            f"MQTT topic {_show(topic)} holds a character MQTT brokers refuse "
            "(a control character, a surrogate or a non-character)"
        )
    if _too_long(topic):
        return f"MQTT topic {_show(topic)} is longer than 65535 bytes"
    return ""


def _seconds(value: str) -> int | None:
    if value.isascii() and value.isdigit() and len(value) <= 10:
        seconds = int(value)
        if seconds <= _MAX_EXPIRY:
            return seconds
    return None


class PublishEncoder:
    """Encodes envelopes as PUBLISH packets that a broker will not drop the connection over."""

    def __init__(self, codec: Codec5) -> None:
        self.codec = codec
        self.max_packet = 268_435_455
        """The broker's maximum packet size (its CONNACK; the protocol's limit without one)."""
        self._plain_limit = self.max_packet - _PLAIN_OVERHEAD
        """A message without properties and a payload up to this size fits the broker's maximum packet size."""
        self._properties = codec.version == 5
        """MQTT 5: headers, response topic and correlation data travel as properties (3.1.1 drops them)."""
        self._topics_ok: set[str] = set()
        """Rendered topics that passed :func:`topic_problem` (a topic that does not is checked each time)."""
        self._names: dict[str, bool] = {}
        """Header names already checked: True when one with a plain value goes as it is."""

    def limit(self, max_packet_size: int | None) -> None:
        """The maximum packet size of the broker now connected (None: it set none)."""
        self.max_packet = max_packet_size or 268_435_455
        self._plain_limit = self.max_packet - _PLAIN_OVERHEAD

    def encode(
        self, env: Envelope, address: str, qos: int, retain: bool, pid: int | None, duplicate: bool = False
    ) -> bytes:
        """The PUBLISH packet of ``env`` to ``address``; TemplateError (the topic), HeaderError (a header)
        or another non-retriable SinkError when a broker would not take it."""
        if address not in self._topics_ok:
            self._check_topic(address)
        payload = env.payload
        try:
            if self._properties and (env.headers is not None or env.reply or env.correlation is not None):
                data = self._encode_properties(env, address, qos, retain, pid, duplicate)
            elif len(payload) <= self._plain_limit:  # the topic cannot make it larger than the broker takes
                return self.codec.publish(address, payload, qos, retain, pid, duplicate, None, None, None)
            elif len(payload) > self.max_packet:  # fail before encoding (copying) a payload that cannot go
                raise PayloadTooLarge(len(payload), self.max_packet, "MQTT broker maximum packet size")
            else:
                data = self.codec.publish(address, payload, qos, retain, pid, duplicate, None, None, None)
        except GatewayError:
            raise
        except BaseException as exc:  # the mqtt5 codec raises ValueError, TypeError, OverflowError, or panics
            if not (isinstance(exc, Exception) or is_codec_panic(exc)):
                raise
            raise SinkError(
                f"the MQTT codec cannot encode this message: {type(exc).__name__}: {exc}", retriable=False
            ) from exc
        if len(data) > self.max_packet:
            raise PayloadTooLarge(
                len(payload), self.max_packet, f"MQTT broker maximum packet size (as a {len(data)}-byte packet)"
            )
        return data

    def _check_topic(self, topic: str) -> None:
        """Raise TemplateError if a broker would refuse ``topic``; remember the topics that pass."""
        problem = topic_problem(topic)
        if problem:
            raise TemplateError(problem)
        ok = self._topics_ok
        if len(ok) >= _TOPIC_CACHE:
            ok.clear()
        ok.add(topic)

    def _encode_properties(
        self, env: Envelope, topic: str, qos: int, retain: bool, pid: int | None, duplicate: bool
    ) -> bytes:
        """MQTT 5 with properties: headers become user properties, except ``content-type`` (the Content Type)
        and ``message-expiry-interval`` (the Message Expiry Interval, less the whole seconds spent here)."""
        if len(env.payload) > self.max_packet:
            raise PayloadTooLarge(len(env.payload), self.max_packet, "MQTT broker maximum packet size")
        headers = env.headers
        props: Headers | None = headers
        content_type: str | None = None
        expiry: int | None = None
        if headers is not None:
            names = self._names
            for name, value in headers:
                if (
                    value.isascii()
                    and value.isprintable()
                    and len(value) <= _NEVER_TOO_LONG
                    and (names.get(name) or (name not in names and self._check_name(name)))
                ):
                    continue  # the common case: the header goes as it is (and the list with it)
                props, content_type, expiry = self._convert(env, headers)
                break
        reply = env.reply or None
        if reply is not None:
            problem = topic_problem(reply)
            if problem:
                raise SinkError(f"response topic: {problem}", retriable=False)
        if env.correlation is not None and len(env.correlation) > _MAX_STRING:
            raise SinkError("correlation data longer than MQTT's 65535-byte limit", retriable=False)
        return self.codec.publish(
            topic, env.payload, qos, retain, pid, duplicate, props or None, reply, env.correlation, content_type, expiry
        )

    def _check_name(self, name: str) -> bool:
        """Whether header ``name`` goes as it is (with a plain value): printable ASCII, not reserved by
        the header rule (``-bin``), not one of the two headers that become properties."""
        names = self._names
        if len(names) >= _TOPIC_CACHE:
            names.clear()
        plain = names[name] = (
            name.isascii()
            and name.isprintable()
            and not name.endswith(BIN_SUFFIX)
            and len(name) <= _NEVER_TOO_LONG
            and name.lower() not in (CONTENT_TYPE, MESSAGE_EXPIRY)
        )
        return plain

    def _convert(self, env: Envelope, headers: Headers) -> tuple[Headers, str | None, int | None]:
        """The headers of a message that has one that is not plain: the user properties (a value MQTT cannot
        carry as ``NAME-bin`` with base64), the Content Type and the Message Expiry Interval."""
        props: Headers = []
        content_type: str | None = None
        expiry: int | None = None
        for name, value in headers:
            n = len(name)
            if n == 12 or n == 23:
                lower = name.lower()
                if lower == CONTENT_TYPE and content_type is None and not _unsafe(value) and not _too_long(value):
                    content_type = value
                    continue
                if lower == MESSAGE_EXPIRY and expiry is None:
                    seconds = _seconds(value)
                    if seconds is not None:
                        expiry = self._remaining(env, seconds)
                        continue
            if UNSAFE.search(name) is not None:
                raise HeaderError(f"header name {_show(name)} holds a character MQTT cannot carry")
            name, value = to_text(name, value, UNSAFE)
            if _too_long(name) or _too_long(value):
                raise HeaderError(f"header {_show(name)} is longer than MQTT's 65535-byte limit")
            props.append((name, value))
        return props, content_type, expiry

    @staticmethod
    def _remaining(env: Envelope, seconds: int) -> int:
        """The expiry interval left after the whole seconds the message spent in the gateway."""
        if seconds == 0 or not env.received_ns:
            return seconds
        left = seconds - (monotonic_ns() - env.received_ns) // 1_000_000_000
        if left <= 0:
            raise SinkError(f"the message expired in the gateway ({MESSAGE_EXPIRY} {seconds} s)", retriable=False)
        return left
