"""Tests for pgmulti.config and pgmulti.loader (PgBouncer 1.25 pgbouncer.ini compatibility)."""

from __future__ import annotations

import os
import textwrap

import msgspec
import pytest

from pgmulti.config import (
    DEFAULT_AUTH_QUERY,
    UNSUPPORTED_KEYS,
    Config,
    Database,
    Pgbouncer,
    User,
    split_list,
)
from pgmulti.loader import ConfigError, load_config, parse_config_text

# Every key of PgBouncer 1.25's [pgbouncer] section (bouncer_params in src/main.c).
PGBOUNCER_125_KEYS = """
admin_users application_name_add_host auth_dbname auth_file auth_hba_file auth_ident_file
auth_ldap_options auth_query auth_type auth_user autodb_idle_timeout cancel_wait_timeout
client_idle_timeout client_login_timeout client_tls13_ciphers client_tls_ca_file
client_tls_cert_file client_tls_ciphers client_tls_dheparams client_tls_ecdhcurve
client_tls_key_file client_tls_protocols client_tls_sslmode conffile default_pool_size
disable_pqexec dns_max_ttl dns_nxdomain_ttl dns_zone_check_period idle_transaction_timeout
ignore_startup_parameters job_name listen_addr listen_backlog listen_port log_connections
log_disconnections log_pooler_errors log_stats logfile max_client_conn
max_db_client_connections max_db_connections max_packet_size max_prepared_statements
max_user_client_connections max_user_connections min_pool_size peer_id pidfile pkt_buf
pool_mode query_timeout query_wait_notify query_wait_timeout reserve_pool_size
reserve_pool_timeout resolv_conf sbuf_loopcnt scram_iterations server_check_delay
server_check_query server_connect_timeout server_fast_close server_idle_timeout
server_lifetime server_login_retry server_reset_query server_reset_query_always
server_round_robin server_tls13_ciphers server_tls_ca_file server_tls_cert_file
server_tls_ciphers server_tls_key_file server_tls_protocols server_tls_sslmode service_name
so_reuseport stats_period stats_users suspend_timeout syslog syslog_facility syslog_ident
tcp_defer_accept tcp_keepalive tcp_keepcnt tcp_keepidle tcp_keepintvl tcp_socket_buffer
tcp_user_timeout track_extra_parameters transaction_timeout unix_socket_dir
unix_socket_group unix_socket_mode user verbose
""".split()

MINIMAL = "[pgbouncer]\n"


def parse(text: str, path: str = "test.ini") -> Config:
    return parse_config_text(textwrap.dedent(text), path)


def parse_error(text: str, path: str = "test.ini") -> str:
    with pytest.raises(ConfigError) as excinfo:
        parse(text, path)
    return str(excinfo.value)


def global_setting(line: str) -> Pgbouncer:
    return parse(f"[pgbouncer]\n{line}\n").pgbouncer


# --------------------------------------------------------------------------- sample files


SAMPLE_FILES = [
    "/etc/pgbouncer/pgbouncer.ini",
    "/usr/share/doc/pgbouncer/examples/pgbouncer.ini",
    "/usr/share/doc/pgbouncer/pgbouncer-minimal.ini",
]


@pytest.mark.parametrize("path", SAMPLE_FILES)
def test_installed_sample_loads_unchanged(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed")
    config = load_config(path)
    assert config.path == path
    assert config.pgbouncer.conffile == path
    assert config.warnings == ()


def test_debian_sample_values() -> None:
    path = "/etc/pgbouncer/pgbouncer.ini"
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed")
    bouncer = load_config(path).pgbouncer
    assert bouncer.listen_port == 6432
    assert bouncer.auth_type == "md5"
    assert bouncer.auth_file == "/etc/pgbouncer/userlist.txt"
    assert bouncer.unix_socket_dir == "/var/run/postgresql"


# --------------------------------------------------------------------------- a full config

REALISTIC = r'''
;;; production-like configuration
[databases]
# plain entries
app = host=db1.example.com port=5433 dbname=app_prod pool_size=40 pool_mode=transaction
reporting = host=10.0.0.1,10.0.0.2 load_balance_hosts=disable user=report password='s3cr''et pw' max_db_connections=15
local = host=/var/run/postgresql reserve_pool=3 min_pool_size=2 server_lifetime=120 connect_query='SET search_path TO app, public'
legacy.db-1 = client_encoding=UTF8 datestyle=ISO timezone=UTC application_name=legacy auth_user=authuser auth_dbname=app auth_query='SELECT usename, passwd FROM pg_shadow WHERE usename=$1'
'my db' = dbname=mydb
"quoted ""db""" = dbname=other max_db_client_connections=50
* = host=fallback.example.com

[users]
reporter = pool_mode=session pool_size=5 reserve_pool_size=1 max_user_connections=7 max_user_client_connections=70
batch = query_timeout=30 idle_transaction_timeout=60 transaction_timeout=600 client_idle_timeout=900

[peers]
1 = host=/tmp/pgbouncer-1
2 = host=10.0.0.9 port=6433 pool_size=4

[pgbouncer]
listen_addr = 127.0.0.1, ::1
listen_port = 6543
unix_socket_dir = /tmp
unix_socket_mode = 0770
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
admin_users = admin, postgres
stats_users = stats
pool_mode = session
default_pool_size = 25
max_client_conn = 1000
reserve_pool_timeout = 2.5
server_reset_query = DISCARD ALL
server_check_query = select 1
server_lifetime = 1800
server_idle_timeout = 300
query_wait_timeout = 60
log_connections = 0
log_disconnections = no
application_name_add_host = on
ignore_startup_parameters = extra_float_digits, options
max_packet_size = 0x7fffffff
tcp_keepalive = 1
tcp_keepidle = 30
client_tls_sslmode = require
dns_max_ttl = 30
'''


def test_realistic_config() -> None:
    config = parse(REALISTIC, "prod.ini")
    bouncer = config.pgbouncer

    assert bouncer.listen_addr == "127.0.0.1, ::1"
    assert split_list(bouncer.listen_addr) == ("127.0.0.1", "::1")
    assert bouncer.listen_port == 6543
    assert bouncer.unix_socket_mode == 0o770
    assert bouncer.auth_type == "scram-sha-256"
    assert split_list(bouncer.admin_users) == ("admin", "postgres")
    assert bouncer.default_pool_size == 25
    assert bouncer.max_client_conn == 1000
    assert bouncer.reserve_pool_timeout == 2.5
    assert bouncer.server_check_query == "select 1"
    assert bouncer.server_lifetime == 1800.0
    assert bouncer.log_connections is False
    assert bouncer.log_disconnections is False
    assert bouncer.log_stats is True
    assert bouncer.application_name_add_host is True
    assert bouncer.max_packet_size == 2147483647
    assert bouncer.tcp_keepidle == 30
    assert bouncer.client_tls_sslmode == "require"
    assert bouncer.conffile == "prod.ini"

    app = config.databases["app"]
    assert (app.host, app.port, app.dbname, app.pool_size) == ("db1.example.com", 5433, "app_prod", 40)
    assert app.pool_mode == "transaction"
    assert app.server_dbname == "app_prod"

    reporting = config.databases["reporting"]
    assert reporting.hosts == ("10.0.0.1", "10.0.0.2")
    assert reporting.load_balance_hosts == "disable"
    assert (reporting.user, reporting.password) == ("report", "s3cr'et pw")
    assert reporting.max_db_connections == 15

    local = config.databases["local"]
    assert local.host == "/var/run/postgresql"
    assert local.reserve_pool_size == 3  # "reserve_pool" is an alias
    assert local.min_pool_size == 2
    assert local.server_lifetime == 120.0
    assert local.connect_query == "SET search_path TO app, public"
    assert local.server_dbname == "local"

    legacy = config.databases["legacy.db-1"]
    assert (legacy.client_encoding, legacy.datestyle, legacy.timezone) == ("UTF8", "ISO", "UTC")
    assert legacy.application_name == "legacy"
    assert (legacy.auth_user, legacy.auth_dbname) == ("authuser", "app")
    assert legacy.auth_query == "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"

    assert config.databases["my db"].dbname == "mydb"
    assert config.databases['quoted "db"'].max_db_client_connections == 50
    assert config.databases["*"].host == "fallback.example.com"

    reporter = config.users["reporter"]
    assert reporter == User(
        name="reporter",
        pool_mode="session",
        pool_size=5,
        reserve_pool_size=1,
        max_user_connections=7,
        max_user_client_connections=70,
    )
    batch = config.users["batch"]
    assert (batch.query_timeout, batch.idle_transaction_timeout) == (30.0, 60.0)
    assert (batch.transaction_timeout, batch.client_idle_timeout) == (600.0, 900.0)

    assert config.peers[1].host == "/tmp/pgbouncer-1"
    assert config.peers[1].port == 6432
    assert (config.peers[2].port, config.peers[2].pool_size) == (6433, 4)

    assert bouncer.dns_max_ttl == 30.0
    assert config.unsupported == ("[peers]",)
    assert config.warnings == ()


def test_sections_may_come_in_any_order_and_be_empty() -> None:
    config = parse("[users]\n[pgbouncer]\n[databases]\n[peers]\n")
    assert config.databases == {} and config.users == {} and config.peers == {}


# --------------------------------------------------------------------------- defaults


PGMULTI_ONLY_KEYS = {"log_format", "workers", "metrics_port", "metrics_addr"}  # pgmulti's own


def test_every_pgbouncer_125_key_is_a_field() -> None:
    fields = {field.name for field in msgspec.structs.fields(Pgbouncer)}
    assert fields == set(PGBOUNCER_125_KEYS) | PGMULTI_ONLY_KEYS


def test_every_key_is_accepted_by_the_loader() -> None:
    # Write every setting with its own default value and read it back unchanged.
    defaults = Pgbouncer()
    lines = ["[pgbouncer]"]
    for field in msgspec.structs.fields(Pgbouncer):
        value = getattr(defaults, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        lines.append(f"{field.name} = {value}")
    config = parse_config_text("\n".join(lines) + "\n", "all.ini")
    assert msgspec.structs.replace(config.pgbouncer, conffile=None) == defaults


def test_defaults_match_pgbouncer_125_documentation() -> None:
    bouncer = parse(MINIMAL).pgbouncer
    assert bouncer.listen_addr == ""
    assert bouncer.listen_port == 6432
    assert bouncer.unix_socket_dir == "/tmp"
    assert bouncer.unix_socket_mode == 0o777
    assert bouncer.pool_mode == "session"
    assert bouncer.max_client_conn == 100
    assert bouncer.default_pool_size == 20
    assert bouncer.min_pool_size == 0
    assert bouncer.reserve_pool_size == 0
    assert bouncer.reserve_pool_timeout == 5.0
    assert bouncer.max_prepared_statements == 200
    assert bouncer.auth_type == "md5"
    assert bouncer.auth_query == DEFAULT_AUTH_QUERY
    assert bouncer.auth_query.startswith("SELECT rolname, CASE WHEN rolvaliduntil < now()")
    assert bouncer.stats_period == 60
    assert bouncer.log_connections is True
    assert bouncer.verbose == 0
    assert bouncer.server_reset_query == "DISCARD ALL"
    assert bouncer.server_reset_query_always is False
    assert bouncer.server_check_delay == 30.0
    assert bouncer.server_check_query == "<empty>"
    assert bouncer.server_lifetime == 3600.0
    assert bouncer.server_idle_timeout == 600.0
    assert bouncer.server_connect_timeout == 15.0
    assert bouncer.server_login_retry == 15.0
    assert bouncer.client_login_timeout == 60.0
    assert bouncer.autodb_idle_timeout == 3600.0
    assert bouncer.query_timeout == 0.0
    assert bouncer.query_wait_timeout == 120.0
    assert bouncer.cancel_wait_timeout == 10.0
    assert bouncer.suspend_timeout == 10.0
    assert bouncer.pkt_buf == 4096
    assert bouncer.max_packet_size == 2147483647
    assert bouncer.listen_backlog == 128
    assert bouncer.sbuf_loopcnt == 5
    assert bouncer.tcp_keepalive is True
    assert bouncer.client_tls_sslmode == "disable"
    assert bouncer.server_tls_sslmode == "prefer"
    assert bouncer.scram_iterations == 4096
    assert bouncer.track_extra_parameters == "IntervalStyle"


def test_database_and_user_defaults_are_unset() -> None:
    db = parse("[databases]\nfoodb =\n[pgbouncer]\n").databases["foodb"]
    assert db == Database(name="foodb")
    assert db.port == 5432
    assert db.pool_size is None and db.pool_mode is None and db.host is None
    assert db.load_balance_hosts == "round-robin"


# --------------------------------------------------------------------------- value syntax


@pytest.mark.parametrize(
    ("line", "attr", "expected"),
    [
        ("max_client_conn = 0x10", "max_client_conn", 16),
        ("max_client_conn = 010", "max_client_conn", 8),  # strtol base 0: octal
        ("max_client_conn = +7", "max_client_conn", 7),
        ("unix_socket_mode = 0700", "unix_socket_mode", 0o700),
        ("server_lifetime = 0.5", "server_lifetime", 0.5),
        ("server_lifetime = 1e3", "server_lifetime", 1000.0),
        ("server_lifetime = 10", "server_lifetime", 10.0),
        ("log_stats = 0", "log_stats", False),
        ("log_stats = 2", "log_stats", True),
        ("log_stats = off", "log_stats", False),
        ("log_stats = No", "log_stats", False),
        ("so_reuseport = yes", "so_reuseport", True),
        ("so_reuseport = TRUE", "so_reuseport", True),
        ("pool_mode = Transaction", "pool_mode", "transaction"),
        ("auth_type = SCRAM-SHA-256", "auth_type", "scram-sha-256"),
        ("server_tls_sslmode = verify-full", "server_tls_sslmode", "verify-full"),
        ("server_check_query =", "server_check_query", ""),
        ("server_reset_query = 'DISCARD ALL'", "server_reset_query", "'DISCARD ALL'"),
        ("admin_users = a ; b # c", "admin_users", "a ; b # c"),
        ("logfile =   /var/log/pgbouncer.log   ", "logfile", "/var/log/pgbouncer.log"),
        ("stats_users=a,b", "stats_users", "a,b"),
    ],
)
def test_value_syntax(line: str, attr: str, expected: object) -> None:
    assert getattr(global_setting(line), attr) == expected


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("max_client_conn = 08", "invalid integer '08'"),
        ("max_client_conn = 10 ; comment", "invalid integer"),
        ("max_client_conn = ten", "invalid integer"),
        ("max_client_conn = 1.5", "invalid integer"),
        ("max_client_conn =", "invalid integer ''"),
        ("max_client_conn = 99999999999", "out of range"),
        ("max_packet_size = -1", "out of range"),
        ("server_lifetime = -1", "must not be negative"),
        ("server_lifetime = soon", "invalid time"),
        ("server_lifetime = inf", "invalid time"),
        ("log_stats = maybe", "invalid boolean"),
        ("pool_mode = sessions", "expected one of: session, transaction, statement"),
        ("auth_type = peer", "invalid value 'peer'"),
        ("client_tls_sslmode = on", "invalid value 'on'"),
        ("auth_dbname = pgbouncer", "reserved database"),
    ],
)
def test_bad_value_reports_file_line_and_key(line: str, problem: str) -> None:
    message = parse_error(f"[databases]\n\n[pgbouncer]\n{line}\n", "bad.ini")
    key = line.split("=")[0].strip()
    assert message.startswith(f"bad.ini:4: {key}: ")
    assert problem in message


def test_unknown_parameter_is_an_error() -> None:
    assert parse_error("[pgbouncer]\nlisten_port = 1\nlisten_prot = 2\n") == (
        "test.ini:3: listen_prot: unknown parameter"
    )


def test_keys_and_sections_are_case_sensitive() -> None:
    assert "Listen_Port: unknown parameter" in parse_error("[pgbouncer]\nListen_Port = 1\n")
    assert "unknown section [PgBouncer]" in parse_error("[PgBouncer]\n")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[pgbouncer]\n[other]\n", "test.ini:2: unknown section [other]"),
        ("[pgbouncer\n", "test.ini:1: syntax error: missing ']'"),
        ("listen_port = 1\n[pgbouncer]\n", "test.ini:1: listen_port: setting outside of any section"),
        ("[pgbouncer]\nlisten port = 1\n", "test.ini:2: syntax error"),
        ("[pgbouncer]\njust some words\n", "test.ini:2: syntax error"),
        ("[pgbouncer]\n= 1\n", "test.ini:2: syntax error: missing name"),
        ("[databases]\n'unterminated = x\n[pgbouncer]\n", "test.ini:2: syntax error"),
        ("[databases]\n\"unterminated = x\n[pgbouncer]\n", "test.ini:2: syntax error"),
        ("[databases]\nfoo = host=x\n", "test.ini: missing [pgbouncer] section"),
        ("[pgbouncer]\n%include\n", "test.ini:2: syntax error"),
    ],
)
def test_syntax_errors(text: str, problem: str) -> None:
    assert problem in parse_error(text)


def test_comments_blank_lines_and_whitespace() -> None:
    config = parse(
        "  ; comment\n"
        "\t# another comment\n"
        "\r\n"
        "[pgbouncer] ; trailing comment after a header\n"
        "   listen_port\t=\t7000\r\n"
        "[databases]\n"
        "  foo=host=x\n"
    )
    assert config.pgbouncer.listen_port == 7000
    assert config.databases["foo"].host == "x"


def test_text_after_section_header_is_read_like_pgbouncer() -> None:
    assert parse("[pgbouncer] listen_port = 7000\n").pgbouncer.listen_port == 7000


def test_service_name_and_job_name_are_aliases() -> None:
    assert global_setting("service_name = svc").job_name == "svc"
    bouncer = global_setting("job_name = job")
    assert (bouncer.service_name, bouncer.job_name) == ("job", "job")


def test_conffile_can_be_set_explicitly() -> None:
    assert global_setting("conffile = /etc/other.ini").conffile == "/etc/other.ini"


def test_repeated_pgbouncer_section_resets_settings_like_pgbouncer() -> None:
    config = parse(
        """\
        [pgbouncer]
        listen_port = 7000
        auth_file = /etc/users.txt
        [databases]
        [pgbouncer]
        max_client_conn = 5
        """
    )
    assert config.pgbouncer.listen_port == 6432  # reset to its default
    assert config.pgbouncer.auth_file == "/etc/users.txt"  # NULL default: kept
    assert config.pgbouncer.max_client_conn == 5
    assert config.warnings == (
        "test.ini:5: repeated [pgbouncer] section resets earlier settings to their defaults "
        "(as PgBouncer does): listen_port",
    )


def test_last_value_wins_and_duplicate_database_warns() -> None:
    config = parse(
        """\
        [databases]
        foo = host=a
        foo = host=b
        [pgbouncer]
        listen_port = 1
        listen_port = 2
        """
    )
    assert config.databases["foo"].host == "b"
    assert config.pgbouncer.listen_port == 2
    assert config.warnings == (
        "test.ini:3: foo: database already defined at test.ini:2; this definition replaces it",
    )


def test_invalid_utf8_is_reported_with_line(tmp_path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[pgbouncer]\nadmin_users = j\xf6rg\n")
    with pytest.raises(ConfigError, match=r"latin1.ini:2: not valid UTF-8"):
        load_config(str(path))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read '/nonexistent/pgbouncer.ini'"):
        load_config("/nonexistent/pgbouncer.ini")


# --------------------------------------------------------------------------- %include


def test_include_is_relative_to_working_directory(tmp_path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "main.ini").write_text(
        "[pgbouncer]\nlisten_port = 7000\n%include conf/extra.ini\nmax_client_conn = 50\n"
    )
    # The included file continues the current section and can switch sections;
    # the switch carries on in the including file, as in PgBouncer.
    (conf / "extra.ini").write_text(
        "default_pool_size = 3\n[databases]\nincluded = host=inc\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(conf / "main.ini"))
    # max_client_conn now lands in [databases] and is read as a database entry.
    assert "main.ini:4: max_client_conn: syntax error in connection string" in str(excinfo.value)

    (conf / "main.ini").write_text(
        "[pgbouncer]\nlisten_port = 7000\n%include   conf/extra.ini  \n"
    )
    config = load_config("conf/main.ini")
    assert config.pgbouncer.listen_port == 7000
    assert config.pgbouncer.default_pool_size == 3
    assert config.databases["included"].host == "inc"
    assert config.path == "conf/main.ini"


def test_include_errors_name_the_included_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inc.ini").write_text("\n\nlisten_port = nope\n")
    (tmp_path / "main.ini").write_text("[pgbouncer]\n%include inc.ini\n")
    with pytest.raises(ConfigError, match=r"^inc.ini:3: listen_port: invalid integer 'nope'$"):
        load_config("main.ini")


def test_missing_include(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.ini").write_text("[pgbouncer]\n%include missing.ini\n")
    with pytest.raises(ConfigError, match=r"^main.ini:2: %include: cannot read 'missing.ini'"):
        load_config("main.ini")


def test_recursive_include_is_stopped(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop.ini").write_text("[pgbouncer]\n%include loop.ini\n")
    with pytest.raises(ConfigError, match="nesting deeper than 10 levels"):
        load_config("loop.ini")


# --------------------------------------------------------------------------- connection strings


@pytest.mark.parametrize(
    ("connstr", "field", "expected"),
    [
        ("password='it''s'", "password", "it's"),
        ("password='with spaces and = signs'", "password", "with spaces and = signs"),
        (r"password='back\slash'", "password", "back\\slash"),  # no backslash escapes
        (r"password=back\\slash", "password", "back\\\\slash"),
        ("password=''''", "password", "'"),
        ("  host = x   port = 6000  ", "port", 6000),
        ("host=x host=y", "host", "y"),
        ("connect_query='SELECT 1' user=u", "user", "u"),
        ("pool_mode=STATEMENT", "pool_mode", "statement"),
        ("load_balance_hosts=Round-Robin", "load_balance_hosts", "round-robin"),
        ("server_lifetime=1.5", "server_lifetime", 1.5),
        ("pool_size=-1", "pool_size", -1),
        ("reserve_pool_size=1 reserve_pool=2", "reserve_pool_size", 2),
        ("reserve_pool=2 reserve_pool_size=1", "reserve_pool_size", 1),
        ("host=@abstract", "host", "@abstract"),
    ],
)
def test_connection_string_values(connstr: str, field: str, expected: object) -> None:
    db = parse(f"[databases]\nfoo = {connstr}\n[pgbouncer]\n").databases["foo"]
    assert getattr(db, field) == expected


@pytest.mark.parametrize(
    ("connstr", "problem"),
    [
        ("hostname=x", "unknown connection parameter 'hostname'"),
        ("name=x", "unknown connection parameter 'name'"),
        ("host", "expected '=' after 'host'"),
        ("=x", "missing name before '='"),
        ("host=", "empty value for 'host'"),
        ("host=''", "empty value for 'host'"),
        ("password='open", "unterminated quote"),
        ("password='a'b", "expected a space after"),
        ("port=abc", "port: invalid integer 'abc'"),
        ("reserve_pool=x", "reserve_pool: invalid integer 'x'"),
        ("port=0x10", "port: invalid integer '0x10'"),  # decimal only, as atoi
        ("port=0", "invalid port 0"),
        ("pool_mode=fast", "pool_mode: invalid value 'fast'"),
        ("load_balance_hosts=random", "load_balance_hosts: invalid value 'random'"),
        ("server_lifetime=-5", "must not be negative"),
    ],
)
def test_bad_connection_string(connstr: str, problem: str) -> None:
    message = parse_error(f"[pgbouncer]\n[databases]\nfoo = {connstr}\n")
    assert message.startswith("test.ini:3: foo: ")
    assert problem in message


def test_reserved_database_name() -> None:
    assert "test.ini:2: pgbouncer: database name 'pgbouncer' is reserved" in parse_error(
        "[databases]\npgbouncer = host=x\n[pgbouncer]\n"
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("bob = pool_mode=none", "test.ini:2: bob: pool_mode: invalid value 'none'"),
        ("bob = dbname=x", "test.ini:2: bob: unknown user parameter 'dbname'"),
        ("bob = query_timeout=abc", "test.ini:2: bob: query_timeout: invalid time"),
    ],
)
def test_bad_user_entry(entry: str, problem: str) -> None:
    assert problem in parse_error(f"[users]\n{entry}\n[pgbouncer]\n")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("0 = host=x", "peer id must be a number from 1 to 65535"),
        ("abc = host=x", "peer id must be a number"),
        ("1 = port=5000", "host is required"),
        ("1 = host=x dbname=y", "unknown peer parameter 'dbname'"),
    ],
)
def test_bad_peer_entry(entry: str, problem: str) -> None:
    assert problem in parse_error(f"[peers]\n{entry}\n[pgbouncer]\n")


# --------------------------------------------------------------------------- lookups and precedence


def test_star_fallback() -> None:
    config = parse(
        """\
        [databases]
        exact = host=exact-host
        * = host=fallback port=6000 pool_size=7
        [pgbouncer]
        """
    )
    assert config.database_for("exact").host == "exact-host"
    auto = config.database_for("anything")
    assert auto.name == "anything"
    assert auto.dbname == "anything"
    assert auto.server_dbname == "anything"
    assert (auto.host, auto.port, auto.pool_size) == ("fallback", 6000, 7)
    assert "anything" not in config.databases  # lookups do not modify the config


def test_star_fallback_keeps_explicit_dbname() -> None:
    config = parse("[databases]\n* = host=h dbname=shared\n[pgbouncer]\n")
    assert config.database_for("x").dbname == "shared"


def test_no_fallback() -> None:
    assert parse("[databases]\nexact = host=h\n[pgbouncer]\n").database_for("other") is None


PRECEDENCE = """\
[databases]
txdb = pool_mode=transaction pool_size=30 reserve_pool=4 min_pool_size=3 max_db_connections=9 server_lifetime=60
plaindb = host=x max_db_connections=0
[users]
stmtuser = pool_mode=statement pool_size=2 max_user_connections=4 query_timeout=5
plainuser = max_user_connections=0 query_timeout=0
[pgbouncer]
pool_mode = session
default_pool_size = 20
reserve_pool_size = 1
min_pool_size = 1
max_db_connections = 50
max_user_connections = 60
query_timeout = 100
"""


def test_pool_mode_precedence_user_over_database_over_global() -> None:
    config = parse(PRECEDENCE)
    txdb, plaindb = config.databases["txdb"], config.databases["plaindb"]
    stmtuser, plainuser = config.users["stmtuser"], config.users["plainuser"]
    assert config.effective_pool_mode(txdb, stmtuser) == "statement"
    assert config.effective_pool_mode(txdb, plainuser) == "transaction"
    assert config.effective_pool_mode(txdb, None) == "transaction"
    assert config.effective_pool_mode(plaindb, plainuser) == "session"
    assert config.effective_pool_mode(None, None) == "session"


def test_limits_precedence() -> None:
    config = parse(PRECEDENCE)
    txdb, plaindb = config.databases["txdb"], config.databases["plaindb"]
    stmtuser, plainuser = config.users["stmtuser"], config.users["plainuser"]

    assert config.effective_pool_size(txdb, stmtuser) == 2
    assert config.effective_pool_size(txdb, plainuser) == 30
    assert config.effective_pool_size(plaindb, plainuser) == 20
    assert config.effective_reserve_pool_size(txdb, plainuser) == 4
    assert config.effective_reserve_pool_size(plaindb, None) == 1
    assert config.effective_min_pool_size(txdb, stmtuser) == 3
    assert config.effective_min_pool_size(plaindb) == 1
    assert config.effective_server_lifetime(txdb) == 60.0
    assert config.effective_server_lifetime(plaindb) == 3600.0

    # A per-entry connection limit of 0 means "use the global one", as in PgBouncer.
    assert config.effective_max_db_connections(txdb, None) == 9
    assert config.effective_max_db_connections(plaindb, None) == 50
    assert config.effective_max_user_connections(None, stmtuser) == 4
    assert config.effective_max_user_connections(None, plainuser) == 60
    assert config.effective_max_db_client_connections(txdb) == 0
    assert config.effective_max_user_client_connections(None, stmtuser) == 0

    assert config.effective_query_timeout(None, stmtuser) == 5.0
    assert config.effective_query_timeout(None, plainuser) == 100.0
    assert config.effective_idle_transaction_timeout(None, stmtuser) == 0.0
    assert config.effective_transaction_timeout(None, None) == 0.0
    assert config.effective_client_idle_timeout(None, None) == 0.0


def test_star_fallback_pool_mode_applies_to_auto_databases() -> None:
    config = parse("[databases]\n* = host=h pool_mode=transaction\n[pgbouncer]\n")
    assert config.effective_pool_mode(config.database_for("x"), None) == "transaction"


# --------------------------------------------------------------------------- secrets and misc


def test_passwords_are_not_in_repr() -> None:
    config = parse(
        """\
        [databases]
        foo = host=x user=u password=TopSecret42
        bar = host=y
        [pgbouncer]
        auth_type = ldap
        auth_ldap_options = ldapurl="ldap://h/dc=x?uid?sub" ldapbindpasswd=LdapSecret7
        """
    )
    foo = config.databases["foo"]
    assert foo.password == "TopSecret42"
    for text in (repr(config), repr(foo), repr(config.databases), str(foo)):
        assert "TopSecret42" not in text
        assert "LdapSecret7" not in text
    assert "password='***'" in repr(foo)
    assert "password=None" in repr(config.databases["bar"])
    assert "TopSecret42" not in repr(list(foo.__rich_repr__()))
    assert "user='u'" in repr(foo)


def test_structs_are_frozen_and_strict() -> None:
    config = parse(MINIMAL)
    with pytest.raises(AttributeError):
        config.pgbouncer.listen_port = 1  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "x", "bogus": 1}, Database)


def test_unsupported_lists_only_keys_the_file_sets() -> None:
    assert parse(MINIMAL).unsupported == ()
    config = parse(
        "[pgbouncer]\nsyslog = 1\nsuspend_timeout = 5\nserver_tls_sslmode = disable\n"
        "listen_port = 1\n"
    )
    assert config.unsupported == ("suspend_timeout",)  # syslog is supported
    assert UNSUPPORTED_KEYS <= set(PGBOUNCER_125_KEYS)


def test_split_list() -> None:
    assert split_list("") == ()
    assert split_list(" a , b,,c ") == ("a", "b", "c")
