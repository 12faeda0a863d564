"""Server connection: one socket to PostgreSQL, its login, and the queries the pooler runs itself."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING

from . import auth, errors, prepared, protocol, session, tcp_tuning
from ._codec import Relay
from .errors import PgError
from .tls import describe as describe_tls

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("pgmulti.server")

# Login, idle and internal queries: the proxy reads every message itself.
INSPECT_ALL = protocol.action_table(protocol.INSPECT)
# Linked to a client: everything flows through except ParameterStatus, which the pooler tracks.
RELAY_ACTIONS = protocol.action_table(protocol.PASS, S=protocol.INSPECT)
# Statement pooling also sees CommandComplete and ReadyForQuery before the client does: the
# reply to a statement that opens a transaction is held back, so BEGIN gets the refusal as its
# answer instead of a success.
STATEMENT_RELAY_ACTIONS = protocol.action_table(protocol.PASS, S=protocol.INSPECT,
                                                C=protocol.INSPECT, Z=protocol.INSPECT)
# With max_prepared_statements the pooler filters ParseComplete/CloseComplete (the codec
# forwards those the client expects itself) and follows errors (the server then skips to Sync).
PREPARED_RELAY_ACTIONS = protocol.action_table(
    protocol.PASS, S=protocol.INSPECT, **{"1": protocol.STATEMENT_REPLY, "3": protocol.STATEMENT_REPLY},
    E=protocol.INSPECT)
PREPARED_STATEMENT_RELAY_ACTIONS = protocol.action_table(
    protocol.PASS, S=protocol.INSPECT, C=protocol.INSPECT, Z=protocol.INSPECT,
    **{"1": protocol.STATEMENT_REPLY, "3": protocol.STATEMENT_REPLY}, E=protocol.INSPECT)
TRANSACTION_START_TAGS = (b"BEGIN\0", b"START TRANSACTION\0")
# Statement pooling reads CommandComplete itself; the codec reports these in other modes.
DISCARD_TAGS = (b"DEALLOCATE ALL\0", b"DISCARD ALL\0")
# A held reply larger than this is let through; the refusal then follows it.
HELD_REPLY_MAX = 1024 * 1024


class InternalQuery:
    """A query the pooler runs on a server for itself (reset, check, SET, auth_query)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.done = loop.create_future()
        self.rows: list[list[bytes | None]] = []
        self.error: dict[str, str] | None = None


class ServerConnection(Relay, asyncio.BufferedProtocol):
    """One PostgreSQL connection owned by a pool."""

    def __init__(self, pool: Pool, ident: int):
        self.pool = pool
        self.app = pool.app
        self.id = ident
        self.transport = None
        self.client = None
        self.state = "new"            # name of the pool collection holding it
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.connect_time = time.time()
        self.created = time.monotonic()
        self.last_used = self.created
        self.logged_in = False
        self.generation = pool.reconnect_generation
        self.closed = False
        self.close_reason = ""
        self.local_addr = ("", 0)
        self.remote_address: tuple[int, tuple] | None = None  # (family, sockaddr) connected to
        self.tls = ""
        self._login_done = asyncio.get_running_loop().create_future()
        self._internal: InternalQuery | None = None
        self._held_reply: list[bytes] | None = None   # statement mode: reply held until 'Z'
        limit = pool.prepared_limit
        self.statements = prepared.ServerStatements(limit) if limit else None
        if self.statements is not None:
            self.expect_replies_in(self.statements.expected)
        self.watch_discard = self.statements is not None
        self._held_size = 0
        self._scram: auth.ScramClient | None = None
        self.auth_started = False        # an Authentication request came during login
        self.max_packet = pool.app.config.pgbouncer.max_packet_size
        self.pool_core = pool.core
        self.buffer_size = max(4096, pool.app.config.pgbouncer.pkt_buf * 4)
        self.set_actions(INSPECT_ALL)

    def __repr__(self) -> str:
        return f"S-0x{self.id:x}: {self.pool.name}/{self.pool.server_user}@{self.pool.address_text}"

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and log in; raise PgError if PostgreSQL cannot be reached or refuses us."""
        loop = asyncio.get_running_loop()
        timeout = self.app.config.pgbouncer.server_connect_timeout or None
        try:
            if self.pool.unix_path:
                connect = loop.create_unix_connection(lambda: self, self.pool.unix_path)
            elif self.app.tls.server is not None:
                connect = self._connect_negotiating_tls(loop)
            else:
                connect = self._connect_plain(loop)
            await asyncio.wait_for(connect, timeout)
            await asyncio.wait_for(asyncio.shield(self._login_done), timeout)
        except PgError:
            self.close("login failed")
            raise
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            reason = "connect timeout" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            self.close(reason)
            raise errors.server_unreachable(f"{self.pool.address_text}: {reason}") from None

    async def _connect_plain(self, loop) -> None:
        sock = await self._connected_socket(loop, self.pool.host, self.pool.port)
        try:
            await loop.create_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _connected_socket(self, loop, host: str, port: int) -> socket.socket:
        """A non-blocking TCP socket connected to one of host's addresses: the next in turn
        (app.dns), then the others, as long as none answers."""
        last_error: OSError | None = None
        addresses = await self.app.dns.addresses(host, port)
        # A lookup that found new addresses has just retired the pool's servers (a new
        # generation): this one connects to the new addresses, it belongs to the new one.
        self.generation = self.pool.reconnect_generation
        for family, address in addresses:
            try:
                sock = await _connect_to(loop, family, address)
            except OSError as exc:
                last_error = exc
                continue
            self.remote_address = (family, address)
            return sock
        raise last_error or OSError(f"no address for {host}")

    async def _connect_negotiating_tls(self, loop) -> None:
        """SSLRequest on a fresh socket; TLS if the server says 'S' (server_tls_sslmode)."""
        host, port = self.pool.host, self.pool.port
        sock = await self._connected_socket(loop, host, port)
        tls = self.app.tls
        raw = None
        try:
            await loop.sock_sendall(sock, protocol.ssl_request())
            answer = await loop.sock_recv(sock, 1)
            if answer == b"S":
                context = tls.server
                # "" sends no SNI and checks no name; verify-full checks the configured host.
                hostname = host if context.check_hostname else ""
                # What create_connection(ssl=...) does, keeping hold of the TCP transport
                # under TLS: the codec runs the TLS of a busy connection (use_direct_tls).
                raw, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
                transport = await loop.start_tls(raw, self, context, server_hostname=hostname)
                ssl_object = transport.get_extra_info("ssl_object")
                self.connection_made(transport)
                self.use_direct_tls(raw, ssl_object)  # tls.server_context makes DirectSSLObjects
                self.tls = describe_tls(ssl_object)
            elif answer == b"N" and not tls.server_tls_required:
                await loop.create_connection(lambda: self, sock=sock)
            else:
                what = "refused TLS" if answer == b"N" else "sent an invalid answer to SSLRequest"
                raise errors.fatal(errors.CONNECTION_FAILURE, f"server {what}",
                                   detail=f"server_tls_sslmode = {tls.server_mode}")
        except BaseException:
            if raw is not None:
                raw.abort()  # it owns the socket now
            elif self.transport is None:
                sock.close()
            raise

    def connection_made(self, transport) -> None:
        self.attach_transport(transport)
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local_addr = sock[:2]
            self._tune_tcp(transport)
        # Ask for the newest protocol; an older server answers NegotiateProtocolVersion
        # (one that cannot is asked for 3.0 from then on, see _login_message).
        self.protocol_version = self.pool.server_protocol
        transport.write(protocol.startup_message(self.pool.startup_params(),
                                                 self.protocol_version))

    def _tune_tcp(self, transport) -> None:
        """tcp_keepalive and the other tcp_* settings, as PgBouncer sets them on server sockets."""
        try:
            tcp_tuning.tune(transport.get_extra_info("socket"), self.app.config.pgbouncer)
        except OSError as exc:
            log.warning("%r could not apply tcp_* settings: %s", self, exc)

    def connection_lost(self, exc) -> None:
        self.stop_direct_io()
        self.resume_paused_peer()
        was_closed = self.closed
        self.closed = True
        reason = self.close_reason or (str(exc) if exc else "server closed the connection")
        if not self._login_done.done():
            self._login_done.set_exception(errors.server_unreachable(reason))
            self._login_done.exception()  # consumed by open(); avoid "never retrieved"
        if self._internal and not self._internal.done.done():
            self._internal.done.set_exception(errors.server_closed(reason))
        if not was_closed:
            log.info("%r closing because: %s", self, reason)
        self.pool.server_lost(self, reason)

    def close(self, reason: str) -> None:
        """Close the connection (the pool forgets it in connection_lost)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("%r closing because: %s", self, reason)
        self.stop_direct_io()
        if self.transport is not None:
            if self.logged_in:
                self.transport.write(protocol.terminate())
            self.transport.close()
        else:
            self.pool.server_lost(self, reason)

    def on_tls_error(self, exc) -> None:
        """Direct TLS met a record from the server it cannot decrypt, or could not encrypt
        one for it: the session is broken, and the connection ends as a lost server's."""
        self.close_reason = f"TLS error: {exc}"
        if self.transport is not None:
            self.transport.abort()

    # -- linking -------------------------------------------------------------------------

    @property
    def running_internal_query(self) -> bool:
        """A pooler query (parameter SET, check, reset) has not finished yet."""
        return self._internal is not None

    @property
    def is_ready(self) -> bool:
        """Idle at a transaction boundary with no answers outstanding."""
        return (self.ready_status == 73 and self.pending == 0 and self.buffered == 0
                and self._internal is None)

    # -- codec callbacks -----------------------------------------------------------------

    def on_message(self, msg_type: int, view) -> None:
        try:
            if not self.logged_in:
                self._login_message(msg_type, view)
            elif self._internal is not None:
                self._internal_message(msg_type, view)
            elif self._held_reply is not None and msg_type != protocol.READY_FOR_QUERY:
                self._hold_reply(view)
            elif msg_type == protocol.PARAMETER_STATUS:
                self._parameter_status(view)
            elif self.statements is not None and self.client is not None and msg_type in (
                    protocol.PARSE_COMPLETE, protocol.CLOSE_COMPLETE, protocol.ERROR_RESPONSE):
                self._prepared_response(msg_type, view)
            elif msg_type == protocol.COMMAND_COMPLETE and self.client is not None:
                tag = bytes(view[5:])
                if self.statements is not None and tag in DISCARD_TAGS:
                    self.on_statements_discarded()
                if tag in TRANSACTION_START_TAGS:
                    self._held_reply = []
                    self._held_size = 0
                    self.set_actions(INSPECT_ALL)
                    self._hold_reply(view)
                else:
                    self.client.transport.write(bytes(view))
            elif msg_type == protocol.READY_FOR_QUERY and self.client is not None:
                self._statement_ready(view)
            else:
                self._idle_message(msg_type, view)
        except PgError as exc:
            self._fail(exc)
        except (protocol.DecodeError, ValueError, IndexError) as exc:
            self._fail(errors.protocol_violation(f"bad message from server: {exc}"))

    def on_ready(self, status: int) -> None:
        """ReadyForQuery passed to our client (transaction and statement modes only)."""
        client = self.client
        if client is None or self.pending:
            return  # more answers are on their way
        if status == session.READY_IDLE:
            pool = self.pool
            pool.release(client, self, pool.reset_always)
        else:
            client.refuse_transaction(self)

    def on_statements_discarded(self) -> None:
        """The client ran DEALLOCATE ALL or DISCARD ALL: this server has no prepared statement
        left (the next use prepares again), and the client's own names are gone, as it expects."""
        if self.statements is not None:
            self.statements.discarded()
        client = self.client
        if client is not None and client.statements is not None:
            client.statements.forget_all()

    def on_protocol_error(self, code: int, msg_type: int) -> None:
        self._fail(errors.protocol_violation(f"malformed message from server (code {code})"))

    def on_unlinked(self, msg_type: int) -> None:
        # Only INSPECT_ALL is installed while unlinked; nothing reaches here.
        pass

    def _prepared_response(self, msg_type: int, view) -> None:
        statements = self.statements
        if msg_type == protocol.ERROR_RESPONSE:
            statements.error(self.ready_count)
        elif statements.next_action(self.ready_count) == prepared.SWALLOW:
            return  # answer to a Parse or Close the pooler added
        self.client.transport.write(bytes(view))

    def _hold_reply(self, view) -> None:
        self._held_reply.append(bytes(view))
        self._held_size += len(view)
        if self._held_size > HELD_REPLY_MAX:
            self._release_held_reply()

    def _release_held_reply(self) -> None:
        if self._held_reply:
            self.client.transport.write(b"".join(self._held_reply))
        self._held_reply = None
        self.set_actions(STATEMENT_RELAY_ACTIONS)

    def _statement_ready(self, view) -> None:
        """Statement pooling: forward ReadyForQuery only if the server is idle again."""
        status = view[5]
        if status != session.READY_IDLE:
            self._held_reply = None  # the refusal replaces the reply to BEGIN
        elif self._held_reply is not None:
            self._release_held_reply()
        self.ready_seen(status)  # counts and timing, as the codec does for a passed 'Z'
        client = self.client
        if status == session.READY_IDLE:
            client.transport.write(bytes(view))
            if not self.pending:
                self.pool.release(client, self, reset=self.pool.reset_always)
            return
        client.refuse_transaction(self)

    def _fail(self, exc: PgError) -> None:
        if not self._login_done.done():
            self._login_done.set_exception(exc)
        if self._internal and not self._internal.done.done():
            self._internal.done.set_exception(exc)
        client = self.client
        self.close(exc.message)
        if client is not None:
            client.server_failed(self, exc)

    def _parameter_status(self, view) -> None:
        name, value = protocol.parse_parameter_status(view[5:])
        self.params[name] = value
        self.param_sig = None  # compared again in Python at the next link
        client = self.client
        if client is not None:
            if name in session.TRACKED_PARAMETERS:
                client.params[name] = value
                client.param_sig = None
            if self._internal is None:
                client.transport.write(bytes(view))

    # -- login ---------------------------------------------------------------------------

    def _login_message(self, msg_type: int, view) -> None:
        body = view[5:]
        if msg_type == protocol.AUTHENTICATION:
            self.auth_started = True
            self._authenticate(int.from_bytes(body[:4], "big"), bytes(body[4:]))
        elif msg_type == protocol.PARAMETER_STATUS:
            name, value = protocol.parse_parameter_status(body)
            self.params[name] = value
        elif msg_type == protocol.BACKEND_KEY_DATA:
            # The key is 4 bytes in protocol 3.0, up to 256 since 3.2: kept as sent.
            key = bytes(body[4:])
            if not 0 < len(key) <= protocol.MAX_CANCEL_KEY_LENGTH:
                raise errors.protocol_violation(f"BackendKeyData with a {len(key)}-byte key")
            self.backend_pid = int.from_bytes(body[0:4], "big")
            self.backend_key = key
        elif msg_type == protocol.NEGOTIATE_PROTOCOL_VERSION:
            version, options = protocol.parse_negotiate_protocol_version(body)
            if options or not protocol.PROTOCOL_3_0 <= version < protocol.PROTOCOL_LATEST:
                raise errors.protocol_violation(
                    f"server cannot speak protocol {version >> 16}.{version & 0xFFFF}")
            self.protocol_version = version  # the downgrade PostgreSQL before 18 answers
        elif msg_type == protocol.ERROR_RESPONSE:
            fields = protocol.parse_fields(body)
            code = fields.get("C", errors.CONNECTION_FAILURE)
            if (not self.auth_started and self.protocol_version > protocol.PROTOCOL_3_0
                    and code in (errors.PROTOCOL_VIOLATION, errors.FEATURE_NOT_SUPPORTED)):
                self.pool.server_protocol = protocol.PROTOCOL_3_0
                raise errors.ServerProtocolRefused(code, "server refused protocol 3.2: "
                                                   + fields.get("M", ""), fatal=True)
            raise PgError(code,
                          f"server login failed: {fields.get('M', 'unknown error')}", fatal=True)
        elif msg_type == protocol.READY_FOR_QUERY:
            self.logged_in = True
            self.enable_direct_io(self.app.direct_io, 1)  # from the next read on
            self.ready_status = body[0]
            if not self._login_done.done():
                self._login_done.set_result(None)
        elif msg_type == protocol.NOTICE_RESPONSE:
            pass
        else:
            raise errors.protocol_violation(f"unexpected message {chr(msg_type)!r} during server login")

    def _authenticate(self, code: int, data: bytes) -> None:
        creds = self.pool.credentials
        user = self.pool.server_user
        if code == protocol.AUTH_OK:
            return
        if code == protocol.AUTH_CLEARTEXT:
            if not creds.password or auth.secret_kind(creds.password) != "plain":
                raise self._no_password("cleartext")
            self.transport.write(protocol.password_message(creds.password.encode() + b"\0"))
        elif code == protocol.AUTH_MD5:
            if not creds.password or auth.secret_kind(creds.password) == "scram":
                raise self._no_password("md5")
            response = auth.md5_response(creds.password, user, data[:4])
            self.transport.write(protocol.password_message(response.encode() + b"\0"))
        elif code == protocol.AUTH_SASL:
            mechanisms = data.split(b"\0")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise errors.fatal(errors.FEATURE_NOT_SUPPORTED,
                                   "server asks for an unsupported SASL mechanism")
            if creds.password and auth.secret_kind(creds.password) == "plain":
                self._scram = auth.ScramClient(creds.password)
            elif creds.scram_keys is not None:
                client_key, server_key = creds.scram_keys
                self._scram = auth.ScramClient(client_key=client_key, server_key=server_key)
            else:
                raise self._no_password("SCRAM")
            self.transport.write(protocol.sasl_initial_response("SCRAM-SHA-256", self._scram.first()))
        elif code == protocol.AUTH_SASL_CONTINUE and self._scram is not None:
            self.transport.write(protocol.password_message(self._scram.final(data)))
        elif code == protocol.AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.verify(data)
            except auth.AuthError as exc:
                raise errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                                   f"server SCRAM verification failed: {exc}") from None
        else:
            raise errors.fatal(errors.FEATURE_NOT_SUPPORTED,
                               f"server asks for unsupported authentication method {code}")

    def _no_password(self, method: str) -> PgError:
        return errors.fatal(errors.INVALID_PASSWORD,
                            f"no password usable for {method} login to server "
                            f"as user \"{self.pool.server_user}\"",
                            hint="set password= in [databases] or a plain secret in auth_file")

    # -- idle ----------------------------------------------------------------------------

    def _idle_message(self, msg_type: int, view) -> None:
        if msg_type in (protocol.NOTICE_RESPONSE, protocol.NOTIFICATION_RESPONSE):
            return
        if msg_type == protocol.ERROR_RESPONSE:
            fields = protocol.parse_fields(view[5:])
            self.close(f"server error while idle: {fields.get('M', '')}")
            return
        self.close(f"unexpected message {chr(msg_type)!r} from idle server")

    # -- internal queries ----------------------------------------------------------------

    def run_query(self, sql: str, params: list[str] | None = None) -> asyncio.Future:
        """Run sql (with text parameters through the extended protocol); resolves to rows."""
        if self._internal is not None or self.closed:
            raise RuntimeError("server connection busy")
        self._internal = InternalQuery(asyncio.get_running_loop())
        self.set_actions(INSPECT_ALL)
        if params is None:
            self.transport.write(protocol.query(sql))
        else:
            self.transport.write(_extended_query(sql, params))
        return self._internal.done

    def _internal_message(self, msg_type: int, view) -> None:
        job = self._internal
        body = view[5:]
        if msg_type == protocol.DATA_ROW:
            job.rows.append(protocol.parse_data_row(body))
        elif msg_type == protocol.ERROR_RESPONSE:
            job.error = protocol.parse_fields(body)
        elif msg_type == protocol.PARAMETER_STATUS:
            self._parameter_status(view)
        elif msg_type == protocol.READY_FOR_QUERY:
            self.ready_status = body[0]
            self._internal = None
            if self.client is not None:
                self.set_actions(self.pool.relay_actions)
            if job.done.done():
                return
            if job.error is not None:
                job.done.set_exception(PgError(job.error.get("C", errors.INTERNAL_ERROR),
                                               job.error.get("M", "query failed")))
            else:
                job.done.set_result(job.rows)

    # -- cancel --------------------------------------------------------------------------

    async def send_cancel(self) -> None:
        """Forward a cancel for this backend over a new connection, as libpq does; give up
        after cancel_wait_timeout (0: no limit)."""
        timeout = self.app.config.pgbouncer.cancel_wait_timeout or None
        try:
            await asyncio.wait_for(self._send_cancel(), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("%r cancel request failed: %s", self, str(exc) or "cancel_wait_timeout")

    async def _send_cancel(self) -> None:
        if self.pool.unix_path:
            reader, writer = await asyncio.open_unix_connection(self.pool.unix_path)
        else:
            # The address this server connection went to: with several behind one name,
            # the one that runs the backend.
            if self.remote_address is None:
                raise OSError("server was never connected")
            sock = await _connect_to(asyncio.get_running_loop(), *self.remote_address)
            reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(protocol.cancel_request(self.backend_pid, self.backend_key))
            await writer.drain()
            await reader.read(1)  # PostgreSQL closes once it has taken the request
        finally:
            writer.close()


async def _connect_to(loop, family: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _extended_query(sql: str, params: list[str]) -> bytes:
    """Parse/Bind/Execute/Sync of an unnamed statement with text parameters."""
    parse = sql.encode() + b"\0"
    parse = b"\0" + parse + (0).to_bytes(2, "big")
    bind = [b"\0\0", (0).to_bytes(2, "big"), len(params).to_bytes(2, "big")]
    for value in params:
        raw = value.encode()
        bind.append(len(raw).to_bytes(4, "big") + raw)
    bind.append((0).to_bytes(2, "big"))
    return (protocol.message(protocol.PARSE, parse)
            + protocol.message(protocol.BIND, b"".join(bind))
            + protocol.message(protocol.EXECUTE, b"\0" + (0).to_bytes(4, "big"))
            + protocol.message(protocol.SYNC, b""))
