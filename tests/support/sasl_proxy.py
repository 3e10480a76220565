"""Kafka SASL for tests: a SASL-terminating proxy in front of Tansu.

The Tansu build used in the tests cannot accept a SASL login (with
``--authentication`` it requires SASL but stores no users), so successful
logins are tested through :class:`SaslProxy`, a TCP proxy on 127.0.0.1 that
plays the broker's part of the Kafka SASL phase and then relays bytes to a
Tansu started without authentication::

    from tests.support.sasl_proxy import TansuSasl

    with TansuSasl(users={"gw": "gw-secret"}) as kafka:
        producer = confluent_kafka.Producer(kafka.librdkafka_config("SCRAM-SHA-512"))
        ...
        assert kafka.logins_ok >= 1

Per client connection, before authentication the proxy

* forwards ApiVersions (any version, 0-4) to Tansu and relays the answer,
  rewritten so that it advertises SaslHandshake (17, versions
  ``0..handshake_max_version``) and SaslAuthenticate (36, versions 0-2; left
  out when ``handshake_max_version=0``); flexible (v3+) and classic encodings
  are both rewritten, an error answer is relayed unchanged;
* answers SaslHandshake v0/v1 itself: error 0 and the enabled mechanisms, or
  33 UNSUPPORTED_SASL_MECHANISM (then closes);
* answers SaslAuthenticate v0-v2 itself (v2: compact bytes + tagged fields,
  response header v1), running PLAIN (RFC 4616) or SCRAM-SHA-256/512
  (RFC 5802/7677: random salt, 4096 iterations, server signature in the final
  message, so the client verifies the proxy too).  A failure is answered with
  58 SASL_AUTHENTICATION_FAILED and a Kafka-like message, then the
  connection is closed;
* after SaslHandshake **v0** expects raw SASL tokens (4-byte length, no Kafka
  header; the pre-KIP-152 framing) and answers them the same way (PLAIN
  success: an empty token); a failure closes the connection, which is all
  that framing allows;
* closes the connection on any other request (as a SASL listener does).

After a successful login the connection becomes a plain byte pipe to Tansu
(the same backend connection that answered ApiVersions).  Tansu advertises
``localhost:<proxy port>``, so clients reconnect through the proxy.

With an ``ssl.SSLContext`` the proxy terminates TLS first: SASL_SSL.

What the clients send (checked by tests/integration/test_sasl_proxy.py):
librdkafka 2.16 ApiVersions v3 (flexible), SaslHandshake v1, SaslAuthenticate
v1; aiokafka 0.14 ApiVersions v0, SaslHandshake v1, SaslAuthenticate v1.
With ``handshake_max_version=0`` both send SaslHandshake v0 and raw tokens.
SaslAuthenticate v0 and v2 are covered by :func:`sasl_login`.  (Tansu itself
already advertises SaslHandshake 0-1 and SaslAuthenticate 0-2; the rewrite
matters for ``handshake_max_version=0`` and guards against other builds.)

The proxy runs its own asyncio event loop (the standard library's) in a
daemon thread, so it works beside synchronous test code and beside async
tests on another loop.  :func:`sasl_login` and :func:`api_versions` are small
synchronous *client* helpers (used by the readiness probe and the tests).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tests.support.brokers import LOOPBACK, PROBE_TIMEOUT, StartStop, TansuStorage, free_port, make_workdir, recv_exact
from tests.support.proxy import run_loop
from tests.support.secure import GW_PASSWORD, GW_USER, SERVER_NAME, BackendTansu, Pki

__all__ = [
    "ALL_MECHANISMS",
    "SCRAM_ITERATIONS",
    "Mechanism",
    "SaslLoginError",
    "SaslProxy",
    "TansuSasl",
    "api_versions",
    "sasl_login",
]

Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
ALL_MECHANISMS: tuple[Mechanism, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_ITERATIONS = 4096
_SCRAM_HASH: dict[str, str] = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}

API_SASL_HANDSHAKE = 17
API_API_VERSIONS = 18
API_SASL_AUTHENTICATE = 36
SASL_AUTHENTICATE_MAX_VERSION = 2
API_VERSIONS_MAX_VERSION = 4

ERR_NONE = 0
ERR_UNSUPPORTED_SASL_MECHANISM = 33
ERR_ILLEGAL_SASL_STATE = 34
ERR_UNSUPPORTED_VERSION = 35
ERR_SASL_AUTHENTICATION_FAILED = 58

#: largest request accepted before authentication (Kafka: sasl.server.max.receive.size = 512 KiB)
_MAX_PREAUTH_FRAME = 512 * 1024
#: largest ApiVersions answer accepted from the backend
_MAX_BACKEND_FRAME = 16 * 1024 * 1024
_CHUNK = 64 * 1024
_CLOSE_TIMEOUT = 2.0

_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Kafka wire encoding
# --------------------------------------------------------------------------


class _ProtocolError(Exception):
    """Malformed or unexpected bytes from a peer."""


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _ProtocolError("truncated message")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack(">q", self.take(8))[0])

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            (b,) = self.take(1)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 35:
                raise _ProtocolError("varint too long")

    def string(self) -> str | None:
        n = self.int16()
        return None if n < 0 else self.take(n).decode("utf-8", "replace")

    def compact_string(self) -> str | None:
        n = self.uvarint()
        return None if n == 0 else self.take(n - 1).decode("utf-8", "replace")

    def bytes_(self) -> bytes:
        n = self.int32()
        return b"" if n < 0 else self.take(n)

    def compact_bytes(self) -> bytes:
        n = self.uvarint()
        return b"" if n == 0 else self.take(n - 1)

    def tagged_fields(self) -> bytes:
        """Skip a tagged-field section; return its raw bytes."""
        start = self.pos
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.take(self.uvarint())
        return self.data[start : self.pos]

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def _compact_string(s: str | None) -> bytes:
    if s is None:
        return b"\x00"
    raw = s.encode()
    return _uvarint(len(raw) + 1) + raw


def _bytes(b: bytes) -> bytes:
    return struct.pack(">i", len(b)) + b


def _compact_bytes(b: bytes) -> bytes:
    return _uvarint(len(b) + 1) + b


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _flexible_request(api_key: int, api_version: int) -> bool:
    """Header v2 (tagged fields) for the requests this module parses."""
    if api_key == API_API_VERSIONS:
        return api_version >= 3
    if api_key == API_SASL_AUTHENTICATE:
        return api_version >= 2
    return False


@dataclass(frozen=True, slots=True)
class _Header:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


def _parse_request(payload: bytes) -> tuple[_Header, _Reader]:
    r = _Reader(payload)
    api_key, api_version, corr = r.int16(), r.int16(), r.int32()
    if api_key in (API_API_VERSIONS, API_SASL_HANDSHAKE, API_SASL_AUTHENTICATE):
        client_id = r.string()
        if _flexible_request(api_key, api_version):
            r.tagged_fields()
    else:
        client_id = None
    return _Header(api_key, api_version, corr, client_id), r


def _response(corr: int, body: bytes, *, flexible_header: bool = False) -> bytes:
    return _frame(struct.pack(">i", corr) + (b"\x00" if flexible_header else b"") + body)


def _patch_api_versions(
    api_version: int, response: bytes, force: Mapping[int, tuple[int, int]], drop: Iterable[int]
) -> bytes:
    """Rewrite an ApiVersions response (payload without length): set ``force`` ranges, remove ``drop`` keys.

    The response header is always v0 (KIP-511); the body is flexible for v3+.
    Error answers (e.g. UNSUPPORTED_VERSION, v0 layout) are returned unchanged.
    """
    r = _Reader(response)
    corr = r.int32()
    error = r.int16()
    if error != ERR_NONE:
        return response
    flexible = api_version >= 3
    count = r.uvarint() - 1 if flexible else r.int32()
    if count < 0:
        raise _ProtocolError("null api_keys array in ApiVersions response")
    skip = set(force) | set(drop)
    entries: list[tuple[int, int, int, bytes]] = []
    for _ in range(count):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        tags = r.tagged_fields() if flexible else b""
        if key not in skip:
            entries.append((key, lo, hi, tags))
    tail = r.rest()  # throttle_time_ms (v1+) and the top-level tagged fields (v3+)
    for key, (lo, hi) in force.items():
        entries.append((key, lo, hi, b"\x00" if flexible else b""))
    entries.sort()
    out = bytearray(struct.pack(">ih", corr, error))
    out += _uvarint(len(entries) + 1) if flexible else struct.pack(">i", len(entries))
    for key, lo, hi, tags in entries:
        out += struct.pack(">hhh", key, lo, hi) + tags
    out += tail
    return bytes(out)


# --------------------------------------------------------------------------
# SASL server mechanisms
# --------------------------------------------------------------------------


class _AuthFailed(Exception):
    def __init__(self, message: str, user: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.user = user


def _invalid_credentials(mechanism: str) -> str:
    # the message a Kafka broker sends
    return f"Authentication failed during authentication due to invalid credentials with SASL mechanism {mechanism}"


class _Authenticator:
    mechanism: str
    done: bool = False
    user: str | None = None

    def step(self, token: bytes) -> bytes:
        raise NotImplementedError


class _PlainServer(_Authenticator):
    mechanism = "PLAIN"

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = users

    def step(self, token: bytes) -> bytes:
        if self.done:
            raise _AuthFailed("Authentication failed: unexpected token after PLAIN")
        parts = token.split(b"\x00")
        if len(parts) != 3:
            raise _AuthFailed("Invalid SASL/PLAIN response: expected 3 tokens")
        try:
            authzid, user, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise _AuthFailed("Invalid SASL/PLAIN response: not UTF-8") from None
        self.user = user
        if not user or not password:
            raise _AuthFailed("Authentication failed: username or password is empty", user)
        if authzid and authzid != user:
            raise _AuthFailed("Authentication failed: Client requested an authorization id that is different", user)
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            raise _AuthFailed("Authentication failed: Invalid username or password", user)
        self.done = True
        return b""


@dataclass(frozen=True, slots=True)
class _ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _scram_credential(mechanism: str, password: str, iterations: int = SCRAM_ITERATIONS) -> _ScramCredential:
    name = _SCRAM_HASH[mechanism]
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac(name, password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", name).digest()
    return _ScramCredential(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.new(name, client_key).digest(),
        server_key=hmac.new(salted, b"Server Key", name).digest(),
    )


def _scram_unescape(name: str) -> str:
    # RFC 5802 saslname: ',' is sent as '=2C' and '=' as '=3D'; any other '=' is invalid
    if name.replace("=2C", "").replace("=3D", "").count("="):
        raise _AuthFailed("Invalid SCRAM username encoding")
    return name.replace("=2C", ",").replace("=3D", "=")


def _scram_attrs(msg: str) -> list[tuple[str, str]]:
    out = []
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise _AuthFailed(f"Invalid SCRAM message attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


class _ScramServer(_Authenticator):
    def __init__(self, mechanism: str, credentials: Mapping[str, _ScramCredential]) -> None:
        self.mechanism = mechanism
        self.hash = _SCRAM_HASH[mechanism]
        self.credentials = credentials
        self._state = 0
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._credential: _ScramCredential | None = None

    def step(self, token: bytes) -> bytes:
        try:
            msg = token.decode("utf-8")
        except UnicodeDecodeError:
            raise _AuthFailed("Invalid SCRAM message: not UTF-8", self.user) from None
        if self._state == 0:
            return self._client_first(msg)
        if self._state == 1:
            return self._client_final(msg)
        raise _AuthFailed("Authentication failed: unexpected SCRAM message", self.user)

    def _client_first(self, msg: str) -> bytes:
        parts = msg.split(",", 2)
        if len(parts) != 3:
            raise _AuthFailed("Invalid SCRAM client-first message")
        cbind, authzid, bare = parts
        if cbind not in ("n", "y"):
            raise _AuthFailed("SCRAM channel binding is not supported")
        if authzid and not authzid.startswith("a="):
            raise _AuthFailed("Invalid SCRAM authorization id")
        attrs = _scram_attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise _AuthFailed("Invalid SCRAM client-first message")
        user = _scram_unescape(attrs[0][1])
        self.user = user
        if authzid and _scram_unescape(authzid[2:]) != user:
            raise _AuthFailed("Authentication failed: Client requested an authorization id that is different", user)
        credential = self.credentials.get(user)
        if credential is None:
            raise _AuthFailed(_invalid_credentials(self.mechanism), user)
        self._credential = credential
        self._gs2_header = f"{cbind},{authzid},"
        self._client_first_bare = bare
        self._nonce = attrs[1][1] + secrets.token_urlsafe(18)
        salt = base64.b64encode(credential.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={credential.iterations}"
        self._state = 1
        return self._server_first.encode()

    def _client_final(self, msg: str) -> bytes:
        credential = self._credential
        assert credential is not None
        cut = msg.rfind(",p=")
        if cut < 0:
            raise _AuthFailed("Invalid SCRAM client-final message: no proof", self.user)
        without_proof = msg[:cut]
        attrs = dict(_scram_attrs(without_proof))
        try:
            cbind = base64.b64decode(attrs.get("c", ""), validate=True).decode()
            proof = base64.b64decode(msg[cut + 3 :], validate=True)
        except (ValueError, UnicodeDecodeError):
            raise _AuthFailed("Invalid SCRAM client-final message: bad base64", self.user) from None
        if cbind != self._gs2_header:
            raise _AuthFailed("Invalid SCRAM client-final message: channel binding mismatch", self.user)
        if attrs.get("r") != self._nonce:
            raise _AuthFailed("Invalid SCRAM client-final message: nonce mismatch", self.user)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_signature = hmac.new(credential.stored_key, auth_message, self.hash).digest()
        if len(proof) != len(client_signature):
            raise _AuthFailed(_invalid_credentials(self.mechanism), self.user)
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash, client_key).digest(), credential.stored_key):
            raise _AuthFailed(_invalid_credentials(self.mechanism), self.user)
        server_signature = hmac.new(credential.server_key, auth_message, self.hash).digest()
        self._state = 2
        self.done = True
        return b"v=" + base64.b64encode(server_signature)


# --------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------


class _Close(Exception):
    """End the client connection (already answered, or nothing to answer)."""


#: builds a SaslAuthenticate response from (error code, error message, auth bytes)
_Answer = Callable[[int, str | None, bytes], bytes]


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.backend: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.auth: _Authenticator | None = None
        self.raw_tokens = False


class SaslProxy(StartStop):
    """A Kafka SASL server on ``127.0.0.1:port`` that relays authenticated connections to ``target``.

    ``users`` maps user name to password (default ``{"gw": "gw-secret"}``);
    ``mechanisms`` are the enabled SASL mechanisms; ``ssl_context`` (server
    side) makes it SASL_SSL.  ``handshake_max_version`` is the highest
    SaslHandshake version advertised: 1 (default) means SaslAuthenticate
    framing, 0 means raw SASL tokens (pre-Kafka-1.0 brokers).

    ``logins_ok``/``logins_failed`` count finished logins (a rejected
    mechanism counts as failed); ``auth_log`` lists them, e.g.
    ``"ok SCRAM-SHA-512 gw"`` or ``"failed PLAIN gw: Authentication failed: ..."``.
    ``errors`` collects unexpected proxy errors (should stay empty).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        users: Mapping[str, str] | None = None,
        mechanisms: Iterable[str] = ALL_MECHANISMS,
        ssl_context: ssl.SSLContext | None = None,
        port: int | None = None,
        handshake_max_version: int = 1,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target: tuple[str, int] = (target[0], int(target[1]))
        self.host = LOOPBACK
        self.port = port if port else free_port()
        self.users: dict[str, str] = dict(users) if users is not None else {GW_USER: GW_PASSWORD}
        self.mechanisms: tuple[str, ...] = tuple(mechanisms)
        unknown = [m for m in self.mechanisms if m not in ALL_MECHANISMS]
        if unknown or not self.mechanisms:
            raise ValueError(f"mechanisms must be a non-empty subset of {ALL_MECHANISMS}, got {self.mechanisms}")
        if handshake_max_version not in (0, 1):
            raise ValueError("handshake_max_version must be 0 or 1")
        self.ssl_context = ssl_context
        self.handshake_max_version = handshake_max_version
        self.connect_timeout = connect_timeout
        # SCRAM credentials as a broker stores them (salt, StoredKey, ServerKey), not the passwords
        self._scram: dict[str, dict[str, _ScramCredential]] = {
            m: {u: _scram_credential(m, p) for u, p in self.users.items()} for m in self.mechanisms if m in _SCRAM_HASH
        }
        self._lock = threading.Lock()
        self._lifecycle = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._logins_ok = 0
        self._logins_failed = 0
        self._auth_log: list[str] = []
        self._errors: list[str] = []
        self.connections_total = 0

    # ------------------------------------------------------------ properties

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def logins_ok(self) -> int:
        with self._lock:
            return self._logins_ok

    @property
    def logins_failed(self) -> int:
        with self._lock:
            return self._logins_failed

    @property
    def auth_log(self) -> list[str]:
        with self._lock:
            return list(self._auth_log)

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def reset_counters(self) -> None:
        with self._lock:
            self._logins_ok = self._logins_failed = 0
            self._auth_log.clear()

    @property
    def advertised_versions(self) -> dict[int, tuple[int, int]]:
        """The SASL API ranges forced into every ApiVersions answer."""
        out = {API_SASL_HANDSHAKE: (0, self.handshake_max_version)}
        if self.handshake_max_version >= 1:
            out[API_SASL_AUTHENTICATE] = (0, SASL_AUTHENTICATE_MAX_VERSION)
        return out

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Start the loop thread and listen.  No-op if running."""
        with self._lifecycle:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(self._on_loop_error)
            thread = threading.Thread(target=run_loop, args=(loop,), name=f"sasl-proxy-{self.port}", daemon=True)
            self._loop, self._thread = loop, thread
            thread.start()
            try:
                self._submit(self._startup(), timeout)
            except BaseException:
                self._teardown(timeout)
                raise

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, stop the thread.  Idempotent."""
        with self._lifecycle:
            if self._thread is None:
                return
            try:
                self._submit(self._shutdown(), timeout)
            finally:
                self._teardown(timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        tls = " tls" if self.ssl_context is not None else ""
        return f"<SaslProxy {self.host}:{self.port}{tls} -> {self.target[0]}:{self.target[1]} {state}>"

    # ------------------------------------------------------ thread plumbing

    def _teardown(self, timeout: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._loop = self._thread = self._server = None
        self._tasks.clear()

    def _submit(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        loop = self._loop
        assert loop is not None
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SaslProxy controls must not be called from the proxy's own thread")
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{self!r}: control call did not complete within {timeout} s") from None

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):
            return  # a client that fails TLS or goes away is not a proxy error
        with self._lock:
            self._errors.append(f"{context.get('message')}: {exc!r}")

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _outcome(self, ok: bool, mechanism: str, user: str | None, message: str = "") -> None:
        with self._lock:
            if ok:
                self._logins_ok += 1
                self._auth_log.append(f"ok {mechanism} {user}")
            else:
                self._logins_failed += 1
                self._auth_log.append(f"failed {mechanism} {user}: {message}")

    # --------------------------------------------------------- on the loop

    async def _startup(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            ssl=self.ssl_context,
            reuse_address=True,
            ssl_handshake_timeout=10.0 if self.ssl_context is not None else None,
        )

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections_total += 1
        session = _Session(reader, writer)
        try:
            if await self._authenticate(session):
                await self._relay(session)
        except (_Close, _ProtocolError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error(f"connection handler: {exc!r}")
        finally:
            await _close_writer(writer)
            if session.backend is not None:
                await _close_writer(session.backend[1])
            if task is not None:
                self._tasks.discard(task)

    async def _backend(self, s: _Session) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if s.backend is None:
            try:
                s.backend = await asyncio.wait_for(asyncio.open_connection(*self.target), self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise _Close(f"backend unreachable: {exc!r}") from exc
        return s.backend

    async def _send(self, s: _Session, data: bytes) -> None:
        s.writer.write(data)
        await s.writer.drain()

    async def _authenticate(self, s: _Session) -> bool:
        """Run the pre-authentication phase; True once a login succeeded."""
        while True:
            payload = await _read_frame(s.reader, _MAX_PREAUTH_FRAME)
            if s.raw_tokens:
                if await self._token(s, payload, None):
                    return True
                continue
            header, body = _parse_request(payload)
            if header.api_key == API_API_VERSIONS:
                await self._api_versions(s, header, payload)
            elif header.api_key == API_SASL_HANDSHAKE:
                await self._handshake(s, header, body)
            elif header.api_key == API_SASL_AUTHENTICATE:
                if await self._sasl_authenticate(s, header, body):
                    return True
            else:
                raise _Close(f"api key {header.api_key} before authentication")

    async def _api_versions(self, s: _Session, header: _Header, payload: bytes) -> None:
        breader, bwriter = await self._backend(s)
        bwriter.write(_frame(payload))
        await bwriter.drain()
        response = await _read_frame(breader, _MAX_BACKEND_FRAME)
        drop = () if self.handshake_max_version >= 1 else (API_SASL_AUTHENTICATE,)
        try:
            patched = _patch_api_versions(header.api_version, response, self.advertised_versions, drop)
        except _ProtocolError as exc:
            self._error(f"cannot rewrite ApiVersions v{header.api_version} response: {exc}")
            raise
        await self._send(s, _frame(patched))

    async def _handshake(self, s: _Session, header: _Header, body: _Reader) -> None:
        def answer(error: int) -> bytes:
            mechs = struct.pack(">i", len(self.mechanisms)) + b"".join(_string(m) for m in self.mechanisms)
            return _response(header.correlation_id, struct.pack(">h", error) + mechs)

        if header.api_version > self.handshake_max_version:
            await self._send(s, answer(ERR_UNSUPPORTED_VERSION))
            raise _Close("unsupported SaslHandshake version")
        if s.auth is not None:
            await self._send(s, answer(ERR_ILLEGAL_SASL_STATE))
            raise _Close("second SaslHandshake")
        mechanism = body.string() or ""
        if mechanism not in self.mechanisms:
            self._outcome(False, mechanism, None, "unsupported SASL mechanism")
            await self._send(s, answer(ERR_UNSUPPORTED_SASL_MECHANISM))
            raise _Close("unsupported mechanism")
        if mechanism == "PLAIN":
            s.auth = _PlainServer(self.users)
        else:
            s.auth = _ScramServer(mechanism, self._scram[mechanism])
        s.raw_tokens = header.api_version == 0
        await self._send(s, answer(ERR_NONE))

    async def _sasl_authenticate(self, s: _Session, header: _Header, body: _Reader) -> bool:
        version = header.api_version
        if version > SASL_AUTHENTICATE_MAX_VERSION:
            raise _Close("unsupported SaslAuthenticate version")
        flexible = version >= 2

        def answer(error: int, message: str | None, auth_bytes: bytes) -> bytes:
            if flexible:
                out = struct.pack(">h", error) + _compact_string(message) + _compact_bytes(auth_bytes)
                out += struct.pack(">q", 0) + b"\x00"
            else:
                out = struct.pack(">h", error) + _string(message) + _bytes(auth_bytes)
                if version >= 1:
                    out += struct.pack(">q", 0)  # session_lifetime_ms: no re-authentication
            return _response(header.correlation_id, out, flexible_header=flexible)

        if s.auth is None or s.raw_tokens:
            await self._send(s, answer(ERR_ILLEGAL_SASL_STATE, "SaslAuthenticate before SaslHandshake v1", b""))
            raise _Close("SaslAuthenticate in the wrong state")
        token = body.compact_bytes() if flexible else body.bytes_()
        return await self._token(s, token, answer)

    async def _token(self, s: _Session, token: bytes, answer: _Answer | None) -> bool:
        """One SASL step; ``answer`` builds a SaslAuthenticate response (None: raw token framing)."""
        auth = s.auth
        assert auth is not None
        try:
            reply = auth.step(token)
        except _AuthFailed as exc:
            self._outcome(False, auth.mechanism, exc.user or auth.user, exc.message)
            if answer is not None:
                await self._send(s, answer(ERR_SASL_AUTHENTICATION_FAILED, exc.message, b""))
            raise _Close(exc.message) from None
        await self._send(s, answer(ERR_NONE, None, reply) if answer is not None else _frame(reply))
        if auth.done:
            self._outcome(True, auth.mechanism, auth.user)
        return auth.done

    async def _relay(self, s: _Session) -> None:
        breader, bwriter = await self._backend(s)
        pumps = [
            asyncio.create_task(_pump(s.reader, bwriter)),
            asyncio.create_task(_pump(breader, s.writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if size < 0 or size > limit:
        raise _ProtocolError(f"frame size {size} out of range")
    return await reader.readexactly(size)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
    except TimeoutError:
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # the peer went away: nothing left to close
        pass


# --------------------------------------------------------------------------
# Synchronous client helpers (readiness probe, tests)
# --------------------------------------------------------------------------


class SaslLoginError(Exception):
    """A SASL login was refused: ``error_code`` (Kafka error, -1: connection closed) and the broker's message."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(f"error {error_code}: {message}")
        self.error_code = error_code
        self.message = message


def _request(sock: socket.socket, api_key: int, api_version: int, corr: int, body: bytes) -> _Reader:
    """Send one request (header v1, or v2 if flexible); return a reader after the response header."""
    flexible = _flexible_request(api_key, api_version)
    header = struct.pack(">hhi", api_key, api_version, corr) + _string("sasl-proxy-client")
    if flexible:
        header += b"\x00"
    sock.sendall(_frame(header + body))
    r = _Reader(_recv_frame(sock))
    if r.int32() != corr:
        raise ConnectionError("correlation id mismatch")
    if flexible and api_key != API_API_VERSIONS:  # ApiVersions always answers with header v0
        r.tagged_fields()
    return r


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    return recv_exact(sock, size)


def api_versions(sock: socket.socket, version: int = 0) -> dict[int, tuple[int, int]]:
    """ApiVersions v0-v3 over ``sock``: ``{api_key: (min, max)}``; raises ``ConnectionError`` on an error code."""
    body = b""
    if version >= 3:
        body = _compact_string("sasl-proxy-client") + _compact_string("1.0") + b"\x00"
    r = _request(sock, API_API_VERSIONS, version, 1, body)
    error = r.int16()
    if error != ERR_NONE:
        raise ConnectionError(f"ApiVersions v{version} error_code {error}")
    flexible = version >= 3
    count = r.uvarint() - 1 if flexible else r.int32()
    out = {}
    for _ in range(count):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        if flexible:
            r.tagged_fields()
        out[key] = (lo, hi)
    return out


def _scram_client(mechanism: str, username: str, password: str) -> Generator[bytes, bytes, None]:
    """A generator: send server messages, receive client messages; returns after verifying the server."""
    name = _SCRAM_HASH[mechanism]
    nonce = secrets.token_urlsafe(18)
    bare = "n={},r={}".format(username.replace("=", "=3D").replace(",", "=2C"), nonce)
    server_first = (yield f"n,,{bare}".encode()).decode()
    attrs = dict(_scram_attrs(server_first))
    if not attrs["r"].startswith(nonce):
        raise SaslLoginError(-1, "server nonce does not extend the client nonce")
    salted = hashlib.pbkdf2_hmac(name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    client_key = hmac.new(salted, b"Client Key", name).digest()
    signature = hmac.new(hashlib.new(name, client_key).digest(), auth_message, name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_final = (yield f"{without_proof},p={base64.b64encode(proof).decode()}".encode()).decode()
    expected = hmac.new(hmac.new(salted, b"Server Key", name).digest(), auth_message, name).digest()
    if dict(_scram_attrs(server_final)).get("v") != base64.b64encode(expected).decode():
        raise SaslLoginError(-1, "wrong server signature")
    yield b""


def sasl_login(
    sock: socket.socket,
    mechanism: str,
    username: str,
    password: str,
    *,
    handshake_version: int = 1,
    authenticate_version: int = 1,
) -> None:
    """Log in over ``sock`` (a client of :class:`SaslProxy` or a real broker); raise :class:`SaslLoginError` if refused.

    ``handshake_version=0`` uses raw SASL tokens instead of SaslAuthenticate
    (``authenticate_version`` 0-2).  SCRAM verifies the server signature.
    """
    r = _request(sock, API_SASL_HANDSHAKE, handshake_version, 2, _string(mechanism))
    error = r.int16()
    enabled = [r.string() for _ in range(r.int32())]
    if error != ERR_NONE:
        raise SaslLoginError(error, f"SaslHandshake refused {mechanism}; enabled: {enabled}")
    scram: Generator[bytes, bytes, None] | None = None
    if mechanism == "PLAIN":
        steps: list[bytes] = [f"\0{username}\0{password}".encode()]
    else:
        scram = _scram_client(mechanism, username, password)
        steps = [next(scram)]
    corr = 3
    while steps:
        token = steps.pop()
        if handshake_version == 0:
            sock.sendall(_frame(token))
            try:
                reply = _recv_frame(sock)
            except ConnectionError:
                raise SaslLoginError(-1, "connection closed during authentication") from None
        else:
            flexible = authenticate_version >= 2
            body = _compact_bytes(token) + b"\x00" if flexible else _bytes(token)
            r = _request(sock, API_SASL_AUTHENTICATE, authenticate_version, corr, body)
            corr += 1
            error = r.int16()
            message = r.compact_string() if flexible else r.string()
            reply = r.compact_bytes() if flexible else r.bytes_()
            if error != ERR_NONE:
                raise SaslLoginError(error, message or "")
        if scram is not None:
            nxt = scram.send(reply)
            if nxt:
                steps.append(nxt)


def _metadata_ports(sock: socket.socket) -> list[int]:
    """Metadata v0 for all topics: the advertised broker ports."""
    r = _request(sock, 3, 0, 9, struct.pack(">i", 0))
    ports = []
    for _ in range(r.int32()):
        r.int32()  # node id
        r.string()  # host
        ports.append(r.int32())
    return ports


# --------------------------------------------------------------------------
# Fixture: Tansu behind the SASL proxy
# --------------------------------------------------------------------------


class TansuSasl(StartStop):
    """Kafka with SASL (and optionally TLS): :class:`SaslProxy` on ``localhost:<port>`` in front of a private Tansu.

    Tansu (``self.backend``, work dir ``workdir/tansu``, no
    ``--authentication``) listens on an internal port and advertises
    ``localhost:<port>``, the proxy's, so every client connection logs in.
    ``tls=pki`` serves ``pki.server_cert`` (SASL_SSL; clients trust
    ``pki.ca``).  :meth:`start` starts Tansu, then the proxy, then logs in
    once through the proxy (first mechanism, first user) and checks the
    Metadata; that probe login is not counted.  Counters and log:
    :attr:`logins_ok`, :attr:`logins_failed`, :attr:`auth_log`.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        mechanisms: Iterable[str] = ALL_MECHANISMS,
        tls: Pki | None = None,
        workdir: Path | None = None,
        port: int | None = None,
        storage: TansuStorage = "memory",
        handshake_max_version: int = 1,
    ) -> None:
        self.workdir = make_workdir(workdir, "test-tansu-sasl-")
        self.tls = tls
        self.port = port if port else free_port()
        self.host = LOOPBACK
        self.backend = BackendTansu(
            advertised_port=self.port, authentication=False, workdir=self.workdir / "tansu", storage=storage
        )
        ssl_context = None
        if tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        self.proxy = SaslProxy(
            self.backend.address,
            users=users,
            mechanisms=mechanisms,
            ssl_context=ssl_context,
            port=self.port,
            handshake_max_version=handshake_max_version,
        )

    # ------------------------------------------------------------ properties

    @property
    def bootstrap(self) -> str:
        return f"{SERVER_NAME}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def security_protocol(self) -> str:
        return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"

    @property
    def users(self) -> dict[str, str]:
        return dict(self.proxy.users)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return self.proxy.mechanisms

    @property
    def username(self) -> str:
        return next(iter(self.proxy.users))

    @property
    def password(self) -> str:
        return self.proxy.users[self.username]

    @property
    def logins_ok(self) -> int:
        return self.proxy.logins_ok

    @property
    def logins_failed(self) -> int:
        return self.proxy.logins_failed

    @property
    def auth_log(self) -> list[str]:
        return self.proxy.auth_log

    @property
    def running(self) -> bool:
        return self.proxy.running and self.backend.running

    def librdkafka_config(
        self, mechanism: str | None = None, *, username: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """confluent-kafka settings for this broker (idempotence off: Tansu grants no producer ids)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol,
            "sasl.mechanism": mechanism or self.mechanisms[0],
            "sasl.username": username if username is not None else self.username,
            "sasl.password": password if password is not None else self.password,
            "enable.idempotence": False,
        }
        if self.tls is not None:
            conf["ssl.ca.location"] = str(self.tls.ca)
        return conf

    def aiokafka_config(
        self, mechanism: str | None = None, *, username: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """aiokafka keyword arguments for this broker."""
        conf: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
            "sasl_mechanism": mechanism or self.mechanisms[0],
            "sasl_plain_username": username if username is not None else self.username,
            "sasl_plain_password": password if password is not None else self.password,
        }
        if self.tls is not None:
            conf["ssl_context"] = self.tls.client_context()
        return conf

    # ------------------------------------------------------------- lifecycle

    def connect(self) -> socket.socket:
        """A client socket to the proxy (TLS-wrapped, hostname ``localhost`` verified, when ``tls``)."""
        sock = socket.create_connection(self.address, timeout=PROBE_TIMEOUT * 5)
        if self.tls is None:
            return sock
        try:
            return self.tls.client_context().wrap_socket(sock, server_hostname=SERVER_NAME)
        except BaseException:
            sock.close()
            raise

    def _probe(self) -> None:
        mechanism = next((m for m in self.mechanisms if m != "PLAIN"), self.mechanisms[0])
        with self.connect() as sock:
            advertised = api_versions(sock, 0)
            for key, (lo, hi) in self.proxy.advertised_versions.items():
                if advertised.get(key) != (lo, hi):
                    raise RuntimeError(f"ApiVersions through the proxy: api {key} is {advertised.get(key)}")
            sasl_login(
                sock,
                mechanism,
                self.username,
                self.password,
                handshake_version=self.proxy.handshake_max_version,
            )
            ports = _metadata_ports(sock)
            if self.port not in ports:
                raise RuntimeError(f"metadata through the proxy advertises ports {ports}, not {self.port}")

    def start(self, timeout: float = 20.0) -> None:
        """Start Tansu, then the proxy, then probe one login + Metadata through it."""
        try:
            if not self.backend.running:
                self.backend.start(timeout=timeout)
            self.proxy.start()
            self._probe()
        except BaseException as exc:
            log = self.backend.log_tail() if self.backend.log_path.exists() else ""
            self.stop()
            if isinstance(exc, Exception):
                raise RuntimeError(f"TansuSasl did not start: {exc!r}\n{log}") from exc
            raise
        self.proxy.reset_counters()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the proxy, then Tansu.  Idempotent."""
        try:
            self.proxy.stop(timeout=timeout)
        finally:
            self.backend.stop(timeout=timeout)

    def __repr__(self) -> str:
        return f"<TansuSasl {self.bootstrap} {self.security_protocol} mechanisms={list(self.mechanisms)}>"
