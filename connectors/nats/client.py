"""The nats-py client as the gateway uses it: what the server sends can never stop it from reading.

nats-py's header parser skips a block's first 8 bytes blindly and raises on a block of exactly
``NATS/1.0``, and a subject that is not UTF-8 raises too; inside its read loop, either one stops the
connection from reading for good (it only ends when PINGs go unanswered). nats-server forwards both as
they are. And after an ``-ERR``, nats-py's close can raise before it calls back, so the loss goes
unnoticed until a flush times out. :class:`GatewayClient` fixes the three, and keeps the server's
``-ERR`` so that a message that made the server close the connection is told (:func:`loss_blame`).
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import AuthorizationError, UnexpectedEOF
from nats.errors import Error as NatsError
from nats.protocol.parser import PERMISSIONS_ERR

from connectors.nats import wire
from gateway.errors import BrokerRefusal


class GatewayClient(Client):
    """nats-py's client with the three fixes above; the counters of what it had to leave out."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped_header_lines = 0
        """Received header lines without a valid name (or without ':'), left out."""
        self.server_error: str | None = None
        """The server's last ``-ERR`` that closes the connection (``maximum control line exceeded``)."""

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        parsed, dropped = wire.parse_headers(headers)
        if dropped:
            self.dropped_header_lines += dropped
        return parsed

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )

    async def _process_err(self, err_msg: str) -> None:
        if PERMISSIONS_ERR not in err_msg:  # nats-py closes the connection on every other -ERR
            self.server_error = err_msg.strip().strip("'")
        await super()._process_err(err_msg)

    async def _close(self, status: int, do_cbs: bool = True) -> None:
        try:
            await super()._close(status, do_cbs)
        except (OSError, RuntimeError):
            # After an -ERR, nats-py writes what it still holds to the socket the server closed, and
            # raises before it closes the transport and calls back: without this, the session would only
            # notice the lost connection when a flush times out.
            transport: Any = self._transport
            if transport is not None:
                transport.close()
            if do_cbs:
                if self._disconnected_cb is not None:
                    await self._disconnected_cb()
                if self._closed_cb is not None:
                    await self._closed_cb()


class TlsOnlyClient(GatewayClient):
    """A client that refuses a server whose INFO does not require TLS, before any credential is sent.

    nats-py upgrades to TLS only when the server's INFO says ``tls_required``; a server that does not say
    it (or someone in the middle removing it) would get the CONNECT, credentials included, in plaintext.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not info.get("tls_required"):
            raise NatsError("the server does not require TLS; refusing to continue in plaintext (tls is configured)")
        await super()._process_info(info, initial_connection)


def loss_blame(nc: GatewayClient, ended: BaseException | None) -> str | None:
    """How a lost connection is told when a message written on it may have caused it, or None when none
    can have: a stop, or a stall (PINGs or a flush unanswered), which is the network's or the server's.

    Only the server closing the connection counts: its ``-ERR`` first (``maximum control line
    exceeded``), else an end of stream or a reset.
    """
    if nc.server_error:
        return f"-ERR '{nc.server_error}'"
    root = ended
    while isinstance(root, BaseExceptionGroup):
        root = root.exceptions[0]
    while root is not None and root.__cause__ is not None:
        root = root.__cause__
    for error in (nc.last_error, root):
        if isinstance(error, UnexpectedEOF):
            return "the server closed the connection"
        if isinstance(error, OSError) and not isinstance(error, TimeoutError):  # a reset, a broken pipe
            return f"{type(error).__name__}: {error}"
    return None


_REFUSALS = (
    (
        "authorization violation",
        "the server refused the credentials: check the user and password, token, NKey seed or creds file",
    ),
    ("user authentication expired", "the server refused the credentials: they have expired"),
    ("user authentication revoked", "the server refused the credentials: they were revoked"),
    ("account authentication expired", "the server refused the credentials: their account has expired"),
    ("authentication timeout", "the server timed out waiting for the credentials"),
    ("secure connection - tls required", "the server requires TLS: use a tls:// URL or a tls block"),
    ("maximum account active connections exceeded", "the account has reached its limit of connections"),
    ("maximum connections exceeded", "the server has reached its limit of connections"),
    ("maximum subscriptions exceeded", "the server refused a subscription: the user's limit is reached"),
)
"""nats-server's ``-ERR`` texts that refuse the gateway, in words (matched in lower case)."""


def server_error_text(exc: BaseException) -> str:
    """The server's own ``-ERR`` text in a nats-py error (``nats: 'Authorization Violation'``)."""
    if isinstance(exc, AuthorizationError):
        return "Authorization Violation"
    text = str(exc)
    return text.removeprefix("nats: ").strip().strip("'")


def refusal_words(text: str) -> str | None:
    """A refusal by nats-server (its ``-ERR`` text) in one sentence, or None if ``text`` is not one.

    ``Permissions Violation for Publish to "x"`` / ``for Subscription to "x"``: the connection stays up,
    nothing is delivered there."""
    low = text.lower()
    if low.startswith(PERMISSIONS_ERR):
        what = text[len(PERMISSIONS_ERR) :].strip()
        if what.lower().startswith("for publish to"):
            return f"the server does not permit this user to publish to {what[len('for publish to') :].strip()}"
        if what.lower().startswith("for subscription to"):
            subject = what[len("for subscription to") :].strip()
            return f"the server does not permit this user to subscribe to {subject}"
        return f"the server does not permit this user that ({what})"
    return next((said for err, said in _REFUSALS if low.startswith(err)), None)


def refusal(exc: BaseException, servers: str) -> BrokerRefusal | None:
    """A connect that nats-server refused (its ``-ERR``) as :class:`BrokerRefusal`, or None."""
    if not isinstance(exc, NatsError):
        return None
    text = server_error_text(exc)
    said = refusal_words(text)
    if said is None:
        return None
    return BrokerRefusal(f"{said} ({servers}: -ERR '{text}')", nats_error=text)
