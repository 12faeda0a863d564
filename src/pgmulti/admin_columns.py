"""PgBouncer admin-console reference data: SHOW column lists, value formats, tags, errors."""

# Sources: PgBouncer 1.25.2 (tag pgbouncer_1_25_2 of pgbouncer/pgbouncer:
# src/admin.c, src/stats.c, src/pktbuf.c, src/main.c, src/proto.c,
# lib/usual/time.c, doc/usage.md) and PgBouncer 1.18.0 (the installed
# /usr/sbin/pgbouncer, queried over the wire; it agrees with tag
# pgbouncer_1_18_0). 1.25.0, 1.25.1 and 1.25.2 send the same columns.
#
# Everything below is written as plain data; no PgBouncer code is copied.

from __future__ import annotations

PGBOUNCER_VERSION = "1.25.2"

# ---------------------------------------------------------------------------
# Wire types
# ---------------------------------------------------------------------------
# PgBouncer builds every RowDescription from a one-letter-per-column format
# string. What each letter puts on the wire (type OID, typlen):
#   's' -> text    OID 25,   typlen -1
#   'i' -> int4    OID 23,   typlen 4
#   'q' -> int8    OID 20,   typlen 8
#   'N' -> numeric OID 1700, typlen -1   (value printed as unsigned 64-bit)
#   'b' -> bytea   OID 17,   typlen -1   (value printed as "\x" + lowercase hex)
#   'T' -> text    OID 25,   typlen -1   (!) Timestamps are NOT timestamptz:
#          PgBouncer formats them itself and labels the column text.
# Every field of the RowDescription has table OID 0, attnum 0, typmod -1 and
# format code 0 (text). A NULL value is sent with length -1.
# These OIDs and lengths are the same in 1.18 and 1.25.
FORMAT_LETTERS: dict[str, str] = {
    "s": "text",
    "i": "int4",
    "q": "int8",
    "N": "numeric",
    "b": "bytea",
    "T": "text",
}

TYPE_OIDS: dict[str, int] = {
    "text": 25,
    "int4": 23,
    "int8": 20,
    "numeric": 1700,
    "bytea": 17,
}

TYPE_SIZES: dict[str, int] = {
    "text": -1,
    "int4": 4,
    "int8": 8,
    "numeric": -1,
    "bytea": -1,
}

ROW_DESCRIPTION_FIELD_DEFAULTS: dict[str, int] = {
    "table_oid": 0,
    "column_attnum": 0,
    "type_modifier": -1,
    "format_code": 0,
}

# Columns sent with letter 'T'. Their type on the wire is text (OID 25).
# Format: "YYYY-MM-DD HH:MM:SS TZ" in the pooler's *local* time zone, with TZ
# the C tzname abbreviation (e.g. "2026-11-22 04:24:36 UTC", "... CET").
# No fractional seconds. Quirk: a zero timestamp is printed as the *current*
# time rather than NULL/epoch (the admin console's own row shows request_time
# equal to "now" for that reason).
TIMESTAMP_TEXT_COLUMNS: frozenset[str] = frozenset({"connect_time", "request_time"})

# ---------------------------------------------------------------------------
# Column lists, PgBouncer 1.25
# ---------------------------------------------------------------------------
# Shared by SHOW CLIENTS / SERVERS / SOCKETS / ACTIVE_SOCKETS
# (letters "ssssssisiTTiiississii" + debug "iiiiiii").
#
# Value formats (1.25):
#   type            "C" (client) or "S" (server).
#   user            login user name, "(nouser)" if none yet.
#   database        database entry name, "(nodb)" if no pool (or a peer pool).
#   replication     "none", "logical" or "physical".
#   state           SHOW CLIENTS: "active", "idle", "waiting",
#                   "active_cancel_req", "waiting_cancel_req". A client in the
#                   active list without a linked server is shown as "idle"
#                   (new in 1.25; 1.18 shows "active"). Login-phase clients
#                   are NOT listed by SHOW CLIENTS.
#                   SHOW SERVERS: "active", "idle", "used", "tested", "new",
#                   "active_cancel", "being_canceled" (per pool, in that
#                   order), then peer pools' "new" and "active_cancel".
#                   SHOW SOCKETS / ACTIVE_SOCKETS: "cl_active", "cl_waiting",
#                   "sv_active", "sv_idle", "sv_used", "sv_tested",
#                   "sv_login" per pool, then "cl_login" for clients still
#                   logging in. ACTIVE_SOCKETS lists only sockets whose buffer
#                   is non-empty.
#   addr/local_addr numeric address text from inet_ntop, e.g. "127.0.0.1",
#                   "::1"; "unix" for Unix-socket connections.
#   port/local_port int4; for a Unix-socket client both are the listen port.
#   connect_time, request_time   text timestamps, see TIMESTAMP_TEXT_COLUMNS.
#   wait, wait_us   whole seconds and microsecond remainder since the
#                   client's current request started (query_start), also for
#                   active clients; 0 when none. Servers: 0.
#   close_needed    0/1.
#   ptr, link       C "%p" of the object: lowercase hex with "0x" prefix,
#                   e.g. "0x561d43d86c50"; link is "" (empty, not NULL) when
#                   unpaired.
#   remote_pid      peer pid via Unix-socket credentials; for servers falls
#                   back to the backend pid from the cancel key; else 0.
#   tls             "" when no TLS, else
#                   "<proto>/<cipher>[/ECDH=<curve>|/DH=<bits>][/OCSP=<result>]",
#                   e.g. "TLSv1.3/TLS_AES_256_GCM_SHA384/ECDH=X25519".
#   application_name  "" (not NULL) when unset; for servers it is the value
#                   carried on the server connection (can be stale on idle ones).
#   prepared_statements  count of prepared statements on this connection.
#   id              unique numeric connection id (int4 on the wire); the
#                   argument of KILL_CLIENT.
#   debug columns   recv_pos, pkt_pos, pkt_remain, send_pos, send_remain
#                   (always 0), pkt_avail, send_avail: buffer positions.
_SOCKET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("type", "text"),
    ("user", "text"),
    ("database", "text"),
    ("replication", "text"),
    ("state", "text"),
    ("addr", "text"),
    ("port", "int4"),
    ("local_addr", "text"),
    ("local_port", "int4"),
    ("connect_time", "text"),
    ("request_time", "text"),
    ("wait", "int4"),
    ("wait_us", "int4"),
    ("close_needed", "int4"),
    ("ptr", "text"),
    ("link", "text"),
    ("remote_pid", "int4"),
    ("tls", "text"),
    ("application_name", "text"),
    ("prepared_statements", "int4"),
    ("id", "int4"),
)

_SOCKET_DEBUG_COLUMNS: tuple[tuple[str, str], ...] = (
    ("recv_pos", "int4"),
    ("pkt_pos", "int4"),
    ("pkt_remain", "int4"),
    ("send_pos", "int4"),
    ("send_remain", "int4"),
    ("pkt_avail", "int4"),
    ("send_avail", "int4"),
)

COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    # SHOW POOLS: one row per (database, user) pool, admin pool included
    # (database "pgbouncer", user "pgbouncer", pool_mode "statement").
    # cl_*/sv_* are list counts. maxwait/maxwait_us: age of the oldest waiting
    # client, whole seconds + microsecond part. pool_mode is the effective
    # mode (user override, else database override, else global):
    # "session" | "transaction" | "statement". load_balance_hosts is
    # "disable" | "round-robin" when the database host is a comma-separated
    # list, else NULL.
    "pools": (
        ("database", "text"),
        ("user", "text"),
        ("cl_active", "int4"),
        ("cl_waiting", "int4"),
        ("cl_active_cancel_req", "int4"),
        ("cl_waiting_cancel_req", "int4"),
        ("sv_active", "int4"),
        ("sv_active_cancel", "int4"),
        ("sv_being_canceled", "int4"),
        ("sv_idle", "int4"),
        ("sv_used", "int4"),
        ("sv_tested", "int4"),
        ("sv_login", "int4"),
        ("maxwait", "int4"),
        ("maxwait_us", "int4"),
        ("pool_mode", "text"),
        ("load_balance_hosts", "text"),
    ),
    # SHOW STATS: one row per database (pools of the same database summed).
    # All counters numeric (OID 1700), printed as unsigned integers.
    # total_* are cumulative: *_count counts, total_received/total_sent in
    # bytes, *_time in microseconds. Over the last stats_period: avg_*_count,
    # avg_recv, avg_sent are per-second rates; avg_xact_time / avg_query_time
    # are microseconds per transaction / query; avg_wait_time is microseconds
    # per server assignment. Integer division, 0 when nothing happened.
    # *_parse_count / bind_count only move with max_prepared_statements > 0.
    "stats": (
        ("database", "text"),
        ("total_server_assignment_count", "numeric"),
        ("total_xact_count", "numeric"),
        ("total_query_count", "numeric"),
        ("total_received", "numeric"),
        ("total_sent", "numeric"),
        ("total_xact_time", "numeric"),
        ("total_query_time", "numeric"),
        ("total_wait_time", "numeric"),
        ("total_client_parse_count", "numeric"),
        ("total_server_parse_count", "numeric"),
        ("total_bind_count", "numeric"),
        ("avg_server_assignment_count", "numeric"),
        ("avg_xact_count", "numeric"),
        ("avg_query_count", "numeric"),
        ("avg_recv", "numeric"),
        ("avg_sent", "numeric"),
        ("avg_xact_time", "numeric"),
        ("avg_query_time", "numeric"),
        ("avg_wait_time", "numeric"),
        ("avg_client_parse_count", "numeric"),
        ("avg_server_parse_count", "numeric"),
        ("avg_bind_count", "numeric"),
    ),
    # SHOW STATS_TOTALS: the total_* half of SHOW STATS without the prefix;
    # total_received/total_sent become bytes_received/bytes_sent.
    "stats_totals": (
        ("database", "text"),
        ("server_assignment_count", "numeric"),
        ("xact_count", "numeric"),
        ("query_count", "numeric"),
        ("bytes_received", "numeric"),
        ("bytes_sent", "numeric"),
        ("xact_time", "numeric"),
        ("query_time", "numeric"),
        ("wait_time", "numeric"),
        ("client_parse_count", "numeric"),
        ("server_parse_count", "numeric"),
        ("bind_count", "numeric"),
    ),
    # SHOW STATS_AVERAGES: the avg_* half of SHOW STATS. Naming quirk: the
    # first columns have no prefix (xact_count, bytes_received, ...) but the
    # last three keep it (avg_client_parse_count, avg_server_parse_count,
    # avg_bind_count).
    "stats_averages": (
        ("database", "text"),
        ("server_assignment_count", "numeric"),
        ("xact_count", "numeric"),
        ("query_count", "numeric"),
        ("bytes_received", "numeric"),
        ("bytes_sent", "numeric"),
        ("xact_time", "numeric"),
        ("query_time", "numeric"),
        ("wait_time", "numeric"),
        ("avg_client_parse_count", "numeric"),
        ("avg_server_parse_count", "numeric"),
        ("avg_bind_count", "numeric"),
    ),
    # SHOW TOTALS: name/value rows, summed over all pools; see TOTALS_ROWS
    # for the row names (they use client_bytes/server_bytes naming).
    "totals": (
        ("name", "text"),
        ("value", "numeric"),
    ),
    # SHOW CLIENTS: see the _SOCKET_COLUMNS notes above.
    "clients": _SOCKET_COLUMNS,
    # SHOW SERVERS: same header as SHOW CLIENTS.
    "servers": _SOCKET_COLUMNS,
    # SHOW DATABASES: one row per [databases] entry, plus "pgbouncer"
    # (host NULL, port = listen_port, force_user "pgbouncer", pool_size 2,
    # pool_mode "statement"). host NULL when the entry has no host= (Unix
    # socket); force_user NULL unless set. pool_size, min_pool_size, reserve_pool_size
    # and server_lifetime (whole seconds) are effective values (entry
    # override else global). pool_mode is the entry's override or NULL.
    # load_balance_hosts as in SHOW POOLS. max_connections /
    # max_client_connections: effective limits (0 = unlimited). paused and
    # disabled are 0/1.
    "databases": (
        ("name", "text"),
        ("host", "text"),
        ("port", "int4"),
        ("database", "text"),
        ("force_user", "text"),
        ("pool_size", "int4"),
        ("min_pool_size", "int4"),
        ("reserve_pool_size", "int4"),
        ("server_lifetime", "int4"),
        ("pool_mode", "text"),
        ("load_balance_hosts", "text"),
        ("max_connections", "int4"),
        ("current_connections", "int4"),
        ("max_client_connections", "int4"),
        ("current_client_connections", "int4"),
        ("paused", "int4"),
        ("disabled", "int4"),
    ),
    # SHOW USERS: pool_size and reserve_pool_size are TEXT, not int: NULL
    # unless overridden, otherwise printf("%9d"), i.e. right-aligned in 9
    # characters ("       20"). Quirk in 1.25.x: the formatting buffer is
    # not reset between rows, so after a user with an override, later users
    # without one repeat that value (fixed after 1.25.2 on master).
    # pool_mode: override or NULL. max_user_connections and
    # max_user_client_connections are effective limits (0 = unlimited).
    "users": (
        ("name", "text"),
        ("pool_size", "text"),
        ("reserve_pool_size", "text"),
        ("pool_mode", "text"),
        ("max_user_connections", "int4"),
        ("current_connections", "int4"),
        ("max_user_client_connections", "int4"),
        ("current_client_connections", "int4"),
    ),
    # SHOW CONFIG: one row per [pgbouncer] setting, in CONFIG_KEYS order.
    # value/default are text, NULL when unset (e.g. auth_user). Time
    # settings print in seconds ("3600"); unix_socket_mode prints in decimal
    # ("511") while its default is "0777". changeable is "yes" or "no".
    "config": (
        ("key", "text"),
        ("value", "text"),
        ("default", "text"),
        ("changeable", "text"),
    ),
    # SHOW LISTS: fixed rows, see LISTS_ROWS.
    "lists": (
        ("list", "text"),
        ("items", "int4"),
    ),
    # SHOW MEM: one row per slab cache, see MEM_ROWS. size = object size in
    # bytes, used/free = object counts, memtotal = size * (used + free).
    "mem": (
        ("name", "text"),
        ("size", "int4"),
        ("used", "int4"),
        ("free", "int4"),
        ("memtotal", "int4"),
    ),
    # SHOW VERSION: one row, "PgBouncer 1.25.2".
    "version": (
        ("version", "text"),
    ),
    # SHOW STATE: three rows, see STATE_ROWS; values "yes" / "no".
    "state": (
        ("key", "text"),
        ("value", "text"),
    ),
    # SHOW PEERS: one row per [peers] entry; pool_size effective.
    "peers": (
        ("peer_id", "int4"),
        ("host", "text"),
        ("port", "int4"),
        ("pool_size", "int4"),
    ),
    # SHOW PEER_POOLS: one row per peer pool. The docs call the first column
    # "database", but the wire name is "peer_id" (int4).
    "peer_pools": (
        ("peer_id", "int4"),
        ("cl_active_cancel_req", "int4"),
        ("cl_waiting_cancel_req", "int4"),
        ("sv_active_cancel", "int4"),
        ("sv_login", "int4"),
    ),
    # SHOW SOCKETS: client/server columns followed by the debug columns.
    "sockets": _SOCKET_COLUMNS + _SOCKET_DEBUG_COLUMNS,
    # SHOW ACTIVE_SOCKETS: same header as SHOW SOCKETS.
    "active_sockets": _SOCKET_COLUMNS + _SOCKET_DEBUG_COLUMNS,
    # SHOW FDS (admin users only, else "admin access needed"): rows for the
    # listening sockets (task "pooler", user/database NULL, addr "unix" for
    # the Unix socket, cancel 0, link 0), then login clients, then for each
    # non-admin pool its clients and servers. task: "pooler" | "client" |
    # "server". cancel: 8-byte cancel key read as big-endian unsigned int.
    # link: fd of the paired socket, 0 when none. client_encoding,
    # std_strings, datestyle, timezone: cached parameter values or NULL.
    # password: only for auth_user/PAM logins, else NULL. scram_*_key:
    # bytea "\x<64 hex>" when SCRAM keys are passed through, else NULL.
    # TLS sockets are skipped.
    "fds": (
        ("fd", "int4"),
        ("task", "text"),
        ("user", "text"),
        ("database", "text"),
        ("addr", "text"),
        ("port", "int4"),
        ("cancel", "int8"),
        ("link", "int4"),
        ("client_encoding", "text"),
        ("std_strings", "text"),
        ("datestyle", "text"),
        ("timezone", "text"),
        ("password", "text"),
        ("scram_client_key", "bytea"),
        ("scram_server_key", "bytea"),
    ),
    # SHOW DNS_HOSTS: ttl = whole seconds until the next lookup (0 if
    # overdue); addrs = comma-separated "ip:port" / "[ipv6]:port" strings.
    "dns_hosts": (
        ("hostname", "text"),
        ("ttl", "int8"),
        ("addrs", "text"),
    ),
    # SHOW DNS_ZONES: serial as int8, count = host names in the zone.
    "dns_zones": (
        ("zonename", "text"),
        ("serial", "int8"),
        ("count", "int4"),
    ),
    # SHOW HELP sends no RowDescription and no rows: a single NoticeResponse
    # (see HELP_LINES) followed by CommandComplete "SHOW".
    "help": (),
}

# ---------------------------------------------------------------------------
# Column lists, PgBouncer 1.18 (the installed binary; SHOW STATE, PEERS and
# PEER_POOLS do not exist there and answer "invalid command").
# ---------------------------------------------------------------------------
_SOCKET_COLUMNS_1_18: tuple[tuple[str, str], ...] = (
    ("type", "text"),
    ("user", "text"),
    ("database", "text"),
    ("state", "text"),
    ("addr", "text"),
    ("port", "int4"),
    ("local_addr", "text"),
    ("local_port", "int4"),
    ("connect_time", "text"),
    ("request_time", "text"),
    ("wait", "int4"),
    ("wait_us", "int4"),
    ("close_needed", "int4"),
    ("ptr", "text"),
    ("link", "text"),
    ("remote_pid", "int4"),
    ("tls", "text"),
    ("application_name", "text"),
)

COLUMNS_1_18: dict[str, tuple[tuple[str, str], ...]] = {
    "pools": (
        ("database", "text"),
        ("user", "text"),
        ("cl_active", "int4"),
        ("cl_waiting", "int4"),
        ("cl_active_cancel_req", "int4"),
        ("cl_waiting_cancel_req", "int4"),
        ("sv_active", "int4"),
        ("sv_active_cancel", "int4"),
        ("sv_being_canceled", "int4"),
        ("sv_idle", "int4"),
        ("sv_used", "int4"),
        ("sv_tested", "int4"),
        ("sv_login", "int4"),
        ("maxwait", "int4"),
        ("maxwait_us", "int4"),
        ("pool_mode", "text"),
    ),
    "stats": (
        ("database", "text"),
        ("total_xact_count", "numeric"),
        ("total_query_count", "numeric"),
        ("total_received", "numeric"),
        ("total_sent", "numeric"),
        ("total_xact_time", "numeric"),
        ("total_query_time", "numeric"),
        ("total_wait_time", "numeric"),
        ("avg_xact_count", "numeric"),
        ("avg_query_count", "numeric"),
        ("avg_recv", "numeric"),
        ("avg_sent", "numeric"),
        ("avg_xact_time", "numeric"),
        ("avg_query_time", "numeric"),
        ("avg_wait_time", "numeric"),
    ),
    "stats_totals": (
        ("database", "text"),
        ("xact_count", "numeric"),
        ("query_count", "numeric"),
        ("bytes_received", "numeric"),
        ("bytes_sent", "numeric"),
        ("xact_time", "numeric"),
        ("query_time", "numeric"),
        ("wait_time", "numeric"),
    ),
    "stats_averages": (
        ("database", "text"),
        ("xact_count", "numeric"),
        ("query_count", "numeric"),
        ("bytes_received", "numeric"),
        ("bytes_sent", "numeric"),
        ("xact_time", "numeric"),
        ("query_time", "numeric"),
        ("wait_time", "numeric"),
    ),
    "totals": (
        ("name", "text"),
        ("value", "numeric"),
    ),
    "databases": (
        ("name", "text"),
        ("host", "text"),
        ("port", "int4"),
        ("database", "text"),
        ("force_user", "text"),
        ("pool_size", "int4"),
        ("min_pool_size", "int4"),
        ("reserve_pool", "int4"),
        ("pool_mode", "text"),
        ("max_connections", "int4"),
        ("current_connections", "int4"),
        ("paused", "int4"),
        ("disabled", "int4"),
    ),
    "users": (
        ("name", "text"),
        ("pool_mode", "text"),
    ),
    "config": (
        ("key", "text"),
        ("value", "text"),
        ("default", "text"),
        ("changeable", "text"),
    ),
    "lists": (
        ("list", "text"),
        ("items", "int4"),
    ),
    "mem": (
        ("name", "text"),
        ("size", "int4"),
        ("used", "int4"),
        ("free", "int4"),
        ("memtotal", "int4"),
    ),
    "version": (
        ("version", "text"),
    ),
    "fds": (
        ("fd", "int4"),
        ("task", "text"),
        ("user", "text"),
        ("database", "text"),
        ("addr", "text"),
        ("port", "int4"),
        ("cancel", "int8"),
        ("link", "int4"),
        ("client_encoding", "text"),
        ("std_strings", "text"),
        ("datestyle", "text"),
        ("timezone", "text"),
        ("password", "text"),
        ("scram_client_key", "bytea"),
        ("scram_server_key", "bytea"),
    ),
    "dns_hosts": (
        ("hostname", "text"),
        ("ttl", "int8"),
        ("addrs", "text"),
    ),
    "dns_zones": (
        ("zonename", "text"),
        ("serial", "int8"),
        ("count", "int4"),
    ),
    "clients": _SOCKET_COLUMNS_1_18,
    "servers": _SOCKET_COLUMNS_1_18,
    "sockets": _SOCKET_COLUMNS_1_18 + _SOCKET_DEBUG_COLUMNS,
    "active_sockets": _SOCKET_COLUMNS_1_18 + _SOCKET_DEBUG_COLUMNS,
    "help": (),
}

# What changed between 1.18 and 1.25 (release that introduced it):
#   POOLS       + load_balance_hosts (1.24)
#   STATS       + total_server_assignment_count, avg_server_assignment_count
#                 (1.23); + total_/avg_ client_parse_count,
#                 server_parse_count, bind_count (1.24)
#   STATS_TOTALS / STATS_AVERAGES  same additions without total_/avg_
#   TOTALS      rows + total_/avg_ server_assignment_count,
#                 ps_client_parse_count, ps_server_parse_count, ps_bind_count
#   CLIENTS/SERVERS/SOCKETS/ACTIVE_SOCKETS
#               + replication after database (1.23); + prepared_statements
#                 (1.21) and id (1.24) after application_name; new client
#                 state "idle" (1.25)
#   DATABASES   reserve_pool renamed reserve_pool_size; + server_lifetime
#                 (1.23), load_balance_hosts, max_client_connections,
#                 current_client_connections (1.24)
#   USERS       was (name, pool_mode); now 8 columns (1.23/1.24)
#   LISTS       + rows "peers", "peer_pools"
#   MEM         + credentials_cache, peer_cache, peer_pool_cache,
#                 outstanding_request_cache, var_list_cache,
#                 server_prepared_statement_cache
#   new commands SHOW STATE, SHOW PEERS, SHOW PEER_POOLS (1.19),
#                KILL_CLIENT (1.24), KILL without a database (kills all)
# Unreleased master (after 1.25.2) adds total_client_login_count /
# avg_client_login_count to SHOW STATS and client_login_count to
# STATS_TOTALS, STATS_AVERAGES and TOTALS; not included above.

# ---------------------------------------------------------------------------
# Fixed row names
# ---------------------------------------------------------------------------
# SHOW LISTS ("list", "items"), in this order.
LISTS_ROWS: tuple[str, ...] = (
    "databases",
    "users",
    "peers",
    "pools",
    "peer_pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
    "dns_pending",
)

LISTS_ROWS_1_18: tuple[str, ...] = (
    "databases",
    "users",
    "pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
    "dns_pending",
)

# SHOW TOTALS ("name", "value"), in this order.
TOTALS_ROWS: tuple[str, ...] = (
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_client_bytes",
    "total_server_bytes",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_ps_client_parse_count",
    "total_ps_server_parse_count",
    "total_ps_bind_count",
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_client_bytes",
    "avg_server_bytes",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_ps_client_parse_count",
    "avg_ps_server_parse_count",
    "avg_ps_bind_count",
)

TOTALS_ROWS_1_18: tuple[str, ...] = (
    "total_xact_count",
    "total_query_count",
    "total_client_bytes",
    "total_server_bytes",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_count",
    "avg_query_count",
    "avg_client_bytes",
    "avg_server_bytes",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
)

# SHOW MEM row names, in slab creation order.
MEM_ROWS: tuple[str, ...] = (
    "user_cache",
    "credentials_cache",
    "db_cache",
    "peer_cache",
    "peer_pool_cache",
    "pool_cache",
    "outstanding_request_cache",
    "server_cache",
    "client_cache",
    "iobuf_cache",
    "var_list_cache",
    "server_prepared_statement_cache",
)

MEM_ROWS_1_18: tuple[str, ...] = (
    "user_cache",
    "db_cache",
    "pool_cache",
    "server_cache",
    "client_cache",
    "iobuf_cache",
)

# SHOW STATE ("key", "value"): exactly one of them is "yes".
STATE_ROWS: tuple[str, ...] = ("active", "paused", "suspended")

# Value vocabularies.
POOL_MODES: tuple[str, ...] = ("session", "transaction", "statement")
LOAD_BALANCE_HOSTS_VALUES: tuple[str, ...] = ("disable", "round-robin")
REPLICATION_VALUES: tuple[str, ...] = ("none", "logical", "physical")
CLIENT_STATES: tuple[str, ...] = (
    "active",
    "idle",
    "waiting",
    "active_cancel_req",
    "waiting_cancel_req",
)
CLIENT_STATES_1_18: tuple[str, ...] = (
    "active",
    "waiting",
    "active_cancel_req",
    "waiting_cancel_req",
)
SERVER_STATES: tuple[str, ...] = (
    "active",
    "idle",
    "used",
    "tested",
    "new",
    "active_cancel",
    "being_canceled",
)
SOCKET_STATES: tuple[str, ...] = (
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "cl_login",
)
FDS_TASKS: tuple[str, ...] = ("pooler", "client", "server")

# ---------------------------------------------------------------------------
# SHOW HELP
# ---------------------------------------------------------------------------
# Sent as one NoticeResponse with fields S="NOTICE", C="00000",
# M="Console usage", D=HELP_DETAIL (each line is preceded by "\n\t"), then
# CommandComplete "SHOW" and ReadyForQuery. No 'V' field.
HELP_NOTICE_SEVERITY = "NOTICE"
HELP_NOTICE_SQLSTATE = "00000"
HELP_NOTICE_MESSAGE = "Console usage"

HELP_LINES: tuple[str, ...] = (
    "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
    "SHOW PEERS|PEER_POOLS",
    "SHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE",
    "SHOW DNS_HOSTS|DNS_ZONES",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
    "SET key = arg",
    "RELOAD",
    "PAUSE [<db>]",
    "RESUME [<db>]",
    "DISABLE <db>",
    "ENABLE <db>",
    "RECONNECT [<db>]",
    "KILL [<db>]",
    "KILL_CLIENT <client_id>",
    "SUSPEND",
    "SHUTDOWN",
    "SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS",
    "WAIT_CLOSE [<db>]",
)

HELP_LINES_1_18: tuple[str, ...] = (
    "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
    "SHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM",
    "SHOW DNS_HOSTS|DNS_ZONES",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
    "SET key = arg",
    "RELOAD",
    "PAUSE [<db>]",
    "RESUME [<db>]",
    "DISABLE <db>",
    "ENABLE <db>",
    "RECONNECT [<db>]",
    "KILL <db>",
    "SUSPEND",
    "SHUTDOWN",
    "WAIT_CLOSE [<db>]",
)

HELP_DETAIL = "".join("\n\t" + line for line in HELP_LINES)
HELP_DETAIL_1_18 = "".join("\n\t" + line for line in HELP_LINES_1_18)

# ---------------------------------------------------------------------------
# SHOW CONFIG rows and SET
# ---------------------------------------------------------------------------
_DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL"
    " ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)

# (key, default, changeable) in SHOW CONFIG order (non-Windows build; Linux
# values for the platform defaults tcp_defer_accept="1",
# unix_socket_dir="/tmp"). default None = NULL on the wire.
# Note: "server_check_query" defaults to the literal string "<empty>".
CONFIG_KEYS: tuple[tuple[str, str | None, bool], ...] = (
    ("admin_users", "", True),
    ("application_name_add_host", "0", True),
    ("auth_dbname", None, True),
    ("auth_file", None, True),
    ("auth_hba_file", "", True),
    ("auth_ident_file", None, True),
    ("auth_ldap_options", None, True),
    ("auth_query", _DEFAULT_AUTH_QUERY, True),
    ("auth_type", "md5", True),
    ("auth_user", None, True),
    ("autodb_idle_timeout", "3600", True),
    ("cancel_wait_timeout", "10", True),
    ("client_idle_timeout", "0", True),
    ("client_login_timeout", "60", True),
    ("client_tls13_ciphers", None, True),
    ("client_tls_ca_file", "", True),
    ("client_tls_cert_file", "", True),
    ("client_tls_ciphers", "default", True),
    ("client_tls_dheparams", "auto", True),
    ("client_tls_ecdhcurve", "auto", True),
    ("client_tls_key_file", "", True),
    ("client_tls_protocols", "secure", True),
    ("client_tls_sslmode", "disable", True),
    ("conffile", None, True),
    ("default_pool_size", "20", True),
    ("disable_pqexec", "0", False),
    ("dns_max_ttl", "15", True),
    ("dns_nxdomain_ttl", "15", True),
    ("dns_zone_check_period", "0", True),
    ("idle_transaction_timeout", "0", True),
    ("ignore_startup_parameters", "", True),
    ("job_name", "pgbouncer", False),
    ("listen_addr", "", False),
    ("listen_backlog", "128", False),
    ("listen_port", "6432", False),
    ("log_connections", "1", True),
    ("log_disconnections", "1", True),
    ("log_pooler_errors", "1", True),
    ("log_stats", "1", True),
    ("logfile", "", True),
    ("max_client_conn", "100", True),
    ("max_db_client_connections", "0", True),
    ("max_db_connections", "0", True),
    ("max_packet_size", "2147483647", True),
    ("max_prepared_statements", "200", True),
    ("max_user_client_connections", "0", True),
    ("max_user_connections", "0", True),
    ("min_pool_size", "0", True),
    ("peer_id", "0", True),
    ("pidfile", "", False),
    ("pkt_buf", "4096", False),
    ("pool_mode", "session", True),
    ("query_timeout", "0", True),
    ("query_wait_notify", "5", True),
    ("query_wait_timeout", "120", True),
    ("reserve_pool_size", "0", True),
    ("reserve_pool_timeout", "5", True),
    ("resolv_conf", "", False),
    ("sbuf_loopcnt", "5", True),
    ("scram_iterations", "4096", True),
    ("server_check_delay", "30", True),
    ("server_check_query", "<empty>", True),
    ("server_connect_timeout", "15", True),
    ("server_fast_close", "0", True),
    ("server_idle_timeout", "600", True),
    ("server_lifetime", "3600", True),
    ("server_login_retry", "15", True),
    ("server_reset_query", "DISCARD ALL", True),
    ("server_reset_query_always", "0", True),
    ("server_round_robin", "0", True),
    ("server_tls13_ciphers", None, True),
    ("server_tls_ca_file", "", True),
    ("server_tls_cert_file", "", True),
    ("server_tls_ciphers", "default", True),
    ("server_tls_key_file", "", True),
    ("server_tls_protocols", "secure", True),
    ("server_tls_sslmode", "prefer", True),
    ("so_reuseport", "0", False),
    ("stats_period", "60", True),
    ("stats_users", "", True),
    ("suspend_timeout", "10", True),
    ("syslog", "0", True),
    ("syslog_facility", "daemon", True),
    ("syslog_ident", "pgbouncer", True),
    ("tcp_defer_accept", "1", True),
    ("tcp_keepalive", "1", True),
    ("tcp_keepcnt", "0", True),
    ("tcp_keepidle", "0", True),
    ("tcp_keepintvl", "0", True),
    ("tcp_socket_buffer", "0", True),
    ("tcp_user_timeout", "0", True),
    ("track_extra_parameters", "IntervalStyle", False),
    ("transaction_timeout", "0", True),
    ("unix_socket_dir", "/tmp", False),
    ("unix_socket_group", "", False),
    ("unix_socket_mode", "0777", False),
    ("user", None, False),
    ("verbose", None, True),
)

# Same, as reported by the installed 1.18.0 (Debian build).
CONFIG_KEYS_1_18: tuple[tuple[str, str | None, bool], ...] = (
    ("admin_users", "", True),
    ("application_name_add_host", "0", True),
    ("auth_file", None, True),
    ("auth_hba_file", "", True),
    ("auth_query", _DEFAULT_AUTH_QUERY, True),
    ("auth_type", "md5", True),
    ("auth_user", None, True),
    ("autodb_idle_timeout", "3600", True),
    ("client_idle_timeout", "0", True),
    ("client_login_timeout", "60", True),
    ("client_tls_ca_file", "", True),
    ("client_tls_cert_file", "", True),
    ("client_tls_ciphers", "fast", True),
    ("client_tls_dheparams", "auto", True),
    ("client_tls_ecdhcurve", "auto", True),
    ("client_tls_key_file", "", True),
    ("client_tls_protocols", "secure", True),
    ("client_tls_sslmode", "disable", True),
    ("conffile", None, True),
    ("default_pool_size", "20", True),
    ("disable_pqexec", "0", False),
    ("dns_max_ttl", "15", True),
    ("dns_nxdomain_ttl", "15", True),
    ("dns_zone_check_period", "0", True),
    ("idle_transaction_timeout", "0", True),
    ("ignore_startup_parameters", "", True),
    ("job_name", "pgbouncer", False),
    ("listen_addr", "", False),
    ("listen_backlog", "128", False),
    ("listen_port", "6432", False),
    ("log_connections", "1", True),
    ("log_disconnections", "1", True),
    ("log_pooler_errors", "1", True),
    ("log_stats", "1", True),
    ("logfile", "", True),
    ("max_client_conn", "100", True),
    ("max_db_connections", "0", True),
    ("max_packet_size", "2147483647", True),
    ("max_user_connections", "0", True),
    ("min_pool_size", "0", True),
    ("pidfile", "", False),
    ("pkt_buf", "4096", False),
    ("pool_mode", "session", True),
    ("query_timeout", "0", True),
    ("query_wait_timeout", "120", True),
    ("reserve_pool_size", "0", True),
    ("reserve_pool_timeout", "5", True),
    ("resolv_conf", "", False),
    ("sbuf_loopcnt", "5", True),
    ("server_check_delay", "30", True),
    ("server_check_query", "select 1", True),
    ("server_connect_timeout", "15", True),
    ("server_fast_close", "0", True),
    ("server_idle_timeout", "600", True),
    ("server_lifetime", "3600", True),
    ("server_login_retry", "15", True),
    ("server_reset_query", "DISCARD ALL", True),
    ("server_reset_query_always", "0", True),
    ("server_round_robin", "0", True),
    ("server_tls_ca_file", "", True),
    ("server_tls_cert_file", "", True),
    ("server_tls_ciphers", "fast", True),
    ("server_tls_key_file", "", True),
    ("server_tls_protocols", "secure", True),
    ("server_tls_sslmode", "disable", True),
    ("so_reuseport", "0", False),
    ("stats_period", "60", True),
    ("stats_users", "", True),
    ("suspend_timeout", "10", True),
    ("syslog", "0", True),
    ("syslog_facility", "daemon", True),
    ("syslog_ident", "pgbouncer", True),
    ("tcp_defer_accept", "1", True),
    ("tcp_keepalive", "1", True),
    ("tcp_keepcnt", "0", True),
    ("tcp_keepidle", "0", True),
    ("tcp_keepintvl", "0", True),
    ("tcp_socket_buffer", "0", True),
    ("tcp_user_timeout", "0", True),
    ("unix_socket_dir", "/tmp", False),
    ("unix_socket_group", "", False),
    ("unix_socket_mode", "0777", False),
    ("user", None, False),
    ("verbose", None, True),
)

# Keys that SET (and RELOAD) really change at run time: SHOW CONFIG
# changeable = "yes". Behaviour of SET key = value on the admin console:
#   * not an admin user                  -> error "admin access needed"
#   * unknown key or invalid value       -> error "SET failed"
#   * key in this set                    -> applied, tag "SET <key>=<value>"
#   * known key NOT in this set (changeable "no") -> silently ignored but still
#     answers tag "SET <key>=<value>" (checked on 1.18: SET listen_port = 7777
#     returns "SET listen_port=7777" and SHOW CONFIG still shows the old value)
#   * a key containing "_tls_" or "_tls13_" re-applies TLS settings; on failure
#     a NOTICE "TLS settings could not be applied, still using old
#     configuration" precedes the tag.
# The value in the tag is the unquoted value ('DISCARD ALL' -> DISCARD ALL).
# Note that "conffile" counts as changeable.
# pgmulti differs in one point on purpose: a known key that is not changeable is refused
# with "SET failed" (and a detail saying why) instead of answered as if it had changed.
SETTABLE_KEYS: frozenset[str] = frozenset(
    key for key, _default, changeable in CONFIG_KEYS if changeable
)
SETTABLE_KEYS_1_18: frozenset[str] = frozenset(
    key for key, _default, changeable in CONFIG_KEYS_1_18 if changeable
)

# Session parameters the console pretends to have. "SHOW <name>" (case-
# insensitive) returns one text column named as below with this value, tag
# "SHOW". "SET <name> = ..." answers NOTICE "SET ignored" (S=NOTICE,
# C=00000) and tag "SET".
FAKE_PARAMETERS: dict[str, str] = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
}

# ParameterStatus messages sent after AuthenticationOk on the console, in
# order ("%s" = version, e.g. "1.25.2/bouncer"); then BackendKeyData and
# ReadyForQuery "I".
WELCOME_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("server_version", "%s/bouncer"),
    ("client_encoding", "UTF8"),
    ("server_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "GMT"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "on"),
)

# ---------------------------------------------------------------------------
# Command tags (CommandComplete)
# ---------------------------------------------------------------------------
# Every SHOW (including SHOW HELP, the fake parameters, and SELECT <word>,
# which is an alias of SHOW <word>) ends with "SHOW". Command words and the
# SHOW argument are case-insensitive; a trailing ";" is allowed.
# PAUSE, SUSPEND and WAIT_CLOSE answer only once the wait is over (PAUSE <db>
# and WAIT_CLOSE answer at once if nothing is active). Plain SHUTDOWN sends
# no reply at all: the process exits. SHUTDOWN WAIT_FOR_SERVERS /
# WAIT_FOR_CLIENTS answer "SHUTDOWN" at once.
# Real SET: "SET <key>=<value>"; fake-parameter SET: "SET".
COMMAND_TAGS: dict[str, str] = {
    "show": "SHOW",
    "select": "SHOW",
    "set": "SET",
    "reload": "RELOAD",
    "pause": "PAUSE",
    "suspend": "SUSPEND",
    "resume": "RESUME",
    "reconnect": "RECONNECT",
    "disable": "DISABLE",
    "enable": "ENABLE",
    "kill": "KILL",
    "kill_client": "KILL_CLIENT",
    "shutdown": "SHUTDOWN",
    "wait_close": "WAIT_CLOSE",
}

# 1.18 has no KILL_CLIENT.
COMMAND_TAGS_1_18: dict[str, str] = {
    key: tag for key, tag in COMMAND_TAGS.items() if key != "kill_client"
}

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
# Console errors are ErrorResponse with exactly the fields S, C, M (no 'V',
# no detail), severity "ERROR", SQLSTATE "08P01", followed by ReadyForQuery;
# the connection stays open. Exceptions are noted per entry. "%s" is the
# argument as typed (database name, or the whole query text for
# invalid_command).
ADMIN_ERROR_SEVERITY = "ERROR"
ADMIN_ERROR_SQLSTATE = "08P01"

# key -> (message, sqlstate, severity)
ADMIN_ERRORS: dict[str, tuple[str, str, str]] = {
    # unknown command word, unknown SHOW argument, extra argument to
    # RELOAD/SUSPEND, bad SHUTDOWN mode, unparsable query
    "invalid_command": ("invalid command '%s', use SHOW HELP;", "08P01", "ERROR"),
    # stats_users (and auth_type=any users) running a privileged command:
    # SET, SHOW FDS, RELOAD, SHUTDOWN, PAUSE, RESUME, SUSPEND, RECONNECT,
    # DISABLE, ENABLE, KILL, KILL_CLIENT, WAIT_CLOSE
    "admin_access_needed": ("admin access needed", "08P01", "ERROR"),
    # SET of an unknown key / rejected value
    "set_failed": ("SET failed", "08P01", "ERROR"),
    # command word longer than 15 chars, argument longer than 63, SET value
    # longer than 255, or empty SET key
    "bad_arguments": ("bad arguments", "08P01", "ERROR"),
    "no_such_database": ("no such database: %s", "08P01", "ERROR"),
    "database_not_paused": ("database %s is not paused", "08P01", "ERROR"),
    "not_paused": ("pooler is not paused/suspended", "08P01", "ERROR"),
    # RESUME during SHUTDOWN WAIT_FOR_* (not in 1.18)
    "shutting_down": ("pooler is shutting down", "08P01", "ERROR"),
    # PAUSE, SUSPEND, KILL while paused or suspended
    "already_paused": ("already suspended/paused", "08P01", "ERROR"),
    "suspend_with_paused_dbs": ("cannot suspend with paused databases", "08P01", "ERROR"),
    "cannot_pause_admin_db": ("cannot pause admin db: %s", "08P01", "ERROR"),
    "cannot_reconnect_admin_db": ("cannot reconnect admin db: %s", "08P01", "ERROR"),
    # DISABLE pgbouncer *and* ENABLE pgbouncer both say "disable" in 1.18
    # and 1.25.x (master later fixed ENABLE's wording to "enable").
    "cannot_disable_admin_db": ("cannot disable admin db: %s", "08P01", "ERROR"),
    "cannot_kill_admin_db": ("cannot kill admin db: %s", "08P01", "ERROR"),
    "cannot_wait_admin_db": ("cannot wait in admin db: %s", "08P01", "ERROR"),
    # DISABLE / ENABLE without a database (and KILL without one in 1.18)
    "database_required": ("a database is required", "08P01", "ERROR"),
    # KILL_CLIENT argument not an unsigned integer / no client with that id.
    # (1.25.0 and 1.25.1 ran KILL_CLIENT for stats_users too, CVE-2026-6667;
    # 1.25.2 requires an admin user.)
    "invalid_client_id": ("invalid client pointer supplied", "08P01", "ERROR"),
    "client_not_found": ("client not found", "08P01", "ERROR"),
    # RELOAD whose config load or TLS setup failed (1.25; 1.18 always
    # answers "RELOAD")
    "reload_failed": ("RELOAD failed, see logs for additional details", "F0000", "ERROR"),
    "no_mem": ("no mem", "08P01", "ERROR"),
    # Parse/Bind/Execute on the console: this ERROR + ReadyForQuery, then a
    # FATAL 08P01 "bad packet" and the connection is closed.
    "extended_protocol": (
        "extended query protocol not supported by admin console",
        "08P01",
        "ERROR",
    ),
    # any other unexpected message type ("%d" = message type byte): same
    # ERROR + ReadyForQuery + FATAL "bad packet" + close.
    "unsupported_packet": (
        "unsupported packet type for admin console: %d",
        "08P01",
        "ERROR",
    ),
    # sent after "extended_protocol" / "unsupported_packet" errors, before
    # the connection is closed.
    "bad_packet": ("bad packet", "08P01", "FATAL"),
    # login to database "pgbouncer" by a user in neither admin_users nor
    # stats_users: FATAL, no ReadyForQuery, connection closed (with
    # auth_type=trust it arrives right after the startup packet, without
    # AuthenticationOk).
    "not_allowed": ("not allowed", "08P01", "FATAL"),
}
