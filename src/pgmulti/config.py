"""Configuration model: PgBouncer 1.25's ``pgbouncer.ini`` as msgspec Structs.

Every ``[pgbouncer]`` key is a field of :class:`Pgbouncer` with PgBouncer's exact name
and default; ``[databases]``, ``[users]`` and ``[peers]`` entries become
:class:`Database`, :class:`User` and :class:`Peer`.  :mod:`pgmulti.loader` builds a
:class:`Config` from a file.

Type conventions (matching PgBouncer's key table in ``src/main.c``):

* times (``CF_TIME_USEC``) are ``float`` seconds;
* on/off switches are ``bool``;
* other numbers are ``int`` (``stats_period``, ``query_wait_notify`` and the ``tcp_keep*``
  keys are whole seconds in PgBouncer too; ``tcp_user_timeout`` is milliseconds);
* comma-separated lists (``listen_addr``, ``admin_users``, ...) stay ``str`` exactly as
  written; :func:`split_list` splits them the way PgBouncer does;
* "not set" is ``None`` where PgBouncer's default is NULL and ``""`` where it is empty.

Per-database and per-user values are ``None`` when not set; the ``Config.effective_*``
helpers resolve them against the global settings with PgBouncer's precedence rules.
"""

from __future__ import annotations

import socket
from typing import Any, ClassVar, Iterator, Literal

import msgspec

__all__ = [
    "AuthType",
    "Config",
    "DEFAULT_AUTH_QUERY",
    "Database",
    "LoadBalanceHosts",
    "LogFormat",
    "Peer",
    "Pgbouncer",
    "PoolMode",
    "SslMode",
    "UNSUPPORTED_KEYS",
    "User",
    "split_list",
]

PoolMode = Literal["session", "transaction", "statement"]
AuthType = Literal["any", "trust", "plain", "md5", "cert", "hba", "ldap", "pam", "scram-sha-256"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
LoadBalanceHosts = Literal["disable", "round-robin"]
LogFormat = Literal["text", "json"]

DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
"""PgBouncer 1.25's default ``auth_query``."""

# PgBouncer enables TCP_DEFER_ACCEPT by default where the platform has it (Linux).
_DEFAULT_TCP_DEFER_ACCEPT = hasattr(socket, "TCP_DEFER_ACCEPT")

_MASK = "'***'"

UNSUPPORTED_KEYS: frozenset[str] = frozenset(
    {
        # Authentication methods other than the auth_file / auth_query based ones.
        "auth_ldap_options",
        # TLS fine tuning beyond protocols and ciphers (OpenSSL defaults apply).
        "client_tls13_ciphers",
        "client_tls_ecdhcurve",
        "client_tls_dheparams",
        "server_tls13_ciphers",
        # DNS zone serial checks (PgBouncer needs c-ares for them) and a resolver of its own.
        "dns_zone_check_period",
        "resolv_conf",
        # Peering (cancel-request forwarding) and the [peers] section.
        "peer_id",
        # SUSPEND is refused (rolling restarts replace it), so its timeout has nothing to time.
        "suspend_timeout",
        # PgBouncer event-loop internals with no equivalent here.
        "sbuf_loopcnt",
    }
)
"""``[pgbouncer]`` keys that pgmulti accepts but does not act on yet.

The loader lists the ones a file sets in :attr:`Config.unsupported` (plus ``"[peers]"``
when that section has entries) so the application can warn once.
"""


def split_list(value: str) -> tuple[str, ...]:
    """Split a comma-separated setting (``admin_users``, ``listen_addr``, ...).

    Items are stripped of surrounding whitespace and empty items are dropped.
    """
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


class _Struct(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Common base: immutable, keyword-only, and a repr that hides secrets."""

    _secret_fields: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        parts = (f"{name}={value}" for name, value in self._repr_items())
        return f"{type(self).__name__}({', '.join(parts)})"

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        for name, value in self._repr_items():
            yield name, value

    def _repr_items(self) -> Iterator[tuple[str, Any]]:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in self._secret_fields and value:
                yield name, _MASK
            else:
                yield name, repr(value)


class Pgbouncer(_Struct):
    """The ``[pgbouncer]`` section: every PgBouncer 1.25 setting with its default.

    Keys that are pgmulti's own (PgBouncer rejects them as unknown): ``log_format``,
    ``workers``, ``metrics_addr`` and ``metrics_port``.
    """

    _secret_fields = frozenset({"auth_ldap_options"})

    # --- Generic settings ---
    logfile: str = ""
    """Log file path; empty means no log file."""
    pidfile: str = ""
    """PID file path; empty means none (daemon mode needs one)."""
    listen_addr: str = ""
    """Comma-separated TCP listen addresses, ``*`` for all; empty means Unix socket only."""
    listen_port: int = 6432
    """Port to listen on, for TCP and for the Unix socket name."""
    unix_socket_dir: str = "/tmp"
    """Directory of the Unix socket; empty disables it, ``@`` prefix means abstract namespace."""
    unix_socket_mode: int = 0o777
    """File mode of the Unix socket."""
    unix_socket_group: str = ""
    """Group owning the Unix socket; empty leaves it unchanged."""
    user: str | None = None
    """Unix user to switch to after startup."""
    pool_mode: PoolMode = "session"
    """When a server connection returns to the pool: session, transaction or statement."""
    max_client_conn: int = 100
    """Maximum number of client connections."""
    default_pool_size: int = 20
    """Server connections per (database, user) pool unless overridden; 0 means unlimited."""
    min_pool_size: int = 0
    """Keep at least this many server connections per pool; 0 disables."""
    reserve_pool_size: int = 0
    """Extra connections a pool may open after reserve_pool_timeout; 0 disables."""
    reserve_pool_timeout: float = 5.0
    """Seconds a client waits before the reserve pool is used; 0 disables."""
    max_db_connections: int = 0
    """Maximum server connections per database across its pools; 0 means unlimited."""
    max_db_client_connections: int = 0
    """Maximum client connections per database; 0 means unlimited."""
    max_user_connections: int = 0
    """Maximum server connections per user across its pools; 0 means unlimited."""
    max_user_client_connections: int = 0
    """Maximum client connections per user; 0 means unlimited."""
    server_round_robin: bool = False
    """Reuse server connections round-robin instead of LIFO."""
    track_extra_parameters: str = "IntervalStyle"
    """Comma-separated extra reported parameters to track per client."""
    ignore_startup_parameters: str = ""
    """Comma-separated startup parameters to accept and ignore."""
    peer_id: int = 0
    """This process's id in a peered group (cancel forwarding); 0 disables peering."""
    disable_pqexec: bool = False
    """Reject the Simple Query protocol."""
    application_name_add_host: bool = False
    """Append the client address and port to application_name at connect time."""
    conffile: str | None = None
    """Path of the config file; the loader sets it to the loaded file when unset."""
    service_name: str = "pgbouncer"
    """Service name (Windows); alias of job_name, both are set together."""
    job_name: str = "pgbouncer"
    """Alias of service_name, both are set together."""
    stats_period: int = 60
    """Seconds between statistics averaging and log_stats lines."""
    max_prepared_statements: int = 200
    """Prepared statements cached per server connection in transaction/statement mode; 0 = off."""
    scram_iterations: int = 4096
    """PBKDF2 iterations when PgBouncer computes SCRAM-SHA-256 secrets."""

    # --- Authentication settings ---
    auth_type: AuthType = "md5"
    """Client authentication method."""
    auth_hba_file: str = ""
    """HBA file used when auth_type is hba."""
    auth_ident_file: str | None = None
    """Ident map file used with auth_type hba."""
    auth_file: str | None = None
    """File with user names and passwords (userlist.txt)."""
    auth_user: str | None = None
    """User that runs auth_query for users missing from auth_file."""
    auth_query: str = DEFAULT_AUTH_QUERY
    """Query returning (user name, password) for a user; $1 is the user name."""
    auth_dbname: str | None = None
    """Database (from [databases]) that auth_query runs in; default is the client's."""
    auth_ldap_options: str | None = None
    """LDAP options when auth_type is ldap (may contain a bind password; hidden in repr)."""

    # --- Log settings ---
    syslog: bool = False
    """Log to syslog."""
    syslog_ident: str = "pgbouncer"
    """Program name used in syslog messages."""
    syslog_facility: str = "daemon"
    """Syslog facility."""
    log_connections: bool = True
    """Log successful logins."""
    log_disconnections: bool = True
    """Log disconnections with reasons."""
    log_pooler_errors: bool = True
    """Log error messages the pooler sends to clients."""
    log_stats: bool = True
    """Log aggregated statistics every stats_period."""
    verbose: int = 0
    """Verbosity level (0-3), like repeating -v."""
    log_format: LogFormat = "text"
    """pgmulti-specific: ``text`` (PgBouncer's lines) or ``json`` (one object per line)."""
    workers: int = 0
    """pgmulti-specific: worker processes sharing the listen sockets; 0 means one per CPU core.
    Pool limits are divided among the workers so the totals hold."""
    metrics_port: int = 0
    """pgmulti-specific: serve Prometheus metrics on this TCP port (GET /metrics); 0 is off."""
    metrics_addr: str = "127.0.0.1"
    """pgmulti-specific: address the metrics endpoint listens on."""

    # --- Console access control ---
    admin_users: str = ""
    """Comma-separated users allowed all admin console commands."""
    stats_users: str = ""
    """Comma-separated users allowed read-only admin console commands."""

    # --- Connection sanity checks, timeouts ---
    server_reset_query: str = "DISCARD ALL"
    """Query run on a server connection released in session mode."""
    server_reset_query_always: bool = False
    """Run server_reset_query in every pool mode, not only session."""
    server_check_delay: float = 30.0
    """Seconds a released connection may be reused without server_check_query."""
    server_check_query: str = "<empty>"
    """Liveness check query; ``<empty>`` sends an empty query, empty string disables."""
    server_fast_close: bool = False
    """Close close_needed server connections in session mode at transaction end."""
    server_lifetime: float = 3600.0
    """Seconds after which an unused server connection is closed; 0 means use once."""
    server_idle_timeout: float = 600.0
    """Seconds an idle server connection is kept; 0 disables."""
    server_connect_timeout: float = 15.0
    """Seconds allowed for server connect and login."""
    server_login_retry: float = 15.0
    """Seconds to wait before retrying after a failed server login."""
    client_login_timeout: float = 60.0
    """Seconds a client has to finish logging in."""
    autodb_idle_timeout: float = 3600.0
    """Seconds after which unused databases created from ``*`` are dropped."""
    dns_max_ttl: float = 15.0
    """Seconds DNS results are cached."""
    dns_nxdomain_ttl: float = 15.0
    """Seconds DNS errors and NXDOMAIN are cached."""
    dns_zone_check_period: float = 0.0
    """Seconds between DNS zone serial checks; 0 disables."""
    resolv_conf: str = ""
    """Custom resolv.conf path; empty uses the system's."""
    query_wait_notify: int = 5
    """Seconds a queued client waits before being sent a notice; 0 disables."""

    # --- TLS settings ---
    client_tls_sslmode: SslMode = "disable"
    """TLS mode for client connections."""
    client_tls_key_file: str = ""
    """Private key for client-facing TLS."""
    client_tls_cert_file: str = ""
    """Certificate for client-facing TLS."""
    client_tls_ca_file: str = ""
    """CA file to validate client certificates."""
    client_tls_protocols: str = "secure"
    """Allowed TLS versions for clients."""
    client_tls_ciphers: str = "default"
    """Allowed TLS <= 1.2 ciphers for clients (OpenSSL syntax)."""
    client_tls13_ciphers: str | None = None
    """Allowed TLS 1.3 ciphers for clients; unset uses client_tls_ciphers."""
    client_tls_ecdhcurve: str = "auto"
    """ECDH curve for client TLS."""
    client_tls_dheparams: str = "auto"
    """DHE parameters for client TLS."""
    server_tls_sslmode: SslMode = "prefer"
    """TLS mode for server connections."""
    server_tls_ca_file: str = ""
    """CA file to validate server certificates."""
    server_tls_key_file: str = ""
    """Private key for authenticating to servers."""
    server_tls_cert_file: str = ""
    """Certificate for authenticating to servers."""
    server_tls_protocols: str = "secure"
    """Allowed TLS versions for servers."""
    server_tls_ciphers: str = "default"
    """Allowed TLS <= 1.2 ciphers for servers (OpenSSL syntax)."""
    server_tls13_ciphers: str | None = None
    """Allowed TLS 1.3 ciphers for servers; unset uses server_tls_ciphers."""

    # --- Dangerous timeouts ---
    query_timeout: float = 0.0
    """Cancel queries running longer than this many seconds; 0 disables."""
    query_wait_timeout: float = 120.0
    """Seconds a query may wait for a server before the client is dropped; 0 disables."""
    cancel_wait_timeout: float = 10.0
    """Seconds a cancel request may wait for a server; 0 disables."""
    client_idle_timeout: float = 0.0
    """Close client connections idle this many seconds; 0 disables."""
    idle_transaction_timeout: float = 0.0
    """Disconnect clients idle in transaction this many seconds; 0 disables."""
    transaction_timeout: float = 0.0
    """Disconnect clients in a transaction longer than this many seconds; 0 disables."""
    suspend_timeout: float = 10.0
    """Seconds to wait for buffer flush on SUSPEND or online restart."""

    # --- Low-level network settings ---
    pkt_buf: int = 4096
    """Internal packet buffer size in bytes."""
    max_packet_size: int = 2147483647
    """Largest protocol message allowed through, in bytes."""
    listen_backlog: int = 128
    """Backlog for listen(2)."""
    sbuf_loopcnt: int = 5
    """Rounds of data processed per connection before moving on; 0 means no limit."""
    so_reuseport: bool = False
    """Set SO_REUSEPORT on TCP listening sockets."""
    tcp_defer_accept: bool = _DEFAULT_TCP_DEFER_ACCEPT
    """Set TCP_DEFER_ACCEPT on listening sockets (default on where supported)."""
    tcp_socket_buffer: int = 0
    """Socket buffer size in bytes; 0 keeps the OS default."""
    tcp_keepalive: bool = True
    """Enable TCP keepalive."""
    tcp_keepcnt: int = 0
    """TCP_KEEPCNT; 0 keeps the OS default."""
    tcp_keepidle: int = 0
    """TCP_KEEPIDLE in seconds; 0 keeps the OS default."""
    tcp_keepintvl: int = 0
    """TCP_KEEPINTVL in seconds; 0 keeps the OS default."""
    tcp_user_timeout: int = 0
    """TCP_USER_TIMEOUT in milliseconds; 0 keeps the OS default."""


class Database(_Struct):
    """One ``[databases]`` entry: the client-side name and its connection string.

    ``None`` means "not set": limits and modes then fall back to the user or global
    settings (see the ``Config.effective_*`` helpers).
    """

    _secret_fields = frozenset({"password"})

    name: str
    """Database name clients connect to (the entry's key); ``*`` is the fallback entry."""
    dbname: str | None = None
    """Database name on the server; unset means the client-side name."""
    host: str | None = None
    """Host, address, comma-separated list, or socket dir (``/`` or ``@``); unset: unix socket."""
    port: int = 5432
    """Server port."""
    user: str | None = None
    """Forced server user: all clients share one pool logged in as this user."""
    password: str | None = None
    """Password of the forced user; unset means look it up in auth_file (hidden in repr)."""
    auth_user: str | None = None
    """Per-database override of auth_user."""
    auth_query: str | None = None
    """Per-database override of auth_query."""
    auth_dbname: str | None = None
    """Per-database override of auth_dbname."""
    pool_size: int | None = None
    """Per-database override of default_pool_size."""
    min_pool_size: int | None = None
    """Per-database override of min_pool_size."""
    reserve_pool_size: int | None = None
    """Per-database override of reserve_pool_size (``reserve_pool`` is an alias)."""
    connect_query: str | None = None
    """Query run once on each new server connection."""
    pool_mode: PoolMode | None = None
    """Per-database override of pool_mode."""
    load_balance_hosts: LoadBalanceHosts = "round-robin"
    """How a host from a host list is chosen: round-robin, or disable (stick until failure)."""
    max_db_connections: int | None = None
    """Per-database override of max_db_connections."""
    max_db_client_connections: int | None = None
    """Per-database override of max_db_client_connections."""
    server_lifetime: float | None = None
    """Per-database override of server_lifetime, in seconds."""
    client_encoding: str | None = None
    """client_encoding sent to the server at connect."""
    datestyle: str | None = None
    """DateStyle sent to the server at connect."""
    timezone: str | None = None
    """TimeZone sent to the server at connect."""
    application_name: str | None = None
    """application_name sent to the server at connect."""

    @property
    def server_dbname(self) -> str:
        """The database name to request from the server (``dbname``, else ``name``)."""
        return self.dbname if self.dbname is not None else self.name

    @property
    def hosts(self) -> tuple[str, ...]:
        """The entries of ``host`` as a tuple; empty when ``host`` is unset."""
        return split_list(self.host) if self.host else ()


class User(_Struct):
    """One ``[users]`` entry: per-user overrides; ``None`` means "not set"."""

    name: str
    """User name (the entry's key)."""
    pool_mode: PoolMode | None = None
    """Per-user override of pool_mode (wins over the database's)."""
    pool_size: int | None = None
    """Per-user override of the pool size (wins over the database's)."""
    reserve_pool_size: int | None = None
    """Per-user override of reserve_pool_size (wins over the database's)."""
    max_user_connections: int | None = None
    """Per-user override of max_user_connections."""
    max_user_client_connections: int | None = None
    """Per-user override of max_user_client_connections."""
    query_timeout: float | None = None
    """Per-user override of query_timeout, in seconds."""
    idle_transaction_timeout: float | None = None
    """Per-user override of idle_transaction_timeout, in seconds."""
    transaction_timeout: float | None = None
    """Per-user override of transaction_timeout, in seconds."""
    client_idle_timeout: float | None = None
    """Per-user override of client_idle_timeout, in seconds."""


class Peer(_Struct):
    """One ``[peers]`` entry: another PgBouncer process to forward cancel requests to."""

    peer_id: int
    """The peer's id (the entry's key), 1-65535."""
    host: str
    """Host name, address, or Unix socket dir of the peer."""
    port: int = 6432
    """Port of the peer."""
    pool_size: int | None = None
    """Maximum cancel requests in flight to the peer; unset means default_pool_size."""


class Config(_Struct):
    """A loaded configuration file.

    The dicts are not to be mutated: a reload builds a new ``Config``.
    """

    pgbouncer: Pgbouncer = msgspec.field(default_factory=Pgbouncer)
    """The [pgbouncer] settings."""
    databases: dict[str, Database] = {}
    """[databases] entries by client-side name; may contain the ``*`` fallback."""
    users: dict[str, User] = {}
    """[users] entries by user name."""
    peers: dict[int, Peer] = {}
    """[peers] entries by peer id."""
    path: str = ""
    """Path the configuration was loaded from."""
    unsupported: tuple[str, ...] = ()
    """Sorted keys the file sets that pgmulti does not act on (see UNSUPPORTED_KEYS)."""
    warnings: tuple[str, ...] = ()
    """Non-fatal problems found while loading, each prefixed with file:line."""

    # --- lookups ---

    def database_for(self, name: str) -> Database | None:
        """The entry for client-side database ``name``.

        An exact entry wins; otherwise the ``*`` entry is used as a template, named
        ``name`` and with ``dbname`` defaulting to ``name``.  ``None`` if neither exists.
        """
        db = self.databases.get(name)
        if db is not None:
            return db
        fallback = self.databases.get("*")
        if fallback is None:
            return None
        dbname = fallback.dbname if fallback.dbname is not None else name
        return msgspec.structs.replace(fallback, name=name, dbname=dbname)

    # --- effective values (PgBouncer's precedence rules, see its src/server.c) ---
    #
    # All helpers take (db, user), either of which may be None, so callers can use one
    # call shape; settings that have no per-user (or per-database) form ignore that
    # argument.  Where PgBouncer treats a non-positive per-entry limit as "not set",
    # so do these helpers.

    def effective_pool_mode(self, db: Database | None, user: User | None = None) -> PoolMode:
        """pool_mode: user, else database, else global."""
        if user is not None and user.pool_mode is not None:
            return user.pool_mode
        if db is not None and db.pool_mode is not None:
            return db.pool_mode
        return self.pgbouncer.pool_mode

    def effective_pool_size(self, db: Database | None, user: User | None = None) -> int:
        """Pool size: user, else database, else default_pool_size (0 = unlimited)."""
        candidates = (_get(user, "pool_size"), _get(db, "pool_size"))
        return _first_set(candidates, self.pgbouncer.default_pool_size, positive=False)

    def effective_reserve_pool_size(self, db: Database | None, user: User | None = None) -> int:
        """reserve_pool_size: user, else database, else global."""
        candidates = (_get(user, "reserve_pool_size"), _get(db, "reserve_pool_size"))
        return _first_set(candidates, self.pgbouncer.reserve_pool_size, positive=False)

    def effective_min_pool_size(self, db: Database | None, user: User | None = None) -> int:
        """min_pool_size: database, else global (there is no per-user form)."""
        candidates = (_get(db, "min_pool_size"),)
        return _first_set(candidates, self.pgbouncer.min_pool_size, positive=False)

    def effective_max_db_connections(self, db: Database | None, user: User | None = None) -> int:
        """max_db_connections: database if positive, else global (0 = unlimited)."""
        candidates = (_get(db, "max_db_connections"),)
        return _first_set(candidates, self.pgbouncer.max_db_connections, positive=True)

    def effective_max_db_client_connections(
        self, db: Database | None, user: User | None = None
    ) -> int:
        """max_db_client_connections: database if positive, else global (0 = unlimited)."""
        candidates = (_get(db, "max_db_client_connections"),)
        return _first_set(candidates, self.pgbouncer.max_db_client_connections, positive=True)

    def effective_max_user_connections(
        self, db: Database | None, user: User | None = None
    ) -> int:
        """max_user_connections: user if positive, else global (0 = unlimited)."""
        candidates = (_get(user, "max_user_connections"),)
        return _first_set(candidates, self.pgbouncer.max_user_connections, positive=True)

    def effective_max_user_client_connections(
        self, db: Database | None, user: User | None = None
    ) -> int:
        """max_user_client_connections: user if positive, else global (0 = unlimited)."""
        candidates = (_get(user, "max_user_client_connections"),)
        return _first_set(candidates, self.pgbouncer.max_user_client_connections, positive=True)

    def effective_server_lifetime(self, db: Database | None, user: User | None = None) -> float:
        """server_lifetime: database if positive, else global."""
        candidates = (_get(db, "server_lifetime"),)
        return _first_set(candidates, self.pgbouncer.server_lifetime, positive=True)

    def effective_query_timeout(self, db: Database | None, user: User | None = None) -> float:
        """query_timeout: user if positive, else global (0 = disabled)."""
        candidates = (_get(user, "query_timeout"),)
        return _first_set(candidates, self.pgbouncer.query_timeout, positive=True)

    def effective_idle_transaction_timeout(
        self, db: Database | None, user: User | None = None
    ) -> float:
        """idle_transaction_timeout: user if positive, else global (0 = disabled)."""
        candidates = (_get(user, "idle_transaction_timeout"),)
        return _first_set(candidates, self.pgbouncer.idle_transaction_timeout, positive=True)

    def effective_transaction_timeout(
        self, db: Database | None, user: User | None = None
    ) -> float:
        """transaction_timeout: user if positive, else global (0 = disabled)."""
        candidates = (_get(user, "transaction_timeout"),)
        return _first_set(candidates, self.pgbouncer.transaction_timeout, positive=True)

    def effective_client_idle_timeout(
        self, db: Database | None, user: User | None = None
    ) -> float:
        """client_idle_timeout: user if positive, else global (0 = disabled)."""
        candidates = (_get(user, "client_idle_timeout"),)
        return _first_set(candidates, self.pgbouncer.client_idle_timeout, positive=True)


def _get(entry: Database | User | None, field: str) -> Any:
    """``entry.field``, or ``None`` when there is no entry."""
    return None if entry is None else getattr(entry, field)


def _first_set(candidates: tuple[Any, ...], default: Any, *, positive: bool) -> Any:
    """The first candidate that is set (not None, and > 0 if ``positive`` else >= 0).

    Falls back to ``default`` when no candidate is set.
    """
    for value in candidates:
        if value is not None and (value > 0 if positive else value >= 0):
            return value
    return default
