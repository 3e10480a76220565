"""TLS- and auth-enabled test brokers on loopback, built on :mod:`tests.support.brokers`.

::

    from tests.support.secure import Pki, SecureMosquitto, SecureNatsServer, TansuTls

    pki = Pki(tmp_path / "pki")
    with SecureMosquitto(pki) as mqtt, SecureNatsServer(pki) as nats, TansuTls(pki) as kafka:
        print(mqtt.url, nats.url, kafka.bootstrap)

* :class:`Pki`: a throwaway CA (trustme) with server, client, wrong-hostname
  and wrong-CA certificates as PEM files.
* :class:`SecureMosquitto`: one TLS listener, password file, optional mTLS.
* :class:`SecureNatsServer`: TLS (optional mTLS) plus user/password + NKey
  users, a token, or operator mode (JWTs built here, ``.creds`` file written).
* :class:`TansuTls`: Tansu behind an stunnel TLS terminator (the Tansu build
  has no working TLS of its own), optional mTLS.  ``authentication=True``
  starts Tansu with ``--authentication``: SASL is then required, but this
  Tansu build stores no SCRAM users at all, so every login fails with
  ``unknown-user`` (only useful for "auth is rejected" tests).

Every readiness probe speaks TLS with the right CA, hostname, client
certificate and credentials, so a started fixture is known to accept them.
Processes and work directories are tracked exactly like in ``brokers.py``
(atexit, ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import nkeys  # type: ignore[import-untyped]
import trustme
from cryptography.hazmat.primitives import serialization

from tests.support.brokers import (
    LOOPBACK,
    PROBE_TIMEOUT,
    ConfigFileBroker,
    Mosquitto,
    NatsServer,
    Tansu,
    TansuStorage,
    kafka_check,
    mqtt_handshake,
    recv_line,
)

__all__ = [
    "CLIENT_CN",
    "GW_PASSWORD",
    "GW_USER",
    "NATS_TOKEN",
    "SERVER_NAME",
    "WRONG_HOST",
    "NatsAuthMode",
    "Pki",
    "SecureMosquitto",
    "SecureNatsServer",
    "TansuTls",
    "creds_text",
    "nats_jwt",
]

#: the name every server certificate is valid for (plus IP 127.0.0.1)
SERVER_NAME = "localhost"
#: the only name the ``wrong_host`` certificate is valid for
WRONG_HOST = "wrong.example"
#: common name of the client certificate
CLIENT_CN = "gateway"
GW_USER = "gw"
GW_PASSWORD = "gw-secret"
NATS_TOKEN = "gw-token-secret"

# --------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------


class Pki:
    """A throwaway CA and certificates, written as PEM files into ``directory``.

    Attributes are file paths: ``ca``, ``server_cert``/``server_key``
    (``localhost`` + 127.0.0.1), ``client_cert``/``client_key`` (CN
    ``gateway``), ``client_key_encrypted`` (PKCS#8, password
    ``client_key_password``), ``other_ca`` (an unrelated CA),
    ``other_client_cert``/``other_client_key`` (CN ``gateway`` but issued by
    ``other_ca``) and ``wrong_host_cert``/``wrong_host_key`` (good CA, only
    ``wrong.example``).  Keys are mode 0600.
    """

    client_key_password = "client-key-pass"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        ca = trustme.CA(organization_name="gateway-tests CA")
        other = trustme.CA(organization_name="unrelated CA")
        server = ca.issue_cert(SERVER_NAME, LOOPBACK, common_name=SERVER_NAME)
        client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
        wrong = ca.issue_cert(WRONG_HOST, common_name=WRONG_HOST)
        other_client = other.issue_cert(CLIENT_CN, common_name=CLIENT_CN)

        self.ca = d / "ca.pem"
        self.other_ca = d / "other-ca.pem"
        self.server_cert = d / "server.pem"
        self.server_key = d / "server.key"
        self.client_cert = d / "client.pem"
        self.client_key = d / "client.key"
        self.client_key_encrypted = d / "client-encrypted.key"
        self.other_client_cert = d / "other-client.pem"
        self.other_client_key = d / "other-client.key"
        self.wrong_host_cert = d / "wrong-host.pem"
        self.wrong_host_key = d / "wrong-host.key"

        ca.cert_pem.write_to_path(str(self.ca))
        other.cert_pem.write_to_path(str(self.other_ca))
        for leaf, cert_path, key_path in (
            (server, self.server_cert, self.server_key),
            (client, self.client_cert, self.client_key),
            (wrong, self.wrong_host_cert, self.wrong_host_key),
            (other_client, self.other_client_cert, self.other_client_key),
        ):
            # leaf first, then the chain (here: nothing, the CA is the issuer)
            cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key_path.write_bytes(leaf.private_key_pem.bytes())
            key_path.chmod(0o600)
        key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
        self.client_key_encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(self.client_key_password.encode()),
            )
        )
        self.client_key_encrypted.chmod(0o600)

    def client_context(
        self,
        *,
        ca: Path | None = None,
        client_cert: bool = False,
        check_hostname: bool = True,
    ) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` trusting ``ca`` (default: the good CA), optionally with the client cert."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca or self.ca))
        ctx.check_hostname = check_hostname
        if client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def _tls_connect(
    address: tuple[str, int], pki: Pki, *, server_name: str, client_cert: bool, sock: socket.socket | None = None
) -> ssl.SSLSocket:
    """TLS to ``address`` (or over ``sock``), verifying the chain and ``server_name``."""
    if sock is None:
        sock = socket.create_connection(address, timeout=PROBE_TIMEOUT)
    ctx = pki.client_context(client_cert=client_cert)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


# --------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------


def _mqtt_string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">H", len(raw)) + raw


def _mqtt_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_connect_auth(client_id: str, username: str | None, password: str | None) -> bytes:
    """MQTT 3.1.1 CONNECT (clean session) with optional username/password."""
    flags = 0x02
    payload = _mqtt_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password)
    variable = b"\x00\x04MQTT" + bytes([4, flags]) + struct.pack(">H", 10)
    body = variable + payload
    return b"\x10" + _mqtt_remaining_length(len(body)) + body


class SecureMosquitto(Mosquitto):
    """Mosquitto with one TLS listener on 127.0.0.1, a password file and no anonymous access.

    ``require_certificate=True`` makes it mTLS (client cert from ``pki.ca``);
    ``wrong_host=True`` serves the ``wrong.example`` certificate.  Users come
    from ``users`` (default ``{"gw": "gw-secret"}``), hashed into
    ``workdir/passwd`` by ``mosquitto_passwd``.
    """

    name = "mosquitto-tls"

    def __init__(
        self,
        pki: Pki,
        *,
        users: dict[str, str] | None = None,
        require_certificate: bool = False,
        wrong_host: bool = False,
        port: int | None = None,
        workdir: Path | None = None,
        persistence: bool = True,
        extra_config: str = "",
    ) -> None:
        super().__init__(port=port, workdir=workdir, persistence=persistence, extra_config=extra_config)
        self.pki = pki
        self.users = dict(users) if users is not None else {GW_USER: GW_PASSWORD}
        if not self.users:
            raise ValueError("SecureMosquitto needs at least one user")
        self.require_certificate = require_certificate
        self.wrong_host = wrong_host

    @property
    def url(self) -> str:
        return f"mqtts://{SERVER_NAME}:{self.port}"

    @property
    def tls_server_name(self) -> str:
        """The name the served certificate is valid for."""
        return WRONG_HOST if self.wrong_host else SERVER_NAME

    @property
    def username(self) -> str:
        return next(iter(self.users))

    @property
    def password(self) -> str:
        return self.users[self.username]

    @property
    def password_file(self) -> Path:
        return self.workdir / "passwd"

    def config_text(self) -> str:
        base = super().config_text()
        if "allow_anonymous true\n" not in base:
            raise RuntimeError("unexpected Mosquitto base config; cannot switch off anonymous access")
        base = base.replace("allow_anonymous true\n", "allow_anonymous false\n", 1)
        cert, key = (
            (self.pki.wrong_host_cert, self.pki.wrong_host_key)
            if self.wrong_host
            else (self.pki.server_cert, self.pki.server_key)
        )
        listener = f"listener {self.port} {self.host}\n"
        if not base.startswith(listener):
            raise RuntimeError("unexpected Mosquitto base config; cannot configure TLS on its listener")
        # Listener options apply to the most recent listener: put them right after ours
        # (``extra_config`` may add more listeners at the end).
        tls = [
            f"cafile {self.pki.ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]
        base = listener + "\n".join(tls) + "\n" + base[len(listener) :]
        return base + f"password_file {self.password_file}\n"

    def _prepare(self) -> None:
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        self.password_file.unlink(missing_ok=True)
        self.password_file.touch(mode=0o600)
        for user, password in self.users.items():
            # -b: password on the command line (test credentials only)
            subprocess.run(
                [tool, "-b", str(self.password_file), user, password],
                check=True,
                capture_output=True,
                timeout=30,
            )
        self.password_file.chmod(0o600)
        super()._prepare()

    def _probe(self) -> bool:
        self._probe_seq += 1
        client_id = f"secure-probe-{os.getpid()}-{self._probe_seq}"
        with _tls_connect(
            self.address, self.pki, server_name=self.tls_server_name, client_cert=self.require_certificate
        ) as s:
            return mqtt_handshake(s, _mqtt_connect_auth(client_id, self.username, self.password))


# --------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------

#: ``users``: user/password + an NKey user; ``token``: one token;
#: ``operator``: JWTs (operator, system + app account, user) and a ``.creds`` file.
NatsAuthMode = Literal["users", "token", "operator"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_nkey(prefix: int) -> Any:
    """A fresh ``nkeys.KeyPair`` with the given role prefix (``nkeys.PREFIX_BYTE_*``)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _public(kp: Any) -> str:
    return str(kp.public_key.decode())


def nats_jwt(claims_nats: dict[str, Any], *, subject: str, name: str, issuer: Any) -> str:
    """Encode and sign a NATS v2 JWT (``ed25519-nkey``) for ``subject``, signed by ``issuer``'s key pair."""
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": _public(issuer),
        "name": name,
        "sub": subject,
        "nats": claims_nats,
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode() + os.urandom(8)).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64url(signature)}"


def _nats_limits(jetstream: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    if jetstream:
        limits.update(
            mem_storage=-1,
            disk_storage=-1,
            streams=-1,
            consumer=-1,
            max_ack_pending=-1,
            mem_max_stream_bytes=-1,
            disk_max_stream_bytes=-1,
            max_bytes_required=False,
        )
    return limits


def creds_text(user_jwt: str, user_seed: str) -> str:
    """The standard ``.creds`` layout (as written by ``nsc``)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def _user_jwt(name: str, account: Any) -> tuple[str, str]:
    """A user JWT issued by ``account`` and the user's seed."""
    user = _new_nkey(nkeys.PREFIX_BYTE_USER)
    claims = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
    return nats_jwt(claims, subject=_public(user), name=name, issuer=account), str(user.seed.decode())


class SecureNatsServer(NatsServer):
    """nats-server with a ``tls {}`` block and authentication.

    ``mode="users"``: ``gw``/``gw-secret`` plus an NKey user (seed in
    ``nkey_seed_file``); ``mode="token"``: token ``NATS_TOKEN``;
    ``mode="operator"``: operator/account/user JWTs with a MEMORY resolver, the
    user's credentials in ``creds_file`` and, for negative tests,
    ``foreign_creds_file`` (a user of an account the server does not know).
    ``verify_client=True`` requires a client certificate from ``pki.ca``.
    JetStream works in every mode (the operator-mode account JWT grants it).
    The HTTP monitor stays plain HTTP on ``monitor_port``.
    """

    name = "nats-server-tls"

    def __init__(
        self,
        pki: Pki,
        *,
        mode: NatsAuthMode = "users",
        verify_client: bool = False,
        wrong_host: bool = False,
        port: int | None = None,
        jetstream: bool = True,
        monitor_port: int | None = None,
        extra_config: str = "",
        workdir: Path | None = None,
    ) -> None:
        if mode not in ("users", "token", "operator"):
            raise ValueError(f"unknown NATS auth mode {mode!r}")
        super().__init__(
            port=port, jetstream=jetstream, monitor_port=monitor_port, extra_config=extra_config, workdir=workdir
        )
        self.pki = pki
        self.mode: NatsAuthMode = mode
        self.verify_client = verify_client
        self.wrong_host = wrong_host
        self.user = GW_USER
        self.password = GW_PASSWORD
        self.token = NATS_TOKEN
        self.nkey_seed_file = self.workdir / "user.nk"
        self.creds_file = self.workdir / "user.creds"
        self.foreign_creds_file = self.workdir / "foreign.creds"
        self._nkey_public = ""
        self._user_jwt = ""
        self._user_seed = ""
        self._operator_config = ""
        self._write_credentials()

    def _write_credentials(self) -> None:
        """Create the key material once (it stays valid across restarts)."""
        if self.mode == "users":
            kp = _new_nkey(nkeys.PREFIX_BYTE_USER)
            self._nkey_public = _public(kp)
            self._user_seed = str(kp.seed.decode())
            self.nkey_seed_file.write_text(self._user_seed + "\n")
            self.nkey_seed_file.chmod(0o600)
        elif self.mode == "operator":
            operator = _new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
            system = _new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
            app = _new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
            op_jwt = nats_jwt(
                {"type": "operator", "version": 2, "system_account": _public(system)},
                subject=_public(operator),
                name="test-operator",
                issuer=operator,
            )
            accounts = {}
            for kp, acc_name, js in ((system, "SYS", False), (app, "APP", self.jetstream)):
                claims = {
                    "type": "account",
                    "version": 2,
                    "limits": _nats_limits(js),
                    "default_permissions": {"pub": {}, "sub": {}},
                }
                accounts[_public(kp)] = nats_jwt(claims, subject=_public(kp), name=acc_name, issuer=operator)
            self._user_jwt, self._user_seed = _user_jwt(GW_USER, app)
            self.creds_file.write_text(creds_text(self._user_jwt, self._user_seed))
            self.creds_file.chmod(0o600)
            stranger = _new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
            self.foreign_creds_file.write_text(creds_text(*_user_jwt("stranger", stranger)))
            self.foreign_creds_file.chmod(0o600)
            preload = "\n".join(f'  {pub}: "{jwt}"' for pub, jwt in accounts.items())
            self._operator_config = (
                f'operator: "{op_jwt}"\n'
                f'system_account: "{_public(system)}"\n'
                "resolver: MEMORY\n"
                f"resolver_preload: {{\n{preload}\n}}"
            )

    @property
    def url(self) -> str:
        return f"tls://{SERVER_NAME}:{self.port}"

    @property
    def plain_url(self) -> str:
        """``nats://`` form of :attr:`url` (the client upgrades to TLS because the server requires it)."""
        return f"nats://{SERVER_NAME}:{self.port}"

    @property
    def tls_server_name(self) -> str:
        return WRONG_HOST if self.wrong_host else SERVER_NAME

    @property
    def nkey_public(self) -> str:
        """Public key of the NKey user (``mode="users"``)."""
        return self._nkey_public

    def config_text(self) -> str:
        cert, key = (
            (self.pki.wrong_host_cert, self.pki.wrong_host_key)
            if self.wrong_host
            else (self.pki.server_cert, self.pki.server_key)
        )
        tls = [
            "tls {",
            f'  cert_file: "{cert}"',
            f'  key_file: "{key}"',
            f'  ca_file: "{self.pki.ca}"',
            f"  verify: {'true' if self.verify_client else 'false'}",
            "  timeout: 5",
            "}",
        ]
        if self.mode == "users":
            auth = (
                "authorization {\n  users = [\n"
                f'    {{user: "{self.user}", password: "{self.password}"}}\n'
                f'    {{nkey: "{self._nkey_public}"}}\n'
                "  ]\n}"
            )
        elif self.mode == "token":
            auth = f'authorization {{\n  token: "{self.token}"\n}}'
        else:
            auth = self._operator_config
        return super().config_text() + "\n".join([*tls, auth, ""])

    def _connect_options(self, nonce: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "tls_required": True, "name": "secure-probe"}
        if self.mode == "users":
            opts.update(user=self.user, **{"pass": self.password})
        elif self.mode == "token":
            opts["auth_token"] = self.token
        else:
            signature = nkeys.from_seed(self._user_seed.encode()).sign(nonce.encode())
            opts.update(jwt=self._user_jwt, sig=_b64url(signature))
        return opts

    def _probe(self) -> bool:
        with socket.create_connection(self.address, timeout=PROBE_TIMEOUT) as raw:
            line = recv_line(raw)
            if not line.startswith(b"INFO "):
                raise ConnectionError("no INFO line from nats-server")
            info = json.loads(line[5:])
            with _tls_connect(
                self.address,
                self.pki,
                server_name=self.tls_server_name,
                client_cert=self.verify_client,
                sock=raw,
            ) as s:
                connect = json.dumps(self._connect_options(str(info.get("nonce", ""))))
                s.sendall(f"CONNECT {connect}\r\nPING\r\n".encode())
                reply = recv_line(s)
                if reply != b"PONG\r\n":
                    raise ConnectionError(f"nats-server answered {reply!r}")
        if not self.jetstream:
            return True
        return self._http_ok("/healthz?js-enabled-only=true") and self._http_ok("/healthz")


# --------------------------------------------------------------------------
# Kafka over TLS: Tansu behind stunnel
# --------------------------------------------------------------------------


def _stunnel_bin() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("stunnel not installed: apt-get install -y stunnel4")


class BackendTansu(Tansu):
    """Tansu on an internal loopback port, advertising the TLS front end's ``localhost:<port>``."""

    name = "tansu-backend"

    def __init__(
        self,
        *,
        advertised_port: int,
        authentication: bool,
        workdir: Path,
        storage: TansuStorage,
    ) -> None:
        super().__init__(workdir=workdir, storage=storage)
        self.advertised_port = advertised_port
        self.authentication = authentication

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://{SERVER_NAME}:{self.advertised_port}"
        if self.authentication:
            cmd.append("--authentication")
        return cmd

    def _probe(self) -> bool:
        with socket.create_connection(self.address, timeout=PROBE_TIMEOUT) as s:
            return kafka_check(s, self.advertised_port, metadata=not self.authentication)


class TansuTls(ConfigFileBroker):
    """Kafka over TLS: stunnel on ``127.0.0.1:<port>`` in front of a private Tansu.

    Tansu (``self.backend``, work dir ``workdir/tansu``) listens on an internal
    port and advertises ``localhost:<port>``, so clients bootstrap and produce
    through the TLS port only.  ``verify_client=True`` makes stunnel require a
    client certificate from ``pki.ca`` (``verify = 2``); ``wrong_host=True``
    serves the ``wrong.example`` certificate.  ``authentication=True`` passes
    ``--authentication`` to Tansu (SASL required; see the module docstring:
    no login can succeed with this Tansu build).  :meth:`start` starts Tansu,
    then stunnel; :meth:`stop` and :meth:`kill` act on both.  This object's
    ``pid``/``log_path`` are stunnel's.
    """

    name = "stunnel"
    config_file = "stunnel.conf"

    def __init__(
        self,
        pki: Pki,
        *,
        verify_client: bool = False,
        wrong_host: bool = False,
        authentication: bool = False,
        storage: TansuStorage = "memory",
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.binary = _stunnel_bin()
        super().__init__(port=port, workdir=workdir)
        self.pki = pki
        self.verify_client = verify_client
        self.wrong_host = wrong_host
        self.authentication = authentication
        self.backend = BackendTansu(
            advertised_port=self.port,
            authentication=authentication,
            workdir=self.workdir / "tansu",
            storage=storage,
        )

    @property
    def bootstrap(self) -> str:
        return f"{SERVER_NAME}:{self.port}"

    @property
    def tls_server_name(self) -> str:
        return WRONG_HOST if self.wrong_host else SERVER_NAME

    def config_text(self) -> str:
        cert, key = (
            (self.pki.wrong_host_cert, self.pki.wrong_host_key)
            if self.wrong_host
            else (self.pki.server_cert, self.pki.server_key)
        )
        lines = [
            "foreground = yes",
            "pid =",  # no pid file (the default is under /var/run)
            "debug = notice",
            "syslog = no",
            "[kafka]",
            f"accept = {self.host}:{self.port}",
            f"connect = {self.backend.host}:{self.backend.port}",
            f"cert = {cert}",
            f"key = {key}",
            # without a CAfile stunnel logs "No trusted certificates found"
            f"CAfile = {self.pki.ca}",
        ]
        if self.verify_client:
            lines.append("verify = 2")  # require a client certificate and verify its chain
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        return [self.binary, str(self.config_path)]  # stunnel takes the file as its argument

    def _probe(self) -> bool:
        with _tls_connect(
            self.address, self.pki, server_name=self.tls_server_name, client_cert=self.verify_client
        ) as s:
            return kafka_check(s, self.port, metadata=not self.authentication)

    def start(self, timeout: float = 20.0) -> None:
        """Start Tansu (if not running), then stunnel."""
        if not self.backend.running:
            self.backend.start(timeout=timeout)
        super().start(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stunnel, then Tansu.  Idempotent."""
        try:
            super().stop(timeout=timeout)
        finally:
            self.backend.stop(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL stunnel and Tansu.  Idempotent."""
        try:
            super().kill()
        finally:
            self.backend.kill()
