"""Error paths of the client protocol, each with its SQLSTATE, over raw sockets and real clients."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from pgmulti.cluster import clean_env
from support import Raw, error_fields, message, parse_messages, startup_packet

CONNECT_TIMEOUT = 10
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def assert_fatal_protocol_violation(data: bytes, text: str | None = None) -> dict[str, str]:
    """The bytes a client got before the close: exactly one FATAL 08P01 ErrorResponse."""
    messages = parse_messages(data)
    assert [t for t, _ in messages] == [b"E"], data
    fields = error_fields(messages[0][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
    if text is not None:
        assert text in fields["M"], fields
    return fields


def closed_or_protocol_violation(data: bytes) -> None:
    """A malformed startup packet: the proxy may close at once or send 08P01 first."""
    if data:
        assert_fatal_protocol_violation(data)


def healthy_query(proc, sql: str = "SELECT 42") -> object:
    with psycopg.connect(proc.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


@pytest.fixture
def proxy(pgmulti):
    return pgmulti()


# --- errors before login ---


def test_unknown_database(proxy):
    async def attempt():
        try:
            await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres",
                                  database="no_such_db", ssl=False, timeout=CONNECT_TIMEOUT)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        return None

    assert asyncio.run(attempt()) == ("3D000", "no such database: no_such_db")
    with pytest.raises(psycopg.OperationalError, match="no such database: no_such_db"):
        psycopg.connect(proxy.dsn(db="no_such_db"), connect_timeout=CONNECT_TIMEOUT)
    with Raw(proxy) as raw:
        raw.send(startup_packet({"user": "postgres", "database": "no_such_db"}))
        messages = parse_messages(raw.read_until_closed())
    assert len(messages) == 1 and messages[0][0] == b"E"
    fields = error_fields(messages[0][1])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "3D000", "no such database: no_such_db")


MALFORMED_STARTUPS = {
    # Length field below the 8-byte minimum.
    "length 0": struct.pack("!I", 0) + b"\0" * 4,
    "length 4": struct.pack("!I", 4) + b"\0" * 4,
    "length 7": struct.pack("!I", 7) + b"\0" * 4,
    # Length field above PostgreSQL's 10000-byte startup packet limit.
    "length 10001": struct.pack("!II", 10001, 3 << 16) + b"user\0postgres\0" + b"x" * 200,
    "length 20000": struct.pack("!II", 20000, 3 << 16) + b"user\0postgres\0",
    "length 2^31-1": struct.pack("!II", 0x7FFFFFFF, 3 << 16),
    "length 2^32-1": struct.pack("!II", 0xFFFFFFFF, 3 << 16),
    # A complete, well-formed packet that is simply too long.
    "complete 10 kB packet": startup_packet({"user": "postgres", "database": "testdb",
                                             "application_name": "a" * 10_000}),
    # Parameters that are not name/value C strings ending with an empty name.
    "no terminator": struct.pack("!II", 13, 3 << 16) + b"user\0",
    "odd strings": struct.pack("!II", 18, 3 << 16) + b"user\0postgres\0\0\0",
    "invalid UTF-8": struct.pack("!II", 12, 3 << 16) + b"\xff\xfe\0\0",
    # CancelRequest with a body that is not exactly pid + key.
    "short cancel": struct.pack("!II", 8, CANCEL_REQUEST_CODE),
    "long cancel": struct.pack("!II", 20, CANCEL_REQUEST_CODE) + b"\0" * 12,
}


def test_malformed_startup_packets(proxy):
    for name, packet in MALFORMED_STARTUPS.items():
        with Raw(proxy) as raw:
            raw.send(packet)
            try:
                closed_or_protocol_violation(raw.read_until_closed())
            except (AssertionError, TimeoutError) as exc:
                raise AssertionError(f"{name}: {exc}") from None
    # A packet just under the limit is fine (PostgreSQL truncates application_name).
    packet = startup_packet({"user": "postgres", "database": "testdb",
                             "application_name": "a" * 9_900})
    assert 9_900 < len(packet) <= 10_000
    with Raw(proxy) as raw:
        raw.send(packet)
        assert raw.read_until(b"Z")[-1][0] == b"Z"
    assert healthy_query(proxy) == 42
    assert "Traceback" not in proxy.log_text()


def test_unknown_protocol_version(proxy):
    for version in [(2, 0), (1, 0), (4, 0), (9999, 1)]:
        with Raw(proxy) as raw:
            raw.send(startup_packet({"user": "postgres", "database": "testdb"}, version))
            fields = assert_fatal_protocol_violation(raw.read_until_closed(), "protocol")
            assert f"{version[0]}.{version[1]}" in fields["M"], fields


# --- errors after login ---


def test_bad_message_length_after_login(proxy):
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT) as other:
        other.execute("SELECT 1")  # in a transaction while the bad client misbehaves
        with Raw(proxy) as raw:
            raw.login()
            raw.send(b"Q" + struct.pack("!I", 2))
            assert_fatal_protocol_violation(raw.read_until_closed(), "invalid message length")
        assert other.execute("SELECT 2").fetchone() == (2,)
        other.commit()
    assert healthy_query(proxy) == 42


def test_bad_message_length_mid_transaction_frees_the_server(pgmulti):
    """The misbehaving client's server is not handed over half-way through its transaction."""
    proc = pgmulti({"default_pool_size": 1})
    with Raw(proc) as raw:
        raw.login()
        assert raw.simple_query("BEGIN; CREATE TEMP TABLE t (x int)")[-1][0] == b"Z"
        raw.send(b"Q" + struct.pack("!I", 3))
        assert_fatal_protocol_violation(raw.read_until_closed(), "invalid message length")
    # The only server slot is usable again, with no transaction left open on it.
    assert healthy_query(proc, "SELECT to_regclass('pg_temp.t') IS NULL") is True
    assert healthy_query(proc, "SELECT now() = statement_timestamp()") is True


def test_unknown_frontend_message_type(proxy):
    # 'p' (password) and 'A' are valid types in other contexts, not in a logged-in session.
    for msg_type in [b"z", b"\x00", b"p", b"A", b"\xff"]:
        with Raw(proxy) as raw:
            raw.login()
            raw.send(message(msg_type, b"junk"))
            assert_fatal_protocol_violation(raw.read_until_closed())
    assert healthy_query(proxy) == 42


def test_unsupported_startup_parameter(proxy):
    with Raw(proxy) as raw:
        raw.send(startup_packet({"user": "postgres", "database": "testdb", "foo": "bar"}))
        assert_fatal_protocol_violation(raw.read_until_closed(), "foo")


def test_ignored_startup_parameter_is_accepted(pgmulti):
    proc = pgmulti({"ignore_startup_parameters": "extra_float_digits, foo"})
    with Raw(proc) as raw:
        raw.login(foo="bar", extra_float_digits="3")
        rows = raw.simple_query("SELECT current_setting('extra_float_digits')")
        assert [t for t, _ in rows][-1] == b"Z"
        assert b"E" not in [t for t, _ in rows]
    with Raw(proc) as raw:  # a parameter not in the list is still refused
        raw.send(startup_packet({"user": "postgres", "database": "testdb", "bar": "x"}))
        assert_fatal_protocol_violation(raw.read_until_closed(), "bar")


# --- encryption requests ---


def test_ssl_and_gssenc_requests_are_answered_n(proxy):
    for requests in ([SSL_REQUEST_CODE], [GSSENC_REQUEST_CODE],
                     [GSSENC_REQUEST_CODE, SSL_REQUEST_CODE]):
        with Raw(proxy) as raw:
            for code in requests:
                raw.send(struct.pack("!II", 8, code))
                assert raw.read_byte() == b"N"
            raw.login()
            assert raw.simple_query("SELECT 1")[-1][0] == b"Z"


def psql_conninfo(proc, conninfo: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [proc.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-c", "SELECT 1",
         f"host={proc.host} port={proc.port} user=postgres dbname=testdb {conninfo}"],
        env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=30, check=False)


def test_libpq_encryption_modes(proxy):
    result = psql_conninfo(proxy, "sslmode=prefer")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    result = psql_conninfo(proxy, "sslmode=require")
    assert result.returncode == 2
    assert "server does not support SSL" in result.stderr
    with psycopg.connect(proxy.dsn(db="testdb") + "?gssencmode=prefer&sslmode=prefer",
                         connect_timeout=CONNECT_TIMEOUT) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert healthy_query(proxy) == 42
    assert "Traceback" not in proxy.log_text()


# --- client_login_timeout ---


def wait_closed(raw: Raw, started: float, results: dict, name: str) -> None:
    try:
        results[name] = (raw.read_until_closed(timeout=6), time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        results[name] = (exc, time.monotonic() - started)


def test_client_login_timeout(pgmulti):
    # Without tcp_defer_accept: with it the kernel would not hand over the silent client.
    proc = pgmulti({"client_login_timeout": 1, "auth_type": "md5", "tcp_defer_accept": 0})
    dsn = proc.dsn(user="md5user", db="testdb", password="md5pass")
    with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as logged_in, \
            Raw(proc) as at_prompt, Raw(proc) as silent:
        started = time.monotonic()
        # Sends the startup packet, gets the md5 password request, never answers.
        at_prompt.send(startup_packet({"user": "md5user", "database": "testdb"}))
        msg_type, body = at_prompt.read_message()
        assert (msg_type, body[:4]) == (b"R", struct.pack("!I", 5))
        # `silent` never sends anything at all.
        results: dict = {}
        watchers = [threading.Thread(target=wait_closed, args=(raw, started, results, name))
                    for raw, name in ((at_prompt, "at_prompt"), (silent, "silent"))]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            watcher.join(8)
        for name in ("at_prompt", "silent"):
            data, elapsed = results[name]
            assert isinstance(data, bytes), f"{name}: {data}"
            assert 0.9 <= elapsed <= 4.0, f"{name} closed after {elapsed:.2f} s"
            for msg_type, body in parse_messages(data):
                assert msg_type == b"E" and error_fields(body)["S"] == "FATAL", (name, data)
        # A logged-in client is not subject to the login timeout.
        assert time.monotonic() - started > 1
        assert logged_in.execute("SELECT 1").fetchone() == (1,)
    result = proc.psql("SELECT 1", user="md5user", db="testdb", password="md5pass")
    assert result.stdout.strip() == "1", result.stderr


# --- cancel requests ---


def test_cancel_request_with_unknown_key_is_ignored(proxy):
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        info = conn.pgconn.backend_pid
        result: list = []
        worker = threading.Thread(
            target=lambda: result.append(conn.execute("SELECT pg_sleep(0.6), 7").fetchone()[1]))
        worker.start()
        time.sleep(0.2)
        # The right pid with a wrong key, and a made-up pair.
        for pid in (info, 12345):
            with Raw(proxy) as raw:
                raw.send(struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, 0xDEADBEEF))
                assert raw.read_until_closed() == b""
        worker.join(5)
        assert not worker.is_alive()
        assert result == [7]  # not canceled


def test_cancel_request_with_the_right_key_cancels(proxy):
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT,
                         autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(5)")
        timer.join()
        assert time.monotonic() - started < 4
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- misbehaving clients do not disturb others ---


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xaa" * 64,  # a TLS ClientHello
    b"\xff" * 64,
    b"\0" * 64,
] + list(MALFORMED_STARTUPS.values())


def test_garbage_does_not_affect_a_concurrent_client(proxy):
    with psycopg.connect(proxy.dsn(db="testdb"), connect_timeout=CONNECT_TIMEOUT) as healthy:
        healthy.execute("CREATE TEMP TABLE t (x int)")
        for junk in GARBAGE:
            with Raw(proxy) as raw:
                raw.send(junk)
                closed_or_protocol_violation(raw.read_until_closed())
            healthy.execute("INSERT INTO t VALUES (1)")
        # Garbage after a successful login, too.
        with Raw(proxy) as raw:
            raw.login()
            raw.send(b"\xff" * 64)
            assert_fatal_protocol_violation(raw.read_until_closed())
        # Clients that vanish in the middle of a message.
        with Raw(proxy) as raw:
            raw.login()
            raw.send(b"Q" + struct.pack("!I", 100) + b"SELECT")
        with Raw(proxy) as raw:
            raw.send(startup_packet({"user": "postgres"})[:6])
        assert healthy.execute("SELECT count(*) FROM t").fetchone() == (len(GARBAGE),)
        healthy.commit()
    assert healthy_query(proxy) == 42
    assert "Traceback" not in proxy.log_text()


# --- protocol negotiation ---


def test_negotiate_protocol_version(proxy):
    """Newer minor versions and _pq_ options are answered with the newest version pgmulti
    speaks (3.2) or the one asked for if older; 3.2 itself needs no negotiation."""
    cases = [
        ({}, (3, 9999), []),
        ({"_pq_.foo": "1", "_pq_.bar": "x"}, (3, 0), [b"_pq_.bar", b"_pq_.foo"]),
        ({"_pq_.foo": "1"}, (3, 2), [b"_pq_.foo"]),
    ]
    for params, version, unsupported in cases:
        with Raw(proxy) as raw:
            raw.send(startup_packet({"user": "postgres", "database": "testdb", **params}, version))
            msg_type, body = raw.read_message()
            assert msg_type == b"v", (params, version, msg_type, body)
            newest, count = struct.unpack("!II", body[:8])
            names = sorted(body[8:].split(b"\0")[:count])
            expected = min((version[0] << 16) | version[1], (3 << 16) | 2)
            assert (newest, count, names) == (expected, len(unsupported), unsupported)
            login = raw.read_until(b"Z")
            assert login[0][0] == b"R" and login[-1][0] == b"Z", login
            assert [t for t, _ in raw.simple_query("SELECT 1")] == [b"T", b"D", b"C", b"Z"]
