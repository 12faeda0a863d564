"""TLS contexts for both sides, built from PgBouncer's client_tls_* and server_tls_* settings."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl

from uvloop.loop import SSLProtocol

log = logging.getLogger("pgmulti.tls")

# PgBouncer's tls_protocols words; "secure" and "default" mean TLS 1.2 and newer.
_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_PROTOCOL_SETS = {
    "secure": ("tlsv1.2", "tlsv1.3"),
    "default": ("tlsv1.2", "tlsv1.3"),
    "all": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
    "legacy": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
}
# PgBouncer's cipher aliases; anything else is an OpenSSL cipher string.
_CIPHER_ALIASES = {
    "default": None, "secure": None, "fast": None, "normal": None,
    "all": "ALL:!aNULL",
}

# PostgreSQL 17's ALPN protocol name (required for direct TLS, sent by libpq 17 always).
ALPN_POSTGRESQL = "postgresql"
# Bytes handed to the TLS layer per call (uvloop's SSLProtocol buffer holds 256 KiB).
_FEED_CHUNK = 65536
# uvloop's handshake timeout has no "never": client_login_timeout = 0 waits this long.
_NO_TIMEOUT = 365 * 86400.0

VERIFYING_MODES = ("verify-ca", "verify-full")
REQUIRING_MODES = ("require", "verify-ca", "verify-full")


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are the C methods themselves.

    ssl.SSLObject wraps each of them in a Python method that only calls the C one; uvloop
    calls them for every TLS record, so the wrappers cost a Python frame each per record.
    Same arguments, same results, same exceptions: only the frame is gone. It also keeps the
    memory BIOs it was made with, so the codec can run the TLS of a busy connection itself
    (Relay.use_direct_tls).
    """

    @classmethod
    def _create(cls, incoming, outgoing, *args, **kwargs):
        self = super()._create(incoming, outgoing, *args, **kwargs)
        self.incoming = incoming
        self.outgoing = outgoing
        c_object = self._sslobj
        self.read = c_object.read
        self.write = c_object.write
        self.pending = c_object.pending
        return self


class TlsConfigError(ValueError):
    """A TLS setting that cannot be turned into a working context."""


def _versions(setting: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    words = _PROTOCOL_SETS.get(setting.strip().lower())
    if words is None:
        words = tuple(w for w in setting.replace(",", " ").lower().split() if w)
    try:
        versions = sorted(_VERSIONS[w] for w in words)
    except KeyError as exc:
        raise TlsConfigError(f"unknown TLS protocol {exc.args[0]!r} in {setting!r}") from None
    if not versions:
        raise TlsConfigError(f"no TLS protocol in {setting!r}")
    return versions[0], versions[-1]


def _apply_common(ctx: ssl.SSLContext, protocols: str, ciphers: str) -> None:
    low, high = _versions(protocols)
    ctx.minimum_version = low
    ctx.maximum_version = high
    # As PostgreSQL and libpq: no TLS 1.2 renegotiation, on either leg (nothing in the
    # protocol needs it, and it would stall the codec's direct TLS mid-transaction).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    cipher_string = _CIPHER_ALIASES.get(ciphers.strip().lower(), ciphers)
    if cipher_string:
        try:
            ctx.set_ciphers(cipher_string)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"bad cipher list {ciphers!r}: {exc}") from None


def client_context(cfg) -> ssl.SSLContext | None:
    """The context pgmulti uses as a TLS server towards clients, or None if TLS is off."""
    mode = cfg.client_tls_sslmode
    if mode == "disable":
        return None
    if not cfg.client_tls_cert_file or not cfg.client_tls_key_file:
        raise TlsConfigError(f"client_tls_sslmode = {mode} needs client_tls_cert_file "
                             "and client_tls_key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = DirectSSLObject
    try:
        ctx.load_cert_chain(cfg.client_tls_cert_file, cfg.client_tls_key_file)
        if cfg.client_tls_ca_file:
            ctx.load_verify_locations(cfg.client_tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load client TLS files: {exc}") from None
    if mode in VERIFYING_MODES:
        if not cfg.client_tls_ca_file:
            raise TlsConfigError(f"client_tls_sslmode = {mode} needs client_tls_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED  # clients must present a certificate we trust
    else:
        ctx.verify_mode = ssl.CERT_NONE
    _apply_common(ctx, cfg.client_tls_protocols, cfg.client_tls_ciphers)
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    # As PostgreSQL's server: no TLS 1.3 session tickets. libpq never resumes a session, and
    # making the two tickets OpenSSL sends by default costs 50-100 us per handshake.
    ctx.num_tickets = 0
    return ctx


def server_context(cfg) -> ssl.SSLContext | None:
    """The context pgmulti uses as a TLS client towards PostgreSQL, or None if TLS is off."""
    mode = cfg.server_tls_sslmode
    if mode in ("disable", "allow"):
        # allow: plain unless the server insists, which PostgreSQL never does by itself.
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = DirectSSLObject
    if mode in VERIFYING_MODES:
        try:
            if cfg.server_tls_ca_file:
                ctx.load_verify_locations(cfg.server_tls_ca_file)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load server_tls_ca_file: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = mode == "verify-full"
    else:
        # prefer / require encrypt without checking who answers, as libpq does.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.server_tls_cert_file and cfg.server_tls_key_file:
        try:
            ctx.load_cert_chain(cfg.server_tls_cert_file, cfg.server_tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load server TLS client certificate: {exc}") from None
    _apply_common(ctx, cfg.server_tls_protocols, cfg.server_tls_ciphers)
    # As libpq 17+ does; PostgreSQL 17+ refuses a TLS client naming another protocol.
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    return ctx


class TlsContexts:
    """Both contexts, rebuilt on reload; connections keep the context they started with."""

    def __init__(self, cfg):
        self.client = client_context(cfg)
        self.client_mode = cfg.client_tls_sslmode
        self.client_binding = _end_point_binding(cfg.client_tls_cert_file) if self.client else None
        self.server = server_context(cfg)
        self.server_mode = cfg.server_tls_sslmode

    @property
    def client_tls_required(self) -> bool:
        return self.client is not None and self.client_mode in REQUIRING_MODES

    @property
    def server_tls_required(self) -> bool:
        return self.server_mode in REQUIRING_MODES


def _end_point_binding(cert_file: str) -> bytes | None:
    """SCRAM channel binding data of our own certificate, or None if it cannot bind."""
    from .auth import AuthError, tls_server_end_point
    try:
        with open(cert_file) as handle:
            pem = handle.read()
        # The leaf is the first certificate of a chain file.
        end = pem.find("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(pem[:end + len("-----END CERTIFICATE-----")] if end >= 0 else pem)
        return tls_server_end_point(der)
    except (OSError, ValueError, AuthError) as exc:
        log.warning("SCRAM channel binding disabled: %s", exc)
        return None


def accept(transport, protocol, context: ssl.SSLContext, already_read: bytes,
           timeout: float) -> tuple[asyncio.BaseTransport, asyncio.Future]:
    """Start server-side TLS on `transport`; `protocol` receives the decrypted bytes.

    What loop.start_tls() does, without its coroutine and the task it needs (a login over
    TLS would pay for both): returns the TLS transport at once, and a future that is done
    when the handshake is, with the reason as its exception if it failed (the transport is
    then closed). `already_read` is the start of the handshake if it was read already
    (direct TLS is recognised by its first byte): it goes into the TLS layer first.
    `timeout` 0 waits for the handshake without limit.
    """
    loop = asyncio.get_running_loop()
    handshake = loop.create_future()
    tls_protocol = SSLProtocol(loop, protocol, context, handshake, server_side=True,
                               call_connection_made=False,
                               ssl_handshake_timeout=timeout if timeout > 0 else _NO_TIMEOUT)
    transport.pause_reading()
    transport.set_protocol(tls_protocol)
    tls_protocol.connection_made(transport)  # starts the handshake: waits for input
    app_transport = tls_protocol._get_app_transport()
    try:
        for pos in range(0, len(already_read), _FEED_CHUNK):
            chunk = already_read[pos:pos + _FEED_CHUNK]
            buffer = tls_protocol.get_buffer(len(chunk))
            buffer[:len(chunk)] = chunk
            tls_protocol.buffer_updated(len(chunk))
        transport.resume_reading()
    except BaseException:
        app_transport.close()
        raise
    handshake.add_done_callback(functools.partial(_close_if_failed, app_transport))
    return app_transport, handshake


def _close_if_failed(app_transport, handshake: asyncio.Future) -> None:
    if handshake.cancelled() or handshake.exception() is not None:
        app_transport.close()


def describe(ssl_object) -> str:
    """PgBouncer's SHOW CLIENTS tls column: protocol/cipher."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"
