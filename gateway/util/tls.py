"""TLS settings shared by every connector, and the checks that make a bad one a config error.

A ``tls:`` block names files; :meth:`TlsConfig.context` builds the client
``ssl.SSLContext`` from them (verification and the server-name check on,
TLS 1.2 at least). The loader calls :func:`check_files` so that a missing or
unreadable certificate, key or secret file is reported by ``gateway validate``
and refused by a reload, with its key path, before anything connects.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.util.redact import register_secret


class TlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Client TLS towards a broker. Verification and the server-name check are on unless told otherwise."""

    ca_file: str | None = None
    """PEM file of the CA(s) that signed the broker's certificate. Default: the system's trust store."""
    cert_file: str | None = None
    """PEM client certificate, for brokers that require one (mTLS). May also hold the key."""
    key_file: str | None = None
    """PEM private key of ``cert_file`` (when not inside it)."""
    key_password: str | None = None
    """Password of an encrypted ``key_file``; use ``${file:PATH}`` or ``${ENV}`` rather than a literal."""
    key_password_file: str | None = None
    """File holding the password of ``key_file`` (read at each connect)."""
    server_name: str | None = None
    """Name to expect in the broker's certificate when it differs from the host in the URL."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted."""
    insecure_skip_verify: bool = False
    """Accept any certificate and any name. For a lab only: the gateway logs a warning at every connect."""

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        if (self.key_password is not None or self.key_password_file is not None) and self.cert_file is None:
            raise ValueError("key_password needs cert_file and key_file")
        if self.key_password is not None and self.key_password_file is not None:
            raise ValueError("set key_password or key_password_file, not both")
        if self.key_password:
            register_secret(self.key_password)

    def files(self) -> dict[str, str]:
        """Key → path of every file this block names."""
        keys = ("ca_file", "cert_file", "key_file", "key_password_file")
        return {k: v for k in keys if (v := getattr(self, k)) is not None}

    def password(self) -> str | None:
        if self.key_password_file is not None:
            return read_secret(self.key_password_file)
        return self.key_password

    def context(self) -> ssl.SSLContext:
        """A client context; raises ``OSError``/``ssl.SSLError`` on unreadable or mismatched files."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if self.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=self.password())
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def read_secret(path: str) -> str:
    """The content of a secret file without its trailing newline; registered so logs never show it."""
    value = Path(path).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    register_secret(value)
    return value


def describe_ssl_error(exc: BaseException) -> str:
    """A one-line reason for a failed TLS handshake or context (what the user must fix)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"


def check_files(config: Any) -> list[tuple[str, str]]:
    """(key path, problem) for every file a connector config names that cannot be used.

    Looks at ``*_file`` string fields of the config and of its ``tls``/``sasl`` blocks, then builds the
    TLS context once so that a key that does not match its certificate, a wrong key password or a
    file that is not PEM is reported now rather than at the first connect.
    """
    problems: list[tuple[str, str]] = []
    for path, file in _file_fields(config, ""):
        p = Path(file).expanduser()
        try:
            with p.open("rb"):
                pass
        except OSError as exc:
            problems.append((path, f"cannot read {file}: {exc.strerror or exc}"))
    tls = getattr(config, "tls", None)
    if isinstance(tls, TlsConfig) and not problems:
        try:
            tls.context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(("tls", f"cannot use the TLS files: {describe_ssl_error(exc)}"))
    return problems


def _file_fields(obj: Any, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not isinstance(obj, msgspec.Struct):
        return out
    for f in msgspec.structs.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.encode_name}"
        if isinstance(value, str) and f.name.endswith("_file"):
            out.append((key, value))
        elif isinstance(value, msgspec.Struct):
            out.extend(_file_fields(value, f"{key}."))
    return out


def client_context(tls: TlsConfig | None, log: Any) -> ssl.SSLContext:
    """The context for one connect: the block's, or the system trust store's; warns when verification is off."""
    if tls is None:
        return ssl.create_default_context()
    if tls.insecure_skip_verify:
        log.warning("connector.tls_verification_off", hint="tls.insecure_skip_verify: any server is trusted")
    return tls.context()
