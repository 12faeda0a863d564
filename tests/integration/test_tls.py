"""TLS on both legs: clients to pgmulti (client_tls_*) and pgmulti to PostgreSQL (server_tls_*).

Certificates come from a throwaway CA (pgmulti.certs). Clients are real: psql and pgbench
(the system libpq) and psycopg (its bundled libpq), plus raw sockets where the wire matters
(SSLRequest answers, buffer stuffing, the certificate the proxy presents).

Server-side tests use a second PostgreSQL cluster with ssl = on; the session `pg` cluster has
no TLS at all, which the "server refused TLS" tests rely on.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pgmulti.certs import CertificateAuthority, Issued
from pgmulti.cluster import SERVER_OS_USER, Cluster, clean_env
from support import recv_exactly

CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 5.0
WAIT_S = 5.0
RUN_TIMEOUT_S = 20

SSL_REQUEST = struct.pack("!II", 8, 80877103)
PROXY_CN = "pgmulti-proxy-one"
PROXY_CN_TWO = "pgmulti-proxy-two"
CERT_ROLE = "certuser"  # logs in to the ssl cluster with a client certificate only
TLS_COLUMN = re.compile(r"^TLSv1\.[23]/\S+")

# --- certificates ---


class Certs:
    """Everything signed by one throwaway CA, plus a second CA nobody trusts."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.ca = CertificateAuthority(directory / "ca", "pgmulti test CA")
        self.rogue_ca = CertificateAuthority(directory / "rogue", "pgmulti rogue CA")
        hosts = ("127.0.0.1", "localhost")
        self.proxy = self.ca.issue("proxy-one", PROXY_CN, hosts)
        self.proxy_two = self.ca.issue("proxy-two", PROXY_CN_TWO, hosts)
        self.other_host = self.ca.issue("other-host", "other.example", ("other.example",))
        self.expired = self.ca.issue("expired", "expired-proxy", hosts, expired=True)
        self.client = self.ca.issue("client", "postgres", client=True)
        self.rogue_client = self.rogue_ca.issue("rogue-client", "postgres", client=True)
        # For the ssl = on PostgreSQL cluster.
        self.pg_good = self.ca.issue("pg-good", "ssl-pg", ("127.0.0.1", "localhost"))
        self.pg_wrong = self.ca.issue("pg-wrong", "wrong.example", ("wrong.example",))
        # pgmulti's own certificate towards PostgreSQL (server_tls_cert_file, hba "cert").
        self.pg_client = self.ca.issue("pg-client", CERT_ROLE, client=True)

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_file


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-certs"))


def client_tls(certs: Certs, mode: str = "require", issued: Issued | None = None,
               ca: bool = False, **more) -> dict:
    """[pgbouncer] overrides for TLS towards clients."""
    issued = issued or certs.proxy
    settings = {
        "client_tls_sslmode": mode,
        "client_tls_cert_file": str(issued.cert_file),
        "client_tls_key_file": str(issued.key_file),
    }
    if ca:
        settings["client_tls_ca_file"] = str(certs.ca_file)
    settings.update(more)
    return settings


# --- clients ---


def conninfo(proxy, *, host: str = "127.0.0.1", db: str = "postgres", user: str = "postgres",
             **params) -> str:
    """A key=value conninfo to the proxy; host=localhost connects to 127.0.0.1 (hostaddr)."""
    parts = {"host": host, "port": proxy.port, "user": user, "dbname": db,
             "connect_timeout": CONNECT_TIMEOUT_S}
    if host != "127.0.0.1":
        parts["hostaddr"] = "127.0.0.1"  # listen_addr; localhost may resolve to ::1 first
    parts.update(params)
    return " ".join(f"{key}={value}" for key, value in parts.items())


def pconnect(proxy, sslmode: str, **params) -> psycopg.Connection:
    return psycopg.connect(conninfo(proxy, sslmode=sslmode, **params), autocommit=True,
                           prepare_threshold=None)


def psql(proxy, sql: str, sslmode: str, **params) -> subprocess.CompletedProcess:
    """psql (system libpq) with a conninfo string; HOME points nowhere near ~/.postgresql."""
    env = clean_env(HOME=tempfile.gettempdir(), PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S))
    return subprocess.run(
        [proxy.pg.bindir / "psql", "-X", "-A", "-t", "-w",
         "-d", conninfo(proxy, sslmode=sslmode, **params), "-c", sql],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False)


def scalar(conn: psycopg.Connection, sql: str):
    return conn.execute(sql).fetchone()[0]


def show(conn: psycopg.Connection, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [col.name for col in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


# --- raw protocol ---


def startup_packet(user: str = "postgres", database: str = "postgres", **params: str) -> bytes:
    body = struct.pack("!I", 196608)
    for key, value in {"user": user, "database": database, **params}.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = recv_exactly(sock, 5)
    length = struct.unpack("!I", header[1:])[0]
    return header[:1], recv_exactly(sock, length - 4)


def read_until_ready_or_error(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        kind, body = read_message(sock)
        messages.append((kind, body))
        if kind in (b"Z", b"E"):
            return messages


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def read_to_eof(sock: socket.socket, limit: int = 65536) -> bytes:
    """Everything the peer sends until it closes (bounded by the socket timeout)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def plain_login_error(port: int, db: str = "postgres") -> dict[str, str]:
    """Log in without TLS; the ErrorResponse fields the proxy answers with."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(startup_packet(database=db))
        messages = read_until_ready_or_error(sock)
    kind, body = messages[-1]
    assert kind == b"E", f"expected an ErrorResponse, got {messages!r}"
    return error_fields(body)


def proxy_certificate(port: int) -> x509.Certificate:
    """The certificate the proxy presents now: SSLRequest, then a TLS handshake by hand."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as raw:
        raw.sendall(SSL_REQUEST)
        assert recv_exactly(raw, 1) == b"S"
        with context.wrap_socket(raw) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# === client side: client_tls_sslmode = require ===


def test_require_psycopg_uses_tls(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    with pconnect(proxy, "require", db="testdb") as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 40 + 2") == 42
        assert scalar(conn, "SELECT current_database()") == "testdb"


def test_require_psql_uses_tls(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    result = psql(proxy, "\\conninfo", "require")
    assert result.returncode == 0, result.stderr
    assert re.search(r"SSL connection \(protocol: TLSv1\.[23]", result.stdout), result.stdout
    result = psql(proxy, "SELECT 1", "require", db="testdb")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_with_the_ca(pgmulti, certs, host):
    proxy = pgmulti(client_tls(certs, "require"))
    params = {"sslrootcert": certs.ca_file, "host": host}
    with pconnect(proxy, "verify-full", **params) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1
    result = psql(proxy, "SELECT 1", "verify-full", **params)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


def test_verify_full_with_a_certificate_for_another_host_fails(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require", certs.other_host))
    params = {"sslrootcert": certs.ca_file, "host": "localhost"}
    with pytest.raises(psycopg.OperationalError,
                       match=r'server certificate for "other\.example" does not match host name '
                             r'"localhost"'):
        pconnect(proxy, "verify-full", **params)
    result = psql(proxy, "SELECT 1", "verify-full", **params)
    assert result.returncode == 2
    assert 'does not match host name "localhost"' in result.stderr
    # The chain itself is fine: verify-ca does not look at the name.
    with pconnect(proxy, "verify-ca", **params) as conn:
        assert conn.pgconn.ssl_in_use


def test_expired_certificate_fails_verify_ca(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require", certs.expired))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        pconnect(proxy, "verify-ca", sslrootcert=certs.ca_file)
    result = psql(proxy, "SELECT 1", "verify-ca", sslrootcert=certs.ca_file)
    assert result.returncode == 2
    assert "certificate verify failed" in result.stderr
    # sslmode=require encrypts without checking the certificate.
    with pconnect(proxy, "require") as conn:
        assert conn.pgconn.ssl_in_use


def test_certificate_from_an_unknown_ca_fails_verify_ca(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        pconnect(proxy, "verify-ca", sslrootcert=certs.rogue_ca.cert_file)


def test_plain_client_refused_when_tls_required(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    fields = plain_login_error(proxy.port)
    assert fields["C"] == "28000"
    assert fields["M"] == "SSL required"
    assert fields["S"] == "FATAL"
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        pconnect(proxy, "disable")
    result = psql(proxy, "SELECT 1", "disable")
    assert result.returncode == 2
    assert "SSL required" in result.stderr
    # sslmode=prefer (libpq's default) asks for TLS first and gets it.
    with pconnect(proxy, "prefer") as conn:
        assert conn.pgconn.ssl_in_use


def test_a_remembered_startup_packet_still_needs_tls_when_required(pgmulti, certs):
    """TLS clients' startup packets are remembered (the same bytes log in without parsing);
    the same bytes sent in plain text must still meet "SSL required"."""
    proxy = pgmulti(client_tls(certs, "require", stats_period=1, verbose=1))
    for _ in range(3):
        with pconnect(proxy, "require", db="testdb", application_name="same") as conn:
            assert scalar(conn, "SELECT 1") == 1
    wait_for(lambda: re.search(r"logins from known startup packets: [1-9]", proxy.log_text()),
             "a TLS login from a remembered startup packet")
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        pconnect(proxy, "disable", db="testdb", application_name="same")


@pytest.mark.parametrize("mode", ["prefer", "allow"])
def test_plain_client_allowed_when_tls_preferred(pgmulti, certs, mode):
    proxy = pgmulti(client_tls(certs, mode))
    with pconnect(proxy, "disable", db="testdb") as conn:
        assert not conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1
    with pconnect(proxy, "require", db="testdb") as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1
    result = psql(proxy, "SELECT 1", "disable")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


def test_tls_request_answered_no_when_client_tls_disabled(pgmulti):
    proxy = pgmulti()  # client_tls_sslmode = disable
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(SSL_REQUEST)
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall(startup_packet())
        messages = read_until_ready_or_error(sock)
    assert messages[-1] == (b"Z", b"I")
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        pconnect(proxy, "require")


def test_show_clients_tls_column(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "prefer"))
    with pconnect(proxy, "require", db="testdb", application_name="tls_client") as tls, \
            pconnect(proxy, "disable", db="testdb", application_name="plain_client") as plain, \
            pconnect(proxy, "disable", db="pgbouncer") as admin:
        scalar(tls, "SELECT 1")
        scalar(plain, "SELECT 1")
        rows = show(admin, "CLIENTS")
    by_app = {row["application_name"]: row for row in rows if row["database"] == "testdb"}
    assert TLS_COLUMN.match(by_app["tls_client"]["tls"]), by_app["tls_client"]
    assert by_app["plain_client"]["tls"] == ""
    admin_rows = [row for row in rows if row["database"] == "pgbouncer"]
    assert [row["tls"] for row in admin_rows] == [""]


def test_admin_console_over_tls(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    with pconnect(proxy, "verify-full", db="pgbouncer", host="localhost",
                  sslrootcert=certs.ca_file) as admin:
        assert admin.pgconn.ssl_in_use
        rows = show(admin, "CLIENTS")
        assert len(rows) == 1
        assert TLS_COLUMN.match(rows[0]["tls"]), rows
        config = {row["key"]: row["value"] for row in show(admin, "CONFIG")}
        assert config["client_tls_sslmode"] == "require"
    result = psql(proxy, "SHOW VERSION", "require", db="pgbouncer")
    assert result.returncode == 0, result.stderr
    assert "PgBouncer" in result.stdout or "pgmulti" in result.stdout
    # Plain text is refused on the console as well.
    fields = plain_login_error(proxy.port, db="pgbouncer")
    assert (fields["C"], fields["M"]) == ("28000", "SSL required")


def test_client_tls_protocols_limits_the_version(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require", client_tls_protocols="tlsv1.2"))
    with pconnect(proxy, "require", application_name="tls12") as conn, \
            pconnect(proxy, "require", db="pgbouncer") as admin:
        scalar(conn, "SELECT 1")
        rows = [row for row in show(admin, "CLIENTS") if row["application_name"] == "tls12"]
    assert len(rows) == 1 and rows[0]["tls"].startswith("TLSv1.2/"), rows
    with pytest.raises(psycopg.OperationalError):
        pconnect(proxy, "require", ssl_min_protocol_version="TLSv1.3")


def test_direct_tls_negotiation(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    with pconnect(proxy, "require", sslnegotiation="direct") as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1


GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
TLS_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


def login_clients(proxy) -> int:
    with pconnect(proxy, "require", db="pgbouncer") as admin:
        return {row["list"]: row["items"] for row in show(admin, "LISTS")}["login_clients"]


def tls_read_to_eof(tls_sock: ssl.SSLSocket) -> bytes:
    """Decrypted bytes until the proxy closes (close_notify or a bare TCP close)."""
    data = b""
    while True:
        try:
            chunk = tls_sock.recv(4096)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def direct_tls_login(port: int, alpn: list[str] | None) -> bytes:
    """A ClientHello as the first bytes (no SSLRequest), then a startup packet over TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as raw:
        with context.wrap_socket(raw) as tls_sock:
            tls_sock.sendall(startup_packet(database="testdb"))
            return tls_read_to_eof(tls_sock) if alpn != ["postgresql"] else tls_sock.recv(4096)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_direct_tls_verify_full_with_the_ca(pgmulti, certs, host):
    proxy = pgmulti(client_tls(certs, "require"))
    params = {"sslrootcert": certs.ca_file, "host": host, "sslnegotiation": "direct"}
    with pconnect(proxy, "verify-full", db="testdb", application_name="direct", **params) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT current_database()") == "testdb"
        with pconnect(proxy, "verify-full", db="pgbouncer", **params) as admin:
            rows = [row for row in show(admin, "CLIENTS") if row["application_name"] == "direct"]
    assert len(rows) == 1 and TLS_COLUMN.match(rows[0]["tls"]), rows
    # A certificate for another name is still refused by verify-full.
    other = pgmulti(client_tls(certs, "require", certs.other_host))
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        pconnect(other, "verify-full", **{**params, "host": "localhost"})


@pytest.mark.parametrize("how", ["cancel_safe", "cancel"])
def test_cancel_over_direct_tls(pgmulti, certs, how):
    """cancel_safe opens its cancel connection with direct TLS as well."""
    proxy = pgmulti(client_tls(certs, "require"))
    with pconnect(proxy, "require", db="testdb", sslnegotiation="direct") as conn:
        timer = threading.Timer(0.5, getattr(conn, how))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.cancel()
            timer.join(WAIT_S)
        assert time.monotonic() - started < 5
        assert scalar(conn, "SELECT 1") == 1


def test_direct_tls_when_client_tls_is_off_is_closed(pgmulti):
    proxy = pgmulti()  # client_tls_sslmode = disable
    with pytest.raises(psycopg.OperationalError):
        pconnect(proxy, "require", sslnegotiation="direct")
    wait_for(lambda: "direct TLS connection refused" in proxy.log_text(), "the refusal logged")
    assert proxy.log_text().count("direct TLS connection refused: TLS is off") == 1
    # A raw ClientHello gets a plain close: no bytes a TLS client would misread.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(TLS_HELLO_START)
        assert read_to_eof(sock) == b""
    with pconnect(proxy, "disable", db="testdb") as conn:
        assert scalar(conn, "SELECT 1") == 1


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_alpn_postgresql_is_refused(pgmulti, certs, alpn):
    proxy = pgmulti(client_tls(certs, "require"))
    assert direct_tls_login(proxy.port, alpn) == b""  # handshake done, then closed unanswered
    wait_for(lambda: "no ALPN protocol" in proxy.log_text(), "the refusal logged")
    # The same bytes with ALPN "postgresql" log in.
    answer = direct_tls_login(proxy.port, ["postgresql"])
    assert answer[:1] == b"R" and answer[5:9] == struct.pack("!I", 0), answer
    # Refused and finished handshakes leave no client behind in the login list.
    wait_for(lambda: login_clients(proxy) == 0, "no client left logging in")


def test_tls_hello_after_a_refused_gssenc_request_is_a_protocol_violation(pgmulti, certs):
    """Direct TLS starts a connection; later it is a malformed startup packet."""
    proxy = pgmulti(client_tls(certs, "require"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(GSSENC_REQUEST)
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall(TLS_HELLO_START)
        answer = read_to_eof(sock)
    assert answer[:1] == b"E", answer
    assert error_fields(answer[5:])["C"] == "08P01"


@pytest.mark.parametrize("how", ["cancel_safe", "cancel"])
def test_cancel_over_tls(pgmulti, certs, how):
    """cancel_safe: libpq 17+ sends the CancelRequest over TLS; cancel: legacy, plain text."""
    proxy = pgmulti(client_tls(certs, "require", pool_mode="transaction"))
    with pconnect(proxy, "require", db="testdb") as conn:
        assert conn.pgconn.ssl_in_use
        timer = threading.Timer(0.5, getattr(conn, how))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.cancel()
            timer.join(WAIT_S)
        assert time.monotonic() - started < 5
        assert scalar(conn, "SELECT 1") == 1


def test_copy_in_and_out_over_tls(pgmulti, certs):
    """Megabytes both ways through the client TLS layer (flow control on an SSL transport)."""
    proxy = pgmulti(client_tls(certs, "require", pool_mode="transaction"))
    line = ("x" * 1000 + "\n").encode()
    rows = 8000
    with pconnect(proxy, "require", db="testdb") as conn:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE tls_copy (t text) ON COMMIT DROP")
            with conn.cursor().copy("COPY tls_copy FROM STDIN") as copy:
                for start in range(0, rows, 500):
                    copy.write(line * 500)
            assert scalar(conn, "SELECT count(*) FROM tls_copy") == rows
            received = 0
            with conn.cursor().copy("COPY tls_copy TO STDOUT") as copy:
                for chunk in copy:
                    received += len(chunk)
            assert received == rows * len(line)
        assert scalar(conn, "SELECT 1") == 1


def test_stalled_tls_handshake_is_closed_by_client_login_timeout(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require", client_login_timeout=1))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(SSL_REQUEST)
        assert recv_exactly(sock, 1) == b"S"
        started = time.monotonic()
        assert read_to_eof(sock) == b""  # no ClientHello from us: the proxy gives up
        assert time.monotonic() - started < 4
    with pconnect(proxy, "require") as conn:
        assert scalar(conn, "SELECT 1") == 1


@pytest.mark.parametrize("settings, message", [
    ({"client_tls_sslmode": "require"}, "client_tls_cert_file"),
    ({"client_tls_sslmode": "require", "client_tls_cert_file": "/nonexistent/cert.pem",
      "client_tls_key_file": "/nonexistent/key.pem"}, "cannot load client TLS files"),
    ({"client_tls_sslmode": "verify-full", "client_tls_cert_file": "{cert}",
      "client_tls_key_file": "{key}"}, "client_tls_ca_file"),
], ids=["no-cert", "missing-files", "verify-without-ca"])
def test_bad_client_tls_settings_stop_the_start(pgmulti, certs, settings, message):
    settings = {key: value.format(cert=certs.proxy.cert_file, key=certs.proxy.key_file)
                for key, value in settings.items()}
    proxy = pgmulti(settings, wait=False)
    assert proxy.wait(10) != 0
    assert message in proxy.log_text()


# === client side: the SSLRequest itself ===


@pytest.mark.parametrize("stuffing", [
    pytest.param(startup_packet(), id="startup-packet"),
    pytest.param(b"\x16\x03\x01\x00\x05hello", id="tls-lookalike"),
    pytest.param(b"Q", id="one-byte"),
])
def test_ssl_request_with_stuffed_bytes_is_refused(pgmulti, certs, stuffing):
    """Bytes after SSLRequest in the same packet must never be taken as encrypted input."""
    proxy = pgmulti(client_tls(certs, "prefer"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(SSL_REQUEST + stuffing)
        answer = read_to_eof(sock)
    assert not answer.startswith(b"S"), f"the proxy agreed to TLS: {answer!r}"
    if answer:
        assert answer[:1] == b"E", answer
        fields = error_fields(answer[5:])
        assert fields["C"] == "08P01", fields
        assert "after SSL request" in fields["M"]
    # The proxy is unharmed.
    with pconnect(proxy, "require") as conn:
        assert conn.pgconn.ssl_in_use


def test_ssl_request_split_over_two_packets_is_fine(pgmulti, certs):
    """A slow client sending SSLRequest in pieces is not mistaken for buffer stuffing."""
    proxy = pgmulti(client_tls(certs, "require"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(SSL_REQUEST[:3])
        time.sleep(0.1)
        sock.sendall(SSL_REQUEST[3:])
        assert recv_exactly(sock, 1) == b"S"


def test_second_ssl_request_inside_tls_does_not_start_tls_again(pgmulti, certs):
    proxy = pgmulti(client_tls(certs, "require"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as raw:
        raw.sendall(SSL_REQUEST)
        assert recv_exactly(raw, 1) == b"S"
        with context.wrap_socket(raw) as sock:
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
    # PgBouncer closes ("SSL req inside SSL"); answering 'N' is also safe. Never 'S'.
    assert answer in (b"", b"N", b"E"), answer


# === client side: client certificates ===


@pytest.mark.parametrize("mode", ["verify-full", "verify-ca"])
def test_client_certificate_required(pgmulti, certs, mode):
    proxy = pgmulti(client_tls(certs, mode, ca=True))
    good = {"sslcert": certs.client.cert_file, "sslkey": certs.client.key_file}
    result = psql(proxy, "SELECT 1", "require", db="testdb", **good)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    with pconnect(proxy, "verify-full", host="localhost", sslrootcert=certs.ca_file,
                  **good) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT 1") == 1

    # No certificate: the TLS handshake fails and nobody logs in.
    result = psql(proxy, "SELECT 1", "require")
    assert result.returncode == 2, result.stdout
    assert re.search(r"certificate|SSL|closed", result.stderr), result.stderr
    with pytest.raises(psycopg.OperationalError):
        pconnect(proxy, "require")
    # A certificate from a CA the proxy does not trust.
    rogue = {"sslcert": certs.rogue_client.cert_file, "sslkey": certs.rogue_client.key_file}
    result = psql(proxy, "SELECT 1", "require", **rogue)
    assert result.returncode == 2, result.stdout
    # No TLS at all.
    assert plain_login_error(proxy.port)["M"] == "SSL required"
    assert "TLS handshake failed" in proxy.log_text()


def test_require_does_not_validate_client_certificates(pgmulti, certs):
    """PgBouncer: with require, a presented client certificate is not validated."""
    proxy = pgmulti(client_tls(certs, "require", ca=True))
    rogue = {"sslcert": certs.rogue_client.cert_file, "sslkey": certs.rogue_client.key_file}
    result = psql(proxy, "SELECT 1", "require", **rogue)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    result = psql(proxy, "SELECT 1", "require")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


# === client side: reload ===


def _reload_by_console(proxy):
    with pconnect(proxy, "require", db="pgbouncer") as admin:
        admin.execute("RELOAD")


def _reload_by_sighup(proxy):
    proxy.signal(signal.SIGHUP)


@pytest.mark.parametrize("reload", [_reload_by_sighup, _reload_by_console],
                         ids=["sighup", "console"])
def test_reload_switches_certificate_for_new_connections(pgmulti, certs, reload):
    proxy = pgmulti(client_tls(certs, "require"))
    assert common_name(proxy_certificate(proxy.port)) == PROXY_CN
    with pconnect(proxy, "verify-full", db="testdb", host="localhost",
                  sslrootcert=certs.ca_file) as old:
        assert scalar(old, "SELECT 1") == 1
        proxy.write_config(client_tls(certs, "require", certs.proxy_two))
        reload(proxy)
        wait_for(lambda: common_name(proxy_certificate(proxy.port)) == PROXY_CN_TWO,
                 "the new certificate")
        # The connection made before the reload keeps its TLS session.
        assert old.pgconn.ssl_in_use
        assert scalar(old, "SELECT 2") == 2
        with pconnect(proxy, "verify-full", db="testdb", host="localhost",
                      sslrootcert=certs.ca_file) as new:
            assert scalar(new, "SELECT 3") == 3
        assert scalar(old, "SELECT 4") == 4


@pytest.mark.parametrize("how", ["sighup", "console"])
def test_reload_with_a_missing_certificate_keeps_the_old_one(pgmulti, certs, tmp_path, how):
    proxy = pgmulti(client_tls(certs, "require"))
    missing = tmp_path / "missing.crt"
    proxy.write_config(client_tls(certs, "require", Issued(missing, certs.proxy_two.key_file)))
    if how == "console":
        with pconnect(proxy, "require", db="pgbouncer") as admin:
            with pytest.raises(psycopg.errors.ConfigFileError, match="RELOAD failed"):
                admin.execute("RELOAD")
    else:
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in proxy.log_text(), "the reload error in the log")
    assert re.search(r"reload failed.*cannot load client TLS files.*No such file",
                     proxy.log_text()), proxy.log_text()
    assert common_name(proxy_certificate(proxy.port)) == PROXY_CN
    with pconnect(proxy, "verify-full", host="localhost", sslrootcert=certs.ca_file) as conn:
        assert scalar(conn, "SELECT 1") == 1


def test_reload_toggles_client_tls_sslmode(pgmulti, certs):
    proxy = pgmulti()  # client_tls_sslmode = disable
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        pconnect(proxy, "require")
    with pconnect(proxy, "disable", db="testdb") as plain:
        proxy.write_config(client_tls(certs, "require"))
        with pconnect(proxy, "disable", db="pgbouncer") as admin:
            admin.execute("RELOAD")
        # An established plain client is not thrown out; new plain logins are refused.
        assert scalar(plain, "SELECT 1") == 1
        assert plain_login_error(proxy.port)["M"] == "SSL required"
        with pconnect(proxy, "require", db="testdb") as tls_conn:
            assert tls_conn.pgconn.ssl_in_use
            proxy.write_config()
            with pconnect(proxy, "require", db="pgbouncer") as admin:
                admin.execute("RELOAD")
            assert scalar(tls_conn, "SELECT 2") == 2
        with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
            pconnect(proxy, "require")
        with pconnect(proxy, "disable") as conn:
            assert scalar(conn, "SELECT 3") == 3


# === client side: SCRAM-SHA-256-PLUS (channel binding to the proxy's certificate) ===


SCRAM_LOGIN = {"user": "scramuser", "password": "scrampass", "db": "testdb",
               "channel_binding": "require"}


class HoldingRelay:
    """TCP relay to the proxy that holds the client's bytes after its SSLRequest.

    Lets a test act between the proxy's 'S' and the client's TLS ClientHello.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SOCKET_TIMEOUT_S)
        self.port = self.listener.getsockname()[1]
        self.answered = threading.Event()   # the proxy's answer to SSLRequest went back
        self.release = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port),
                                                timeout=SOCKET_TIMEOUT_S)
        except OSError:
            return
        self.sockets += [client, upstream]
        back = threading.Thread(target=self._pump, args=(upstream, client, self.answered),
                                daemon=True)
        back.start()
        self.threads.append(back)
        try:
            upstream.sendall(recv_exactly(client, 8))
            if self.release.wait(WAIT_S * 2):
                self._pump(client, upstream, None)
        except (OSError, EOFError):
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, first: threading.Event | None):
        source.settimeout(RUN_TIMEOUT_S)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if first is not None:
                    first.set()
        except OSError:
            pass

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(WAIT_S)
        for sock in self.sockets:
            sock.close()


def test_channel_binding_over_tls(pgmulti, certs):
    proxy = pgmulti({**client_tls(certs, "require"), "auth_type": "scram-sha-256"})
    with pconnect(proxy, "verify-full", host="localhost", sslrootcert=certs.ca_file,
                  **SCRAM_LOGIN) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT current_user") == "scramuser"


def test_channel_binding_follows_certificate_reload(pgmulti, certs):
    proxy = pgmulti({**client_tls(certs, "require"), "auth_type": "scram-sha-256"})
    with pconnect(proxy, "require", **SCRAM_LOGIN) as old:
        proxy.write_config({**client_tls(certs, "require", certs.proxy_two),
                            "auth_type": "scram-sha-256"})
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: common_name(proxy_certificate(proxy.port)) == PROXY_CN_TWO,
                 "the new certificate")
        with pconnect(proxy, "require", **SCRAM_LOGIN) as new:
            assert scalar(new, "SELECT 1") == 1
        assert scalar(old, "SELECT 2") == 2


def test_channel_binding_with_reload_during_the_handshake(pgmulti, certs):
    proxy = pgmulti({**client_tls(certs, "require"), "auth_type": "scram-sha-256"})
    relay = HoldingRelay(proxy.port)
    outcome: list = []

    def connect() -> None:
        try:
            with psycopg.connect(conninfo(proxy, port=relay.port, sslmode="require",
                                          **SCRAM_LOGIN)) as conn:
                outcome.append(conn.execute("SELECT current_user").fetchone()[0])
        except psycopg.Error as exc:
            outcome.append(exc)

    client = threading.Thread(target=connect, daemon=True)
    try:
        client.start()
        assert relay.answered.wait(WAIT_S), "no answer to SSLRequest"
        proxy.write_config({**client_tls(certs, "require", certs.proxy_two),
                            "auth_type": "scram-sha-256"})
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: common_name(proxy_certificate(proxy.port)) == PROXY_CN_TWO,
                 "the new certificate")
        relay.release.set()
        client.join(RUN_TIMEOUT_S)
    finally:
        relay.close()
    assert outcome == ["scramuser"]


def test_channel_binding_with_a_certificate_chain_file(pgmulti, certs, tmp_path):
    """A cert file holding the chain (leaf first, then the CA), like a fullchain.pem."""
    chain = tmp_path / "fullchain.crt"
    chain.write_bytes(certs.proxy.cert_file.read_bytes() + certs.ca_file.read_bytes())
    proxy = pgmulti({**client_tls(certs, "require", Issued(chain, certs.proxy.key_file)),
                     "auth_type": "scram-sha-256"})
    with pconnect(proxy, "verify-full", host="localhost", sslrootcert=certs.ca_file,
                  **SCRAM_LOGIN) as conn:
        assert scalar(conn, "SELECT current_user") == "scramuser"


# === client side: Unix sockets ===


def test_unix_socket_gets_no_tls_and_logs_in_when_required(pgmulti, certs):
    """Like PgBouncer: TLS is neither offered nor required on Unix sockets."""
    proxy = pgmulti(client_tls(certs, "require"))
    path = str(proxy.workdir / f".s.PGSQL.{proxy.port}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT_S)
        sock.connect(path)
        sock.sendall(SSL_REQUEST)
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall(startup_packet(database="testdb"))
        messages = read_until_ready_or_error(sock)
        assert messages[0] == (b"R", struct.pack("!I", 0))
        assert messages[-1] == (b"Z", b"I")
        sock.sendall(b"Q" + struct.pack("!I", 4 + 9) + b"SELECT 7\0")
        messages = read_until_ready_or_error(sock)
        assert (b"D", struct.pack("!HI", 1, 1) + b"7") in messages
    # Without SSLRequest at all (libpq never asks on a Unix socket).
    result = subprocess.run(
        [proxy.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-h", str(proxy.workdir),
         "-p", str(proxy.port), "-U", "postgres", "-d", "testdb", "-c", "SELECT 1"],
        env=clean_env(PGSSLMODE="require", PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S)),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


# === server side: a PostgreSQL cluster with ssl = on ===


class SslCluster:
    """A second PostgreSQL with ssl = on and our CA's certificate (switchable)."""

    def __init__(self, cluster: Cluster, certs: Certs):
        self.cluster = cluster
        self.port = cluster.port
        self.current = ""
        account = pwd.getpwnam(SERVER_OS_USER) if os.geteuid() == 0 else None
        for name, issued in (("good", certs.pg_good), ("wrong", certs.pg_wrong)):
            for source, suffix in ((issued.cert_file, "crt"), (issued.key_file, "key")):
                target = cluster.data_dir / f"tls-{name}.{suffix}"
                shutil.copyfile(source, target)
                target.chmod(0o600)
                if account is not None:
                    os.chown(target, account.pw_uid, account.pw_gid)
        ca_target = cluster.data_dir / "tls-ca.crt"
        shutil.copyfile(certs.ca_file, ca_target)
        if account is not None:
            os.chown(ca_target, account.pw_uid, account.pw_gid)
        # CERT_ROLE logs in only over TLS with a certificate the CA signed.
        cluster.psql(f"CREATE ROLE {CERT_ROLE} LOGIN")
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(f"hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n"
                       f"host all {CERT_ROLE} 127.0.0.1/32 reject\n" + hba.read_text())
        cluster.psql("ALTER SYSTEM SET ssl = on")
        cluster.psql("ALTER SYSTEM SET ssl_ca_file = 'tls-ca.crt'")
        self.use("good")

    def use(self, name: str) -> None:
        """Serve tls-<name>.crt to new connections (pg_reload_conf, then wait for it)."""
        if self.current == name:
            return
        cert = f"tls-{name}.crt"
        self.cluster.psql(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
        self.cluster.psql(f"ALTER SYSTEM SET ssl_key_file = 'tls-{name}.key'")
        self.cluster.psql("SELECT pg_reload_conf()")
        wait_for(lambda: self.cluster.psql("SHOW ssl_cert_file") == cert
                 and self.cluster.psql("SHOW ssl") == "on", f"PostgreSQL to serve {cert}")
        self.current = name


@pytest.fixture(scope="module")
def ssl_pg(certs):
    cluster = Cluster(tempfile.mkdtemp(prefix="pgmulti-sslpg-"), auth_setup=False)
    try:
        cluster.init()
        cluster.start()
        server = SslCluster(cluster, certs)
    except BaseException:
        cluster.destroy()
        raise
    yield server
    cluster.destroy()


@pytest.fixture
def ssl_pg_good(ssl_pg):
    ssl_pg.use("good")
    return ssl_pg


def server_tls(ssl_pg: SslCluster, mode: str | None, ca_file: Path | None = None,
               **more) -> dict:
    """[pgbouncer] overrides with database sslpg on the ssl = on cluster."""
    host = more.pop("host", "127.0.0.1")
    settings: dict = {"databases": {
        "sslpg": f"host={host} port={ssl_pg.port} dbname=postgres"}}
    if mode is not None:
        settings["server_tls_sslmode"] = mode
    if ca_file is not None:
        settings["server_tls_ca_file"] = str(ca_file)
    settings.update(more)
    return settings


SERVER_LEG_SSL = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def server_leg(proxy, db: str = "sslpg") -> tuple[bool, str | None]:
    """Through the proxy (plain client): (ssl, version) of the proxy's server connection."""
    with pconnect(proxy, "disable", db=db) as conn:
        return conn.execute("SELECT ssl, version FROM pg_stat_ssl "
                            "WHERE pid = pg_backend_pid()").fetchone()


def test_ssl_cluster_really_offers_tls(ssl_pg_good, certs):
    """Sanity check of the fixture, directly, without the proxy."""
    with psycopg.connect(host="127.0.0.1", port=ssl_pg_good.port, user="postgres",
                         dbname="postgres", sslmode="verify-full", sslrootcert=certs.ca_file,
                         connect_timeout=CONNECT_TIMEOUT_S) as conn:
        assert conn.pgconn.ssl_in_use


def test_server_tls_require_uses_tls(pgmulti, ssl_pg_good):
    proxy = pgmulti(server_tls(ssl_pg_good, "require"))
    ssl_on, version = server_leg(proxy)
    assert ssl_on is True
    assert version.startswith("TLSv1.")


def test_server_tls_disable_is_plain(pgmulti, ssl_pg_good):
    proxy = pgmulti(server_tls(ssl_pg_good, "disable"))
    assert server_leg(proxy) == (False, None)
    with pconnect(proxy, "disable", db="pgbouncer") as admin:
        servers = [row for row in show(admin, "SERVERS") if row["database"] == "sslpg"]
    assert servers and all(row["tls"] == "" for row in servers), servers


def test_server_tls_default_prefer_uses_tls_when_offered(pgmulti, ssl_pg_good):
    proxy = pgmulti(server_tls(ssl_pg_good, None))
    assert server_leg(proxy)[0] is True


@pytest.mark.parametrize("mode, host", [
    ("verify-full", "127.0.0.1"),
    ("verify-full", "localhost"),
    pytest.param("verify-ca", "127.0.0.1"),
])
def test_server_tls_verify_with_ca(pgmulti, ssl_pg_good, certs, mode, host):
    proxy = pgmulti(server_tls(ssl_pg_good, mode, certs.ca_file, host=host))
    ssl_on, version = server_leg(proxy)
    assert ssl_on is True
    assert version.startswith("TLSv1.")
    with pconnect(proxy, "disable", db="pgbouncer") as admin:
        servers = [row for row in show(admin, "SERVERS") if row["database"] == "sslpg"]
    assert servers and all(TLS_COLUMN.match(row["tls"]) for row in servers), servers


@pytest.fixture
def ssl_pg_wrong(ssl_pg):
    """The ssl cluster serving a certificate for wrong.example (restored afterwards)."""
    ssl_pg.use("wrong")
    yield ssl_pg
    ssl_pg.use("good")


def test_server_tls_verify_full_with_wrong_host_name_fails(pgmulti, ssl_pg_wrong, certs):
    proxy = pgmulti(server_tls(ssl_pg_wrong, "verify-full", certs.ca_file,
                               server_login_retry=0))
    fields = plain_login_error(proxy.port, db="sslpg")
    assert fields["C"] == "08006", fields
    assert fields["S"] == "FATAL"
    assert fields["M"] == "server connection failed", fields
    assert re.search(r"certificate verify failed: (IP address|[Hh]ostname) mismatch",
                     fields.get("D", "")), fields
    assert "127.0.0.1" in fields["D"], fields
    with pytest.raises(psycopg.OperationalError, match="server connection failed"):
        pconnect(proxy, "disable", db="sslpg")
    assert "CERTIFICATE_VERIFY_FAILED" in proxy.log_text()


def test_server_tls_verify_ca_ignores_the_host_name(pgmulti, ssl_pg_wrong, certs):
    proxy = pgmulti(server_tls(ssl_pg_wrong, "verify-ca", certs.ca_file))
    assert server_leg(proxy)[0] is True


@pytest.mark.parametrize("mode", ["verify-full", pytest.param("verify-ca")])
def test_server_tls_verify_with_an_unknown_ca_fails(pgmulti, ssl_pg_good, certs, mode):
    proxy = pgmulti(server_tls(ssl_pg_good, mode, certs.rogue_ca.cert_file))
    fields = plain_login_error(proxy.port, db="sslpg")
    assert fields["C"] == "08006", fields
    assert "certificate verify failed" in fields.get("D", ""), fields


class FakeServer:
    """One-shot listener answering SSLRequest with canned bytes (a hostile 'server')."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SOCKET_TIMEOUT_S)
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            # Short: a proxy that never closes (the bug fixed in _connect_negotiating_tls leaked the
            # socket) must not slow the test down much.
            conn.settimeout(1.5)
            try:
                self.received = recv_exactly(conn, 8)
                conn.sendall(self.answer)
                self.received += read_to_eof(conn)
            except (OSError, EOFError):
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(SOCKET_TIMEOUT_S + 1)


@pytest.mark.parametrize("mode", [
    "verify-full",
    pytest.param("require"),
    pytest.param("prefer"),
])
def test_server_tls_ignores_plain_bytes_stuffed_after_s(pgmulti, certs, mode):
    """A 'server' answering 'S' followed by a plaintext AuthenticationOk/ReadyForQuery must
    not get a logged-in connection: those bytes are not part of any TLS session."""
    stuffed = (b"S" + b"R" + struct.pack("!II", 8, 0) + b"Z" + struct.pack("!I", 5) + b"I")
    fake = FakeServer(stuffed)
    try:
        proxy = pgmulti({"databases": {"fake": f"host=127.0.0.1 port={fake.port} dbname=x"},
                         "server_tls_sslmode": mode, "server_tls_ca_file": str(certs.ca_file)})
        fields = plain_login_error(proxy.port, db="fake")
    finally:
        fake.close()
    assert fake.received.startswith(SSL_REQUEST)
    assert fields["C"] == "08006", fields
    assert fields["S"] == "FATAL"


def test_server_tls_require_against_plain_server_fails(pgmulti):
    proxy = pgmulti({"server_tls_sslmode": "require", "server_login_retry": 0})
    fields = plain_login_error(proxy.port, db="testdb")
    assert fields["C"] == "08006", fields
    assert fields["S"] == "FATAL"
    assert "server refused TLS" in fields["M"], fields
    with pytest.raises(psycopg.OperationalError, match="server refused TLS"):
        pconnect(proxy, "disable", db="testdb")


def test_server_tls_default_prefer_against_plain_server_is_unencrypted(pgmulti):
    proxy = pgmulti()
    assert server_leg(proxy, db="testdb") == (False, None)


def test_server_tls_client_certificate(pgmulti, ssl_pg_good, certs):
    """server_tls_cert_file/key_file: pgmulti logs in to an hba "cert" role with them."""
    databases = {"sslcert": f"host=127.0.0.1 port={ssl_pg_good.port} dbname=postgres "
                            f"user={CERT_ROLE}"}
    proxy = pgmulti({**server_tls(ssl_pg_good, "verify-full", certs.ca_file),
                     "databases": databases,
                     "server_tls_cert_file": str(certs.pg_client.cert_file),
                     "server_tls_key_file": str(certs.pg_client.key_file)})
    with pconnect(proxy, "disable", db="sslcert") as conn:
        row = conn.execute("SELECT current_user, ssl, client_dn FROM pg_stat_ssl "
                           "WHERE pid = pg_backend_pid()").fetchone()
    assert row == (CERT_ROLE, True, f"/CN={CERT_ROLE}")
    # Without the certificate PostgreSQL refuses the login, and the client hears why.
    plain = pgmulti({**server_tls(ssl_pg_good, "verify-full", certs.ca_file),
                     "databases": databases})
    fields = plain_login_error(plain.port, db="sslcert")
    assert fields["S"] == "FATAL"
    assert "certificate" in fields["M"], fields


def test_server_tls_mode_change_applies_after_reload_and_reconnect(pgmulti, ssl_pg_good, certs):
    proxy = pgmulti(server_tls(ssl_pg_good, "disable"))
    assert server_leg(proxy)[0] is False
    proxy.write_config(server_tls(ssl_pg_good, "verify-full", certs.ca_file))
    with pconnect(proxy, "disable", db="pgbouncer") as admin:
        admin.execute("RELOAD")
        admin.execute("RECONNECT sslpg")
    assert server_leg(proxy)[0] is True


def test_both_legs_encrypted(pgmulti, ssl_pg_good, certs):
    proxy = pgmulti({**client_tls(certs, "require"),
                     **server_tls(ssl_pg_good, "verify-full", certs.ca_file)})
    with pconnect(proxy, "verify-full", db="sslpg", host="localhost",
                  sslrootcert=certs.ca_file) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, SERVER_LEG_SSL) is True
        # A larger result crosses both TLS layers in many records.
        size = scalar(conn, "SELECT length(string_agg(md5(i::text), '')) "
                            "FROM generate_series(1, 20000) i")
        assert size == 20000 * 32
        rows = conn.execute("SELECT repeat('x', 100000) FROM generate_series(1, 20)").fetchall()
        assert len(rows) == 20 and all(len(row[0]) == 100000 for row in rows)


# === pgbench through TLS in each pool mode ===


@pytest.fixture(scope="module")
def bench_tables(ssl_pg):
    """pgbench tables in the ssl cluster's postgres database (made directly, once)."""
    result = subprocess.run(
        [ssl_pg.cluster.bindir / "pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1",
         "-p", str(ssl_pg.port), "-U", "postgres", "postgres"],
        env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return ssl_pg


@pytest.mark.parametrize("pool_mode", ["session", "transaction", "statement"])
def test_pgbench_over_tls(pgmulti, certs, bench_tables, pool_mode):
    bench_tables.use("good")
    # Both legs encrypted.
    proxy = pgmulti({**client_tls(certs, "require"),
                     **server_tls(bench_tables, "verify-full", certs.ca_file),
                     "pool_mode": pool_mode})
    # Statement pooling refuses transaction blocks: the select-only script has none.
    script = ["-S"] if pool_mode == "statement" else []
    result = subprocess.run(
        [proxy.pg.bindir / "pgbench", "-n", *script, "-t", "20", "-c", "2",
         f"sslmode=require host=127.0.0.1 port={proxy.port} user=postgres dbname=sslpg "
         f"connect_timeout={CONNECT_TIMEOUT_S}"],
        env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of transactions actually processed: 40/40" in result.stdout, result.stdout
    assert "number of failed transactions: 0" in result.stdout, result.stdout
