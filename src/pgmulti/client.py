"""Client connection: startup, cancel, authentication, then the pooled (or admin) session."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING

from . import auth, errors, hba, prepared, protocol, session, tls
from ._codec import ClientRelay, KnownLogin
from .errors import PgError

if TYPE_CHECKING:
    from .pool import Pool
    from .server import ServerConnection

log = logging.getLogger("pgmulti.client")

ADMIN_DATABASES = ("pgbouncer", "pgmulti")

# A plain client's socket is the codec's from accept on (SocketTransport). A TLS client's
# reads go through uvloop's TLS layer until this many after login, then the codec runs its
# TLS and socket itself (DirectIO): a short session (pgbench -C) is not worth the switch.
DIRECT_IO_AFTER_READS = 3

# During authentication only password messages and Terminate are acceptable (the codec
# closes the connection at Terminate: DISCONNECT).
AUTH_ACTIONS = protocol.action_table(protocol.REJECT, p=protocol.INSPECT, X=protocol.DISCONNECT)
# Pooled session: every frontend message flows to the server; Terminate ends the session.
RELAY_ACTIONS = protocol.action_table(
    protocol.REJECT, **{t: protocol.PASS for t in "BCdcfDEHFPQS"}, X=protocol.DISCONNECT)
# Transaction pooling with max_prepared_statements: statement names are rewritten (the codec
# forwards the messages that name no statement itself, Python rewrites the others).
PREPARED_RELAY_ACTIONS = protocol.action_table(
    protocol.REJECT, **{t: protocol.PASS for t in "dcfEHFQ"}, X=protocol.DISCONNECT,
    **{t: protocol.STATEMENT_REQUEST for t in "PBDCS"})
PREPARED_TYPES = frozenset(map(ord, "PBDCS"))


def without_simple_query(actions: bytes) -> bytes:
    """disable_pqexec: the same table with Query refused (see on_protocol_error)."""
    table = bytearray(actions)
    table[protocol.QUERY] = protocol.REJECT
    return bytes(table)


# Admin console: simple query protocol only, as in PgBouncer.
ADMIN_ACTIONS = protocol.action_table(protocol.REJECT, Q=protocol.INSPECT, X=protocol.DISCONNECT)

_PROTOCOL_ERROR_TEXT = {
    protocol.ERR_LENGTH: "invalid message length",
    protocol.ERR_TOO_LONG: "message too long",
}


class ClientConnection(ClientRelay, asyncio.BufferedProtocol):
    """One client socket; the Relay forwards its bytes to the linked server. What every
    client has from accept on (app, id, listener_kind, ...) and what a login sets (user,
    database, pool, params, cancel key, ...) are ClientRelay's C fields, set by the codec."""

    # Defaults most connections never change: class attributes cost a -C login nothing.
    _addr: tuple | None = None
    _local_addr: tuple | None = None
    admin = False
    _close_reason = ""
    seen_activity = 0
    rx_bytes_at_trim = -1       # janitor: no read since its last pass -> trim buffer
    busy_since = 0.0            # janitor's clock for query_timeout
    wait_notified = 0.0         # wait_start of the wait query_wait_notify told it about
    xact_since = 0.0            # janitor's clock for transaction_timeout
    scram_keys: tuple[bytes, bytes] | None = None
    tls = ""                    # "" for plain text, else protocol/cipher
    tls_binding: bytes | None = None   # tls-server-end-point data for SCRAM-PLUS
    statements: prepared.ClientStatements | None = None  # from its first named statement
    _password_waiter: asyncio.Future | None = None

    @property
    def addr(self) -> tuple:
        """The client's address, turned into Python objects only when something asks: the
        transport keeps the raw one from accept on, after close too."""
        if self._addr is None:
            if self.transport is None:
                return ("unix", 0)  # not connected yet
            peer = self.transport.get_extra_info("peername")
            self._addr = peer[:2] if isinstance(peer, tuple) else ("unix", 0)
        return self._addr

    @property
    def local_addr(self) -> tuple:
        """The address the client connected to; asked of the socket only when SHOW CLIENTS
        wants it, not for every connection."""
        if self._local_addr is None:
            local = self.transport.get_extra_info("sockname") if self.transport else None
            self._local_addr = local[:2] if isinstance(local, tuple) else ("unix", 0)
        return self._local_addr

    @property
    def pool_mode(self) -> str:
        return self.pool.settings.pool_mode if self.pool is not None else session.SESSION

    # -- connection ----------------------------------------------------------------------

    def session_lost(self) -> None:
        """The connection has closed with more to end than the codec ends itself
        (ClientRelay.connection_lost, which then leaves the pool and the registry and writes
        the log_disconnections line): a login waiting for a password, a server to give
        back."""
        if self._password_waiter and not self._password_waiter.done():
            self._password_waiter.cancel()
        server = self.server
        if server is not None and self.pool is not None:
            reset = self.pool_mode == session.SESSION or self.app.config.pgbouncer.server_reset_query_always
            self.pool.release(self, server, reset=reset)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self._close_reason = reason
        self.close_connection()

    def trim_idle(self) -> None:
        """Nothing read since the janitor's last look: give back the read buffer (allocated
        again by the next read) and, for a TLS client, the descriptor direct I/O holds."""
        self.release_buffer()  # a no-op unless the buffer is empty
        self.rest_direct_io(DIRECT_IO_AFTER_READS)

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.pause_reading()

    def on_backlog(self) -> None:
        """Held (waiting for a server) and still sending: stop reading until linked."""
        self._pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.resume_reading()

    # -- errors --------------------------------------------------------------------------

    def report(self, exc: PgError) -> None:
        """Send an ErrorResponse, log it once, and close the connection if it is fatal."""
        if self.closed:
            return
        if self.app.config.pgbouncer.log_pooler_errors:
            log.warning("%r pooler error: %s%s", self, exc.message,
                        f" ({exc.detail})" if exc.detail else "")
        self.app.count_error(exc.sqlstate)
        self.transport.write(protocol.error_response(exc.severity, exc.sqlstate, exc.message,
                                                     exc.detail, exc.hint))
        if exc.fatal:
            self.close(exc.message)
        elif self.state != "login":
            self.transport.write(protocol.ready_for_query("I"))

    def on_protocol_error(self, code: int, msg_type: int) -> None:
        if code == protocol.ERR_TYPE:
            if self.admin:
                # PgBouncer's answer: an ERROR naming the problem, then the connection closes.
                self.transport.write(protocol.error_response(
                    "ERROR", errors.PROTOCOL_VIOLATION,
                    "extended query protocol not supported by admin console"))
                self.report(errors.protocol_violation("bad packet"))
                return
            if msg_type == protocol.QUERY and self.app.config.pgbouncer.disable_pqexec:
                self.report(errors.protocol_violation("PQexec disallowed"))
                return
            text = f"unsupported frontend message type {chr(msg_type)!r}"
        else:
            text = _PROTOCOL_ERROR_TEXT.get(code, "malformed packet")
        self.report(errors.protocol_violation(text))

    # -- startup -------------------------------------------------------------------------

    def on_message(self, msg_type: int, view) -> None:
        try:
            if msg_type == 0:
                self._startup_packet(view)
            elif msg_type == protocol.PASSWORD_MESSAGE:
                self._password_message(view)
            elif msg_type == protocol.QUERY and self.admin:
                self.app.console.handle_query(self, bytes(view[5:]))
            elif msg_type in PREPARED_TYPES and self.server is not None:
                self._prepared_message(msg_type, view)
        except PgError as exc:
            self.report(exc)
        except protocol.DecodeError as exc:
            self.report(errors.protocol_violation(str(exc)))

    def _startup_packet(self, view) -> None:
        code, rest = protocol.parse_startup(view)
        if code == protocol.SSL_REQUEST_CODE or code == protocol.GSSENC_REQUEST_CODE:
            if self.buffered:
                # Bytes sent before our answer could be mistaken for encrypted data later
                # (the buffer-stuffing attack of CVE-2021-23222).
                raise errors.protocol_violation("received unencrypted data after SSL request")
            context = self.app.tls.client
            if (code == protocol.GSSENC_REQUEST_CODE or context is None or self.tls
                    or self.listener_kind == "unix"):
                self.transport.write(b"N")  # the client continues in plain text
                return
            self.transport.write(b"S")
            self.hold()
            # Stop reading now: the ClientHello must reach the TLS layer, not our buffer.
            # The TLS layer resumes reading once it owns the transport.
            self.transport.pause_reading()
            # The binding belongs to the certificate of this context, even if a reload follows.
            self._start_tls(context, self.app.tls.client_binding)
            return
        if code == protocol.CANCEL_REQUEST_CODE:
            self._cancel_request(rest)
            return
        if self.tls_missing():
            raise errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION, "SSL required",
                               hint="connect with sslmode=require (client_tls_sslmode)")
        if code >> 16 != 3:
            raise errors.protocol_violation(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "server supports 3.0 to 3.2")
        self.startup_phase = False
        params = protocol.parse_startup_params(rest)
        unsupported_options = [name for name in params if name.startswith("_pq_.")]
        self.protocol_version = min(code, protocol.PROTOCOL_LATEST)
        if code > protocol.PROTOCOL_LATEST or unsupported_options:
            # A newer minor version or protocol options: tell the client what we speak.
            self.transport.write(protocol.negotiate_protocol_version(self.protocol_version,
                                                                     unsupported_options))
        self._accept_startup_params(params)
        self.hold()
        login = self._login_at_once()
        if login is None:
            self.app.spawn(self._login())
        elif (code <= protocol.PROTOCOL_LATEST and not unsupported_options
              and self.app.config.pgbouncer.auth_type != "hba"
              and not self.app.config.pgbouncer.application_name_add_host):
            # Nothing but these bytes decided this login (application_name_add_host adds the
            # client's address): the codec logs in the next client sending them.
            self.app.known_logins.remember(bytes(view), login)

    def tls_missing(self) -> bool:
        """client_tls_sslmode requires TLS and this TCP client logs in without it."""
        return self.app.tls.client_tls_required and not self.tls and self.listener_kind == "tcp"

    def on_direct_tls(self) -> None:
        """A TLS ClientHello instead of a startup packet: direct TLS (libpq 17+
        sslnegotiation=direct). The codec has stopped at it, the record still buffered."""
        if self.rx_bytes != self.buffered:
            # Not the first byte of the connection: only a fresh connection may start TLS.
            self.report(errors.protocol_violation("invalid length of startup packet"))
            return
        context = self.app.tls.client
        if context is None or self.listener_kind == "unix":
            # A TLS client cannot read a plain-text ErrorResponse: closing is the clear answer.
            log.info("%r direct TLS connection refused: TLS is off for this listener", self)
            self.close("direct TLS refused")
            return
        client_hello = self.take_buffered()
        self.transport.pause_reading()  # the rest of the handshake is for the TLS layer
        self._start_tls(context, self.app.tls.client_binding, client_hello)

    def on_tls_error(self, exc) -> None:
        """Direct TLS met a record it cannot decrypt: the stream is broken, and as in
        PostgreSQL ("could not receive data from client") the connection ends."""
        log.info("%r TLS error: %s", self, exc)
        self.close("TLS error")
        self.transport.abort()

    def _start_tls(self, context, binding: bytes | None, client_hello: bytes = b"") -> None:
        """Answered 'S' to SSLRequest, or read the first bytes of a direct TLS handshake
        (`client_hello`): handshake, then read the startup packet decrypted."""
        timeout = self.app.config.pgbouncer.client_login_timeout
        try:
            transport, handshake = tls.accept(self.transport, self, context, client_hello, timeout)
        except (OSError, ssl.SSLError) as exc:
            log.info("%r TLS handshake failed: %s", self, exc)
            self.close("TLS handshake failed")
            return
        handshake.add_done_callback(functools.partial(
            self._tls_started, transport, binding, bool(client_hello)))

    def _tls_started(self, transport, binding: bytes | None, direct: bool, handshake) -> None:
        failure = "stopped" if handshake.cancelled() else handshake.exception()
        if failure is not None:
            log.info("%r TLS handshake failed: %s", self, failure or type(failure).__name__)
            self.close("TLS handshake failed")
            return
        if self.closed:
            transport.close()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if direct and ssl_object.selected_alpn_protocol() != tls.ALPN_POSTGRESQL:
            # As PostgreSQL: direct TLS without ALPN could be another protocol's client
            # talking to us by mistake (ALPACA), so it is refused.
            log.info("%r direct TLS connection refused: no ALPN protocol \"%s\"", self,
                     tls.ALPN_POSTGRESQL)
            self.attach_transport(transport)
            self.close("direct TLS without ALPN")
            return
        raw_transport = self.transport
        self.attach_transport(transport)
        self.use_direct_tls(raw_transport, ssl_object)  # our contexts make DirectSSLObjects
        self.tls = tls.describe(ssl_object)
        self.tls_binding = binding
        self.resume()

    def _accept_startup_params(self, params: dict[str, str]) -> None:
        ignored = self.app.ignored_startup_parameters
        for name, value in params.items():
            lower = name.lower()
            if name.startswith("_pq_.") or lower in ignored:
                continue
            if lower == "replication":
                raise errors.fatal(errors.FEATURE_NOT_SUPPORTED,
                                   "replication connections are not supported by pgmulti")
            if lower == "options":
                self._accept_options(value)
                continue
            if lower not in session.TRACKED_BY_LOWER and lower not in ("user", "database"):
                raise errors.protocol_violation(f"unsupported startup parameter: {name}")
            if lower in session.TRACKED_BY_LOWER:
                self.startup_params[session.TRACKED_BY_LOWER[lower]] = value
            else:
                self.startup_params[lower] = value
        if self.app.config.pgbouncer.application_name_add_host:
            # Names where a client connects from, for pg_stat_activity (PgBouncer's format).
            name = params.get("application_name", "app")
            self.startup_params["application_name"] = f"{name} - {self._address_details()}"
        self.user = self.startup_params.get("user", "")
        if not self.user:
            raise errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                               "no PostgreSQL user name specified in startup packet")
        self.database = self.startup_params.get("database") or self.user

    def _address_details(self) -> str:
        """host:port, [IPv6]:port, or for a Unix socket unix(pid@hostname):port."""
        if self.listener_kind == "unix":
            port = self.app.config.pgbouncer.listen_port
            peer = hba.peer_credentials(self.transport.get_extra_info("socket"))
            return f"unix({peer[0]}@{socket.gethostname()}):{port}" if peer else f"unix:{port}"
        host, port = self.addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _accept_options(self, value: str) -> None:
        """options=-c name=value for tracked parameters; anything else is refused."""
        words = value.split()
        i = 0
        while i < len(words):
            word = words[i]
            if word == "-c" and i + 1 < len(words):
                setting = words[i + 1]
                i += 2
            elif word.startswith("--") or word.startswith("-c"):
                setting = word[2:]
                i += 1
            else:
                raise errors.protocol_violation(f"unsupported options startup parameter: {value}")
            name, sep, val = setting.partition("=")
            lower = name.replace("-", "_").lower()
            if not sep or lower not in session.TRACKED_BY_LOWER:
                raise errors.protocol_violation(
                    "unsupported options startup parameter: only '-c' can be used to set "
                    "tracked parameters (client_encoding, DateStyle, TimeZone, ...)")
            self.startup_params[session.TRACKED_BY_LOWER[lower]] = val

    def _cancel_request(self, rest: bytes) -> None:
        # Process id, then the key: 4 bytes in protocol 3.0, up to 256 since 3.2.
        if not 4 < len(rest) <= 4 + protocol.MAX_CANCEL_KEY_LENGTH:
            raise errors.protocol_violation("invalid cancel request length")
        pid = int.from_bytes(rest[0:4], "big")
        self.app.forward_cancel(pid, rest[4:])
        self.state = "cancel"
        self.close("cancel request")

    # -- authentication ------------------------------------------------------------------

    async def _login(self) -> None:
        try:
            reject = self.app.admission_error(self)
            if reject is not None:
                raise reject
            if self.database in ADMIN_DATABASES and self.database not in self.app.config.databases:
                await self._login_admin()
            else:
                await self._login_pooled()
        except PgError as exc:
            self.report(exc)
        except asyncio.CancelledError:
            self.close("login cancelled")
        except Exception:
            log.exception("%r login failed unexpectedly", self)
            self.report(errors.fatal(errors.INTERNAL_ERROR, "internal error during login"))

    async def _login_admin(self) -> None:
        cfg = self.app.config.pgbouncer
        if self.user not in self.app.admin_users and self.user not in self.app.stats_users:
            if cfg.auth_type != "any":
                raise errors.fatal(errors.PROTOCOL_VIOLATION, "not allowed")
        self.admin = True
        await self._authenticate(self.app.userlist.get(self.user))
        tracked, greeting = session.greeting(self.app.admin_parameters(), self.startup_params)
        self.app.known_logins.enter(self, self._known_login(None, tracked, greeting))
        self.set_actions(ADMIN_ACTIONS)
        self.resume()

    async def _login_pooled(self) -> None:
        db = self._pooled_database()
        secret = self.app.userlist.get(self.user)
        if secret is None and self.app.config.pgbouncer.auth_type != "any":
            secret = await self.app.auth_query_secret(self.database, db, self.user)
        await self._authenticate(secret)
        pool = self.app.get_pool(self.database, db, self.user, secret, self.scram_keys)
        if self.closed:
            return
        limit_error = self.app.client_limit_error(pool)
        if limit_error is not None:
            raise limit_error
        await pool.welcome()
        if not self.closed:
            self._enter_pool(pool)

    def _login_at_once(self) -> KnownLogin | None:
        """Log in now, without a task, when no step has to wait: a pooled database, a user the
        auth_file knows, trust (or any), and a pool that already knows its servers' parameters.
        That is every login after the first for most applications (and pgbench -C). Returns
        what it logged in to; None leaves everything, errors included, to _login."""
        if (self.database in ADMIN_DATABASES or self.database in self.app.disabled_databases
                or self.app.admission_error(self) is not None):
            return None
        db = self.app.config.database_for(self.database)
        secret = self.app.userlist.get(self.user)
        if db is None or secret is None or self._auth_rule()[0] not in ("trust", "any"):
            return None
        pool = self.app.get_pool(self.database, db, self.user, secret, None)
        if pool.welcome_params is None or self.app.client_limit_error(pool) is not None:
            return None
        return self._enter_pool(pool)

    def _pooled_database(self):
        db = self.app.config.database_for(self.database)
        if db is None:
            raise errors.no_such_database(self.database)
        if self.database in self.app.disabled_databases:
            raise errors.fatal(errors.CANNOT_CONNECT_NOW, "database does not allow connections")
        return db

    def _enter_pool(self, pool: Pool) -> KnownLogin:
        """Logged in to a pooled database: greet the client and start relaying (the codec's
        KnownLogins.enter). Returns what it logged in to."""
        login = self._known_login(pool, *pool.greeting(self.startup_params))
        self.app.known_logins.enter(self, login)
        return login

    def _known_login(self, pool: Pool | None, tracked: dict[str, str], greeting: bytes,
                     signature: tuple | None = None) -> KnownLogin:
        return KnownLogin(pool, self.user, self.database, self.startup_params,
                          self.protocol_version, tracked, greeting, signature)

    def _auth_rule(self) -> tuple[str, hba.IdentMap | None]:
        """The auth_type word for this login, and the hba line's ident map (cert, peer)."""
        method = self.app.config.pgbouncer.auth_type
        if method == "hba":
            return hba.method_for(self.app.config, unix=self.listener_kind == "unix",
                                  address=str(self.addr[0]), tls=bool(self.tls),
                                  database=self.database, user=self.user)
        return method, None

    async def _authenticate(self, secret: str | None) -> None:
        method, ident_map = self._auth_rule()
        if method == "any":
            return
        if method == "trust":
            if secret is None:
                raise errors.no_such_user(self.user)
            return
        if method == "cert":
            # Known users only (as PgBouncer); the name must be in the verified certificate.
            ssl_object = self.transport.get_extra_info("ssl_object")
            cert = ssl_object.getpeercert() if ssl_object is not None else None
            if secret is None or not hba.certificate_matches(cert, self.user, ident_map):
                raise hba.certificate_failed(self.user)
            return
        if method == "peer":
            peer = None
            if self.listener_kind == "unix":
                peer = hba.peer_user_name(self.transport.get_extra_info("socket"))
            if ident_map is not None:
                allowed = peer is not None and ident_map.allows([peer], self.user)
            else:
                allowed = peer == self.user
            if secret is None or not allowed:
                raise hba.peer_failed(self.user)
            return
        if secret is None:
            # Ask an unknown user for a password like a known one, so the answer does not
            # tell which users exist; no password can match a random secret.
            await self._authenticate_with(method, secrets.token_hex(16))
            raise errors.password_failed(self.user)
        await self._authenticate_with(method, secret)

    async def _authenticate_with(self, method: str, secret: str) -> None:
        if method == "plain":
            await self._auth_cleartext(secret)
        elif method == "md5" and auth.secret_kind(secret) != "scram":
            await self._auth_md5(secret)
        elif method in ("md5", "scram-sha-256"):
            if auth.secret_kind(secret) == "md5":
                raise errors.password_failed(self.user)
            await self._auth_scram(secret)
        else:
            raise errors.fatal(errors.FEATURE_NOT_SUPPORTED, f"auth_type {method} is not supported")

    async def _auth_cleartext(self, secret: str) -> None:
        self.transport.write(protocol.authentication(protocol.AUTH_CLEARTEXT))
        data = await self._read_password()
        password = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if not auth.check_plain(secret, self.user, password):
            raise errors.password_failed(self.user)

    async def _auth_md5(self, secret: str) -> None:
        salt = auth.random_bytes(4)
        self.transport.write(protocol.authentication(protocol.AUTH_MD5, salt))
        data = await self._read_password()
        response = data.rstrip(b"\0").decode("ascii", "replace")
        if not auth.check_md5_response(secret, self.user, salt, response):
            raise errors.password_failed(self.user)

    async def _auth_scram(self, secret: str) -> None:
        # Over TLS, offer SCRAM-SHA-256-PLUS bound to our certificate (tls-server-end-point).
        binding = self.tls_binding
        try:
            scram = auth.ScramServer(secret, channel_binding=binding,
                                     iterations=max(1, self.app.config.pgbouncer.scram_iterations))
        except auth.AuthError:
            raise errors.password_failed(self.user) from None
        mechanisms = scram.mechanisms()
        self.transport.write(protocol.auth_sasl(mechanisms))
        data = await self._read_password()
        mechanism, pos = protocol.cstring(data, 0)
        if mechanism not in mechanisms:
            raise errors.fatal(errors.PROTOCOL_VIOLATION,
                               "client selected an invalid SASL authentication mechanism")
        length = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        client_first = data[pos + 4:pos + 4 + length] if length >= 0 else b""
        try:
            server_first = scram.first(client_first, mechanism)
            self.transport.write(protocol.authentication(protocol.AUTH_SASL_CONTINUE, server_first))
            client_final = await self._read_password()
            server_final = scram.final(client_final)
        except auth.AuthError as exc:
            log.info("%r SCRAM authentication failed: %s", self, exc)
            raise errors.password_failed(self.user) from None
        self.transport.write(protocol.authentication(protocol.AUTH_SASL_FINAL, server_final))
        if auth.secret_kind(secret) == "scram":
            self.scram_keys = (scram.client_key, scram.server_key)

    async def _read_password(self) -> bytes:
        self._password_waiter = asyncio.get_running_loop().create_future()
        self.set_actions(AUTH_ACTIONS)
        self.resume()
        try:
            return await self._password_waiter
        finally:
            self._password_waiter = None

    def _password_message(self, view) -> None:
        waiter = self._password_waiter
        if waiter is None or waiter.done():
            raise errors.protocol_violation("unexpected password message")
        self.hold()
        waiter.set_result(bytes(view[5:]))

    # -- pooled session ------------------------------------------------------------------

    def _prepared_message(self, msg_type: int, view) -> None:
        """Parse/Bind/Describe/Close/Sync with statement names mapped to the server's."""
        server = self.server
        statements = server.statements
        stats = self.pool.stats
        # Unnamed statements need no mapping: forward the message as it came.
        if msg_type == protocol.BIND and view[5] == 0 and view[6] == 0:
            self.pool.core.bind_count += 1
            self.forward(bytes(view))
            return
        if msg_type == protocol.PARSE and view[5] == 0:
            statements.expected.append(prepared.FORWARD_PARSE)
            self.forward(bytes(view))
            return
        mine = self.statements
        if mine is None:  # most clients never name one: made when first needed
            mine = self.statements = prepared.ClientStatements(self.app.prepared_registry)
        out: list[bytes] = []
        body = bytes(view[5:])
        if msg_type == protocol.PARSE:
            mine.parse(body, statements, out)
            stats.client_parse_count += 1
            stats.server_parse_count += 1
        elif msg_type == protocol.BIND:
            self.pool.core.bind_count += 1
            if mine.bind(body, statements, out):
                stats.server_parse_count += 1
        elif msg_type == protocol.DESCRIBE:
            if mine.describe(body, statements, out):
                stats.server_parse_count += 1
        elif msg_type == protocol.CLOSE:
            mine.close(body, statements, out)
        else:  # Sync: answered by ReadyForQuery number ready_count + pending
            out.append(bytes(view))
            server.pending += 1
            statements.expect_sync(server.ready_count + server.pending)
        if out:
            # With the pass-through messages of the same read: one write for the whole batch.
            self.forward(b"".join(out))

    def on_unlinked(self, msg_type: int) -> None:
        """The first message of a transaction: get a server (now, or queue and wait)."""
        self.request_time = time.time()
        try:
            if not self.pool.request(self):
                self.hold()
        except PgError as exc:
            self.hold()
            self.report(exc)

    def cancel_while_waiting(self) -> None:
        """A CancelRequest for a client still queued for a server: drop its queued request and
        answer as PostgreSQL answers a cancelled query (57014, then ReadyForQuery). Only when
        the queued bytes are exactly one complete request (a Query, or extended-protocol
        messages up to one Sync); anything else stays queued, as PgBouncer leaves it."""
        if self.state != "waiting" or self.pool is None or self.closed:
            return
        if protocol.complete_requests(self.peek_buffered()) != 1:
            log.info("%r cancel while queued ignored: not exactly one whole request queued", self)
            return
        try:
            self.pool.waiting.remove(self)
        except ValueError:
            return
        self.take_buffered()
        self.state = "active"
        self.transport.write(protocol.error_response(
            "ERROR", errors.QUERY_CANCELED, "canceling statement due to user request")
            + protocol.ready_for_query("I"))
        self._resume_reading()
        self.resume()

    def start_waiting(self) -> None:
        # PoolCore._enqueue does the same in C when the pool is full.
        self.state = "waiting"
        self.wait_start = time.monotonic()

    def attached(self, server: ServerConnection, now: float) -> None:
        """The server is linked and in step with our parameters: let the bytes flow.
        PoolCore._hand_over does the same in C for a queued client whose reading runs."""
        self.pool.core.assignments += 1
        if self.state == "waiting":
            self.pool.core.record_wait(now - self.wait_start)
            self.state = "active"
        self.link_time = now
        if self._reading_paused:
            self._resume_reading()
        if self.held:
            self.resume()

    def refuse_transaction(self, server: ServerConnection) -> None:
        """Statement pooling: a server left inside a transaction cannot be shared."""
        if self.pool.settings.pool_mode == session.STATEMENT:
            server.close("transaction blocks not allowed in statement pooling mode")
            self.report(errors.fatal(errors.FEATURE_NOT_SUPPORTED,
                                     "transaction blocks not allowed in statement pooling mode"))

    def server_failed(self, server: ServerConnection, exc: PgError) -> None:
        if self.server is server:
            self.server = None
            self.unlink_output()
            self.request_sink = None
        self.report(exc if exc.fatal else errors.server_closed(exc.message))
