"""auth_type = hba with auth_hba_file: real clients (psql, psycopg, raw sockets) through pgmulti."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import struct
import subprocess
import tempfile
import time

import psycopg
import pytest

from pgmulti.certs import CertificateAuthority
from pgmulti.cluster import clean_env
from support import recv_exactly

CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 5.0
RUN_TIMEOUT_S = 20
RELOAD_WAIT_S = 5.0

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 0, 3, 5, 10


@pytest.fixture
def hba_proxy(pgmulti, tmp_path, base_config):
    """Factory: hba_proxy(hba_text, users=None, databases=None, **settings) -> Proc."""

    def start(hba_text: str, users: str | None = None, databases: dict | None = None,
              **settings):
        path = tmp_path / "hba.conf"
        path.write_text(hba_text)
        config = base_config(auth_type="hba", auth_hba_file=str(path), databases=databases,
                             **settings)
        proxy = pgmulti(config, users)
        proxy.hba_path = path
        return proxy

    return start


# --- clients ---


def conninfo(proxy, *, user: str = "postgres", db: str = "postgres", unix: bool = False,
             **params) -> str:
    host = proxy.workdir if unix else "127.0.0.1"
    parts = {"host": host, "port": proxy.port, "user": user, "dbname": db,
             "connect_timeout": CONNECT_TIMEOUT_S, "gssencmode": "disable",
             "sslmode": "disable", **params}
    return " ".join(f"{key}='{value}'" for key, value in parts.items())


def connect(proxy, **params) -> psycopg.Connection:
    return psycopg.connect(conninfo(proxy, **params), autocommit=True)


def current_user(proxy, **params) -> str:
    with connect(proxy, **params) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def login_error(proxy, **params) -> str:
    """The message of a failed login (libpq does not keep the SQLSTATE of a login error;
    first_answer() reads it)."""
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, **params).close()
    return str(info.value)


def psql(proxy, sql: str, **params) -> subprocess.CompletedProcess:
    env = clean_env(HOME=tempfile.gettempdir())
    return subprocess.run(
        [proxy.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-d", conninfo(proxy, **params),
         "-c", sql],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False)


def first_answer(proxy, user: str, db: str = "postgres") -> tuple[str, int | dict]:
    """Log in over plain TCP by hand: ("R", auth code) or ("E", error fields)."""
    body = struct.pack("!I", 196608) + b"".join(
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in {"user": user, "database": db}.items()) + b"\0"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        header = recv_exactly(sock, 5)
        payload = recv_exactly(sock, struct.unpack("!I", header[1:])[0] - 4)
    if header[:1] == b"R":
        return "R", struct.unpack("!I", payload[:4])[0]
    assert header[:1] == b"E", header
    fields = {chr(part[0]): part[1:].decode() for part in payload.split(b"\0") if part}
    return "E", fields



def reload_by_sighup(proxy, hba_text: str) -> None:
    proxy.hba_path.write_text(hba_text)
    proxy.signal(signal.SIGHUP)


# --- tests ---


def test_local_and_host_lines(hba_proxy):
    proxy = hba_proxy("local all all trust\n"
                      "host  all all 127.0.0.1/32 md5\n")
    # Unix socket: trust.
    assert current_user(proxy, unix=True) == "postgres"
    result = psql(proxy, "SELECT 'over unix'", unix=True)
    assert (result.returncode, result.stdout.strip()) == (0, "over unix"), result.stderr
    # TCP: md5 asked, the right password logs in, a wrong one does not.
    assert first_answer(proxy, "md5user") == ("R", AUTH_MD5)
    assert current_user(proxy, user="md5user", password="md5pass") == "md5user"
    assert 'password authentication failed for user "md5user"' in login_error(
        proxy, user="md5user", password="wrong")
    result = psql(proxy, "SELECT 1", user="postgres")
    assert result.returncode != 0 and "password" in result.stderr


def test_methods_per_line(hba_proxy):
    proxy = hba_proxy("host all md5user   127.0.0.1/32 md5\n"
                      "host all scramuser 127.0.0.1/32 scram-sha-256\n"
                      "host all passuser  127.0.0.1/32 password\n"
                      "host all all       127.0.0.1/32 trust\n")
    assert first_answer(proxy, "md5user") == ("R", AUTH_MD5)
    assert first_answer(proxy, "scramuser") == ("R", AUTH_SASL)
    assert first_answer(proxy, "passuser") == ("R", AUTH_CLEARTEXT)
    assert first_answer(proxy, "plainuser")[0] == "R"  # trust: straight to AuthenticationOk
    assert first_answer(proxy, "plainuser") == ("R", AUTH_OK)
    assert current_user(proxy, user="scramuser", password="scrampass") == "scramuser"
    assert current_user(proxy, user="passuser", password="plainpass") == "passuser"
    assert current_user(proxy, user="md5user", password="md5pass") == "md5user"
    assert current_user(proxy, user="plainuser") == "plainuser"
    assert "password authentication failed" in login_error(proxy, user="scramuser",
                                                          password="nope")
    # trust still needs a known user, as in PgBouncer.
    kind, fields = first_answer(proxy, "nosuchuser")
    assert kind == "E" and fields["C"] == "28000" and "nosuchuser" in fields["M"]


def test_reject_and_no_entry(hba_proxy):
    proxy = hba_proxy("host all md5user 127.0.0.1/32 reject\n"
                      "host testdb all  127.0.0.1/32 trust\n")
    kind, fields = first_answer(proxy, "md5user", "testdb")
    assert kind == "E"
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"] == ('pg_hba.conf rejects connection for host "127.0.0.1", '
                           'user "md5user", database "testdb", no encryption')
    kind, fields = first_answer(proxy, "postgres", "postgres")
    assert (kind, fields["C"]) == ("E", "28000")
    assert fields["M"] == ('no pg_hba.conf entry for host "127.0.0.1", user "postgres", '
                           'database "postgres", no encryption')
    # psql shows the message as it would for PostgreSQL itself.
    result = psql(proxy, "SELECT 1", user="md5user", db="testdb", password="md5pass")
    assert result.returncode != 0 and "pg_hba.conf rejects connection" in result.stderr
    assert current_user(proxy, db="testdb") == "postgres"
    # Nothing over the Unix socket: no local line.
    assert 'no pg_hba.conf entry for host "[local]"' in login_error(proxy, unix=True)


def test_database_and_user_matching(hba_proxy, tmp_path):
    (tmp_path / "staff").write_text("md5user\nplainuser\n")
    proxy = hba_proxy('host testdb   @staff      127.0.0.1/32 trust\n'
                      'host sameuser all         127.0.0.1/32 trust\n'
                      'host "postgres" passuser  0.0.0.0/0    password\n')
    assert current_user(proxy, user="plainuser", db="testdb") == "plainuser"
    assert current_user(proxy, user="md5user", db="testdb") == "md5user"
    assert first_answer(proxy, "plainuser", "postgres")[1]["C"] == "28000"
    assert first_answer(proxy, "scramuser", "testdb")[1]["C"] == "28000"
    # sameuser: the database named like the user (postgres/postgres).
    assert current_user(proxy, user="postgres", db="postgres") == "postgres"
    assert current_user(proxy, user="passuser", db="postgres", password="plainpass") \
        == "passuser"


def test_hostssl_and_hostnossl(hba_proxy, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    cert = ca.issue("proxy", "localhost", ("127.0.0.1", "localhost"))
    proxy = hba_proxy("hostssl   all all 127.0.0.1/32 trust\n"
                      "hostnossl all plainuser 127.0.0.1/32 trust\n"
                      "hostnossl all all 127.0.0.1/32 reject\n",
                      client_tls_sslmode="prefer", client_tls_cert_file=cert.cert_file,
                      client_tls_key_file=cert.key_file)
    with connect(proxy, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
    result = psql(proxy, "SELECT 'tls'", sslmode="require")
    assert (result.returncode, result.stdout.strip()) == (0, "tls"), result.stderr
    assert first_answer(proxy, "postgres")[1]["C"] == "28000"
    error = login_error(proxy, sslmode="disable")
    assert "pg_hba.conf rejects connection" in error and "no encryption" in error
    assert current_user(proxy, user="plainuser", sslmode="disable") == "plainuser"


def test_cert_method_maps_the_certificate_name_to_the_user(hba_proxy, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("proxy", "localhost", ("127.0.0.1", "localhost"))
    client = ca.issue("client", "plainuser", client=True)
    proxy = hba_proxy("hostssl all all 127.0.0.1/32 cert\n",
                      client_tls_sslmode="verify-ca", client_tls_ca_file=ca.cert_file,
                      client_tls_cert_file=server.cert_file, client_tls_key_file=server.key_file)
    with_cert = {"sslmode": "require", "sslcert": client.cert_file, "sslkey": client.key_file}
    assert current_user(proxy, user="plainuser", **with_cert) == "plainuser"
    result = psql(proxy, "SELECT current_user", user="plainuser", **with_cert)
    assert (result.returncode, result.stdout.strip()) == (0, "plainuser"), result.stderr
    # The certificate names plainuser, not md5user; the password does not matter.
    error = login_error(proxy, user="md5user", password="md5pass", **with_cert)
    assert 'certificate authentication failed for user "md5user"' in error


def test_peer_method_on_the_unix_socket(hba_proxy, userlist):
    me = pwd.getpwuid(os.getuid()).pw_name
    # Logged in as the OS user; the pool logs in to PostgreSQL as postgres (forced user).
    peerdb = "host=127.0.0.1 port={pg_port} dbname=testdb user=postgres"
    proxy = hba_proxy(f"local all {me} peer\n"
                      "local all all peer\n"
                      "host  all all 127.0.0.1/32 peer\n",
                      users=userlist(**{me: ""}), databases={"peerdb": peerdb})
    with connect(proxy, unix=True, user=me, db="peerdb") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    # Another user name than the OS user: refused, as is peer over TCP.
    error = login_error(proxy, unix=True, user="postgres", db="peerdb")
    assert 'Peer authentication failed for user "postgres"' in error
    kind, fields = first_answer(proxy, me, "peerdb")
    assert (kind, fields["C"]) == ("E", "28000")
    assert fields["M"] == f'Peer authentication failed for user "{me}"'


def test_peer_method_with_an_ident_map(hba_proxy, userlist, tmp_path):
    me = pwd.getpwuid(os.getuid()).pw_name
    ident = tmp_path / "ident.conf"
    ident.write_text(f"ops {me} md5user\nops {me} plainuser\n")
    peerdb = "host=127.0.0.1 port={pg_port} dbname=testdb user=postgres"
    proxy = hba_proxy("local all all peer map=ops\n", users=userlist(**{me: ""}),
                      databases={"peerdb": peerdb}, auth_ident_file=str(ident))
    for user in ("md5user", "plainuser"):  # the map lets the OS user in as these
        with connect(proxy, unix=True, user=user, db="peerdb") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    # Not as itself: with a map only the map's pairs count.
    error = login_error(proxy, unix=True, user=me, db="peerdb")
    assert f'Peer authentication failed for user "{me}"' in error


def test_cert_method_with_an_ident_map(hba_proxy, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("proxy", "localhost", ("127.0.0.1", "localhost"))
    client = ca.issue("client", "robot-7", client=True)
    ident = tmp_path / "ident.conf"
    ident.write_text("robots robot-7 plainuser\n")
    proxy = hba_proxy("hostssl all all 127.0.0.1/32 cert map=robots\n",
                      auth_ident_file=str(ident), client_tls_sslmode="verify-ca",
                      client_tls_ca_file=ca.cert_file, client_tls_cert_file=server.cert_file,
                      client_tls_key_file=server.key_file)
    with_cert = {"sslmode": "require", "sslcert": client.cert_file, "sslkey": client.key_file}
    assert current_user(proxy, user="plainuser", **with_cert) == "plainuser"
    error = login_error(proxy, user="md5user", **with_cert)
    assert 'certificate authentication failed for user "md5user"' in error


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_admin_console_follows_the_hba_file(hba_proxy):
    proxy = hba_proxy("local all all trust\n"
                      "host pgbouncer all 127.0.0.1/32 reject\n"
                      "host all all 127.0.0.1/32 trust\n")
    result = psql(proxy, "SHOW VERSION", unix=True, db="pgbouncer")
    assert result.returncode == 0, result.stderr
    kind, fields = first_answer(proxy, "postgres", "pgbouncer")
    assert (kind, fields["C"]) == ("E", "28000")
    assert "pg_hba.conf rejects connection" in fields["M"]


def test_reload_reads_the_file_again(hba_proxy):
    proxy = hba_proxy("host all all 127.0.0.1/32 trust\nlocal all all trust\n")
    assert current_user(proxy, user="plainuser") == "plainuser"
    # Edited but not reloaded: the old rules still apply.
    proxy.hba_path.write_text("host all plainuser 127.0.0.1/32 reject\n"
                              "host all all 127.0.0.1/32 trust\nlocal all all trust\n")
    assert current_user(proxy, user="plainuser") == "plainuser"
    proxy.signal(signal.SIGHUP)
    _wait_for(lambda: first_answer(proxy, "plainuser")[0] == "E", "SIGHUP to apply the file")
    assert current_user(proxy, user="postgres") == "postgres"
    # RELOAD from the console, back to trusting plainuser.
    proxy.hba_path.write_text("host all all 127.0.0.1/32 trust\nlocal all all trust\n")
    with connect(proxy, unix=True, db="pgbouncer") as admin:
        admin.execute("RELOAD")
    assert current_user(proxy, user="plainuser") == "plainuser"


def test_unusable_lines_are_logged_with_file_and_line(hba_proxy):
    proxy = hba_proxy("# pgmulti test\n"
                      "host all all 127.0.0.1/32 ldap ldapbindpasswd=HushHush\n"
                      "host all +group 127.0.0.1/32 trust\n"
                      "host all all 127.0.0.1/32 trust\n")
    assert current_user(proxy, user="plainuser") == "plainuser"
    log = proxy.log_text()
    assert f"{proxy.hba_path}:2: unsupported authentication method ldap" in log
    assert f"{proxy.hba_path}:3: group membership" in log
    assert "HushHush" not in log


def test_missing_file_rejects_logins(hba_proxy, tmp_path):
    proxy = hba_proxy("host all all 127.0.0.1/32 trust\n")
    proxy.hba_path.unlink()
    proxy.signal(signal.SIGHUP)
    _wait_for(lambda: first_answer(proxy, "plainuser")[0] == "E", "the reload")
    kind, fields = first_answer(proxy, "plainuser")
    assert fields["C"] == "28000" and "no pg_hba.conf entry" in fields["M"]
    assert "could not open auth_hba_file" in proxy.log_text()
