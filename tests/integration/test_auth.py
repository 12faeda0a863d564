"""Authentication through pgmulti: clients logging in to the proxy, the proxy logging in to PostgreSQL.

Client side: every auth_type against plain, md5 and SCRAM secrets in the auth file. Those tests
reach PostgreSQL over its Unix socket, which trusts every role, so only the proxy's own check
decides. Server side: the test roles over TCP, where pg_hba asks md5 / cleartext / SCRAM.
Every test also checks that no password (or secret) ended up in the proxy's log.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time

import asyncpg
import psycopg
import pytest

PASSWORDS = {"md5user": "md5pass", "scramuser": "scrampass", "passuser": "plainpass"}
WRONG_PASSWORD = "wrong-Pa55word"
CONNECT_TIMEOUT = 10

AUTH_TYPES = ["trust", "any", "plain", "md5", "scram-sha-256"]
SECRET_KINDS = ["plain", "md5", "scram"]

# Authentication request codes (AuthenticationXXX) in the first 'R' message.
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 0, 3, 5, 10


def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def userlist_text(entries: dict[str, str]) -> str:
    return "".join(f'"{user}" "{secret}"\n' for user, secret in entries.items())


# --- fixtures ---


@pytest.fixture
def proxy(pgmulti, pg):
    """pgmulti factory that, at teardown, checks the logs of every proxy it started for secrets."""
    started = []

    def start(*args, **kwargs):
        proc = pgmulti(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    secrets = set(PASSWORDS.values()) | {WRONG_PASSWORD}
    secrets |= {md5_secret(user, password)[3:] for user, password in PASSWORDS.items()}
    scram = pg.password_secret("scramuser")
    secrets |= set(scram.split("$", 2)[2].split(":"))  # StoredKey and ServerKey
    for proc in started:
        log = proc.log_text()
        leaked = sorted(secret for secret in secrets if secret in log)
        assert not leaked, f"secrets in the proxy log {proc.log_path}: {leaked}"


@pytest.fixture
def socket_db(pg) -> dict[str, str]:
    """A [databases] entry reaching PostgreSQL over its Unix socket, where every role is trusted."""
    return {"sockdb": f"host={pg.socket_dir} port={pg.port} dbname=testdb"}


# --- client helpers ---


def asyncpg_login(proc, user: str, db: str, password: str | None):
    """Log in with asyncpg and run a query: (None, current_user), or (sqlstate, message)."""

    async def attempt():
        try:
            conn = await asyncpg.connect(host=proc.host, port=proc.port, user=user, database=db,
                                         password=password, ssl=False, timeout=CONNECT_TIMEOUT)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        try:
            return None, await conn.fetchval("SELECT current_user", timeout=CONNECT_TIMEOUT)
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT)

    return asyncio.run(asyncio.wait_for(attempt(), CONNECT_TIMEOUT + 5))


def psycopg_user(proc, user: str, db: str, password: str | None) -> str:
    with psycopg.connect(proc.dsn(user=user, db=db, password=password),
                         connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def psql_user(proc, user: str, db: str, password: str | None) -> str:
    result = proc.psql("SELECT current_user", user=user, db=db, password=password)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def first_auth_request(proc, user: str, db: str) -> tuple[bytes, int | None]:
    """Send a startup packet; return the first message type and its auth code (if 'R')."""
    body = struct.pack("!I", 3 << 16) + b"".join(
        key.encode() + b"\0" + value.encode() + b"\0"
        for key, value in (("user", user), ("database", db))) + b"\0"
    with socket.create_connection((proc.host, proc.port), timeout=5) as sock:
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        data = b""
        deadline = time.monotonic() + 5
        while len(data) < 9 and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert len(data) >= 5, f"no answer to the startup packet: {data!r}"
    code = struct.unpack("!I", data[5:9])[0] if data[:1] == b"R" else None
    return data[:1], code


def pg_auth_methods(pg, log_start: int, user: str) -> list[str]:
    """Methods PostgreSQL logged for `user`'s logins since log_start (log_connections)."""
    log = pg.log_text()[log_start:]
    marker = f'identity="{user}" method='
    return [line.split(marker, 1)[1].split()[0] for line in log.splitlines() if marker in line]


# --- client side: auth_type x secret kind ---


def client_secret(pg, kind: str) -> str:
    """scramuser's auth-file entry in the given form."""
    if kind == "plain":
        return PASSWORDS["scramuser"]
    if kind == "md5":
        return md5_secret("scramuser", PASSWORDS["scramuser"])
    return pg.password_secret("scramuser")


# The first authentication request the proxy sends for each (auth_type, secret kind).
EXPECTED_REQUEST = {
    "trust": {"plain": AUTH_OK, "md5": AUTH_OK, "scram": AUTH_OK},
    "any": {"plain": AUTH_OK, "md5": AUTH_OK, "scram": AUTH_OK},
    "plain": {"plain": AUTH_CLEARTEXT, "md5": AUTH_CLEARTEXT, "scram": AUTH_CLEARTEXT},
    # md5 uses SCRAM for users whose secret is a SCRAM secret (as PgBouncer does).
    "md5": {"plain": AUTH_MD5, "md5": AUTH_MD5, "scram": AUTH_SASL},
    # An md5 secret cannot serve SCRAM: PgBouncer fails such logins too.
    "scram-sha-256": {"plain": AUTH_SASL, "md5": None, "scram": AUTH_SASL},
}


@pytest.mark.parametrize("kind", SECRET_KINDS)
@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_client_auth(proxy, base_config, userlist, socket_db, pg, auth_type, kind):
    """scramuser's secret in the auth file as `kind`; plainuser missing from the auth file."""
    users = userlist(scramuser=client_secret(pg, kind), plainuser=None)
    proc = proxy(base_config(auth_type=auth_type, databases=socket_db), users)
    password = PASSWORDS["scramuser"]
    expected_request = EXPECTED_REQUEST[auth_type][kind]

    if expected_request is None:
        sqlstate, message = asyncpg_login(proc, "scramuser", "sockdb", password)
        assert sqlstate == "28P01", message
        assert 'password authentication failed for user "scramuser"' in message
    else:
        assert first_auth_request(proc, "scramuser", "sockdb") == (b"R", expected_request)
        # The right password logs in, with libpq (psql and psycopg) and asyncpg.
        assert psql_user(proc, "scramuser", "sockdb", password) == "scramuser"
        assert psycopg_user(proc, "scramuser", "sockdb", password) == "scramuser"
        assert asyncpg_login(proc, "scramuser", "sockdb", password) == (None, "scramuser")

    # A wrong password.
    outcome = asyncpg_login(proc, "scramuser", "sockdb", WRONG_PASSWORD)
    if auth_type in ("trust", "any"):
        assert outcome == (None, "scramuser")  # no password is asked for
    else:
        sqlstate, message = outcome
        assert sqlstate == "28P01", message
        assert 'password authentication failed for user "scramuser"' in message
        result = proc.psql("SELECT 1", user="scramuser", db="sockdb", password=WRONG_PASSWORD)
        assert result.returncode != 0
        assert "password authentication failed" in result.stderr
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg_user(proc, "scramuser", "sockdb", WRONG_PASSWORD)

    # A user missing from the auth file (PostgreSQL itself would let plainuser in).
    outcome = asyncpg_login(proc, "plainuser", "sockdb", "whatever")
    if auth_type == "any":
        assert outcome == (None, "plainuser")
    elif auth_type == "trust":
        assert outcome == ("28000", "no such user: plainuser")
    else:
        sqlstate, message = outcome
        assert sqlstate == "28P01", message
        assert 'password authentication failed for user "plainuser"' in message


@pytest.mark.parametrize("auth_type, request_code", [("md5", AUTH_MD5),
                                                      ("scram-sha-256", AUTH_SASL)])
def test_unknown_user_is_asked_for_a_password_like_a_known_one(proxy, auth_type, request_code):
    proc = proxy({"auth_type": auth_type})
    assert first_auth_request(proc, "md5user", "testdb") == (b"R", request_code)
    assert first_auth_request(proc, "no_such_user", "testdb") == (b"R", request_code)


def test_empty_password_in_auth_file_never_authenticates(proxy, base_config, userlist, socket_db):
    proc = proxy(base_config(auth_type="plain", databases=socket_db), userlist(plainuser=""))
    sqlstate, message = asyncpg_login(proc, "plainuser", "sockdb", "")
    assert sqlstate == "28P01", message


# --- server side: the proxy logs in to PostgreSQL ---


@pytest.mark.parametrize("user, method", [
    ("md5user", "md5"),
    ("passuser", "password"),
    ("scramuser", "scram-sha-256"),
])
def test_server_login_with_password_from_auth_file(proxy, pg, user, method):
    proc = proxy({"auth_type": "md5"})
    log_start = len(pg.log_text())
    password = PASSWORDS[user]
    assert psycopg_user(proc, user, "testdb", password) == user
    assert psql_user(proc, user, "testdb", password) == user
    assert pg_auth_methods(pg, log_start, user) == [method]  # one server connection, reused


def test_server_md5_login_with_md5_secret_in_auth_file(proxy, pg, userlist):
    users = userlist(md5user=md5_secret("md5user", PASSWORDS["md5user"]))
    proc = proxy({"auth_type": "md5"}, users)
    log_start = len(pg.log_text())
    assert psycopg_user(proc, "md5user", "testdb", PASSWORDS["md5user"]) == "md5user"
    assert pg_auth_methods(pg, log_start, "md5user") == ["md5"]


@pytest.mark.parametrize("user, method", [
    ("md5user", "md5"),
    ("passuser", "password"),
    ("scramuser", "scram-sha-256"),
])
def test_server_login_with_password_from_database_entry(proxy, pg, base_config, userlist,
                                                        user, method):
    databases = {"forced": "host=127.0.0.1 port={pg_port} dbname=testdb "
                           f"user={user} password={PASSWORDS[user]}"}
    # The forced user is absent from the auth file: only the [databases] password can work.
    proc = proxy(base_config(databases=databases), userlist(**{user: None}))
    log_start = len(pg.log_text())
    assert psycopg_user(proc, "postgres", "forced", None) == user
    assert psql_user(proc, "plainuser", "forced", None) == user
    assert pg_auth_methods(pg, log_start, user) == [method]


def test_database_entry_password_wins_over_auth_file(proxy, pg, base_config, userlist):
    databases = {"forced": "host=127.0.0.1 port={pg_port} dbname=testdb "
                           f"user=md5user password={PASSWORDS['md5user']}"}
    proc = proxy(base_config(databases=databases), userlist(md5user=WRONG_PASSWORD))
    assert psycopg_user(proc, "postgres", "forced", None) == "md5user"


def test_scram_pass_through(proxy, pg):
    """Only a SCRAM secret is stored: the proxy logs in to PostgreSQL with the client's keys."""
    users = userlist_text({"scramuser": pg.password_secret("scramuser")})
    proc = proxy({"auth_type": "scram-sha-256"}, users)
    log_start = len(pg.log_text())
    password = PASSWORDS["scramuser"]
    assert psycopg_user(proc, "scramuser", "testdb", password) == "scramuser"
    assert psql_user(proc, "scramuser", "testdb", password) == "scramuser"
    # Two transactions at once need a second server connection, opened with the same keys.
    dsn = proc.dsn(user="scramuser", db="testdb", password=password)
    with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT) as first, \
            psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT) as second:
        assert first.execute("SELECT pg_backend_pid()").fetchone()[0] != \
            second.execute("SELECT pg_backend_pid()").fetchone()[0]
        first.commit()
        second.commit()
    assert pg_auth_methods(pg, log_start, "scramuser") == ["scram-sha-256"] * 2
    sqlstate, message = asyncpg_login(proc, "scramuser", "testdb", WRONG_PASSWORD)
    assert sqlstate == "28P01", message


def test_scram_secret_without_client_scram_cannot_log_in_to_server(proxy, pg):
    """trust gives the proxy no client keys: a SCRAM secret alone cannot answer the server."""
    users = userlist_text({"scramuser": pg.password_secret("scramuser")})
    proc = proxy({"auth_type": "trust"}, users)
    sqlstate, message = asyncpg_login(proc, "scramuser", "testdb", None)
    assert sqlstate is not None, "logged in to a SCRAM server without a password or keys"


@pytest.fixture
def auth_query_proxy(proxy):
    """auth_file lists only postgres; the other users' secrets come from pg_authid."""
    return proxy({"auth_type": "md5", "auth_user": "postgres"}, userlist_text({"postgres": ""}))


def test_auth_query_md5_user(auth_query_proxy, pg):
    log_start = len(pg.log_text())
    password = PASSWORDS["md5user"]
    assert first_auth_request(auth_query_proxy, "md5user", "testdb") == (b"R", AUTH_MD5)
    assert psycopg_user(auth_query_proxy, "md5user", "testdb", password) == "md5user"
    assert psql_user(auth_query_proxy, "md5user", "testdb", password) == "md5user"
    assert pg_auth_methods(pg, log_start, "md5user") == ["md5"]


def test_auth_query_scram_user(auth_query_proxy, pg):
    log_start = len(pg.log_text())
    password = PASSWORDS["scramuser"]
    assert first_auth_request(auth_query_proxy, "scramuser", "testdb") == (b"R", AUTH_SASL)
    assert psycopg_user(auth_query_proxy, "scramuser", "testdb", password) == "scramuser"
    assert asyncpg_login(auth_query_proxy, "scramuser", "testdb", password) == (None, "scramuser")
    assert pg_auth_methods(pg, log_start, "scramuser") == ["scram-sha-256"]


@pytest.mark.parametrize("user", ["md5user", "scramuser"])
def test_auth_query_wrong_password(auth_query_proxy, user):
    sqlstate, message = asyncpg_login(auth_query_proxy, user, "testdb", WRONG_PASSWORD)
    assert sqlstate == "28P01", message


def test_auth_query_unknown_role(auth_query_proxy):
    sqlstate, message = asyncpg_login(auth_query_proxy, "no_such_role", "testdb", WRONG_PASSWORD)
    assert sqlstate == "28P01", message


# An auth_query that finds secrets only when it runs in testdb.
TESTDB_ONLY_AUTH_QUERY = ("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1 "
                          "AND current_database() = 'testdb'")


@pytest.mark.parametrize("where", ["global", "database"])
def test_auth_dbname_runs_auth_query_in_that_database(proxy, base_config, where):
    auth_dbname = {"auth_dbname": "testdb"} if where == "global" else {}
    postgres_db = "host=127.0.0.1 port={pg_port} dbname=postgres"
    if where == "database":
        postgres_db += " auth_dbname=testdb"
    config = base_config(databases={"postgres": postgres_db}, auth_type="md5",
                         auth_user="postgres", auth_query=TESTDB_ONLY_AUTH_QUERY, **auth_dbname)
    proc = proxy(config, userlist_text({"postgres": ""}))
    password = PASSWORDS["md5user"]
    assert asyncpg_login(proc, "md5user", "postgres", password) == (None, "md5user")


def test_without_auth_dbname_auth_query_runs_in_the_clients_database(proxy, base_config):
    config = base_config(auth_type="md5", auth_user="postgres", auth_query=TESTDB_ONLY_AUTH_QUERY)
    proc = proxy(config, userlist_text({"postgres": ""}))
    password = PASSWORDS["md5user"]
    sqlstate, message = asyncpg_login(proc, "md5user", "postgres", password)
    assert sqlstate == "28P01", message
    assert asyncpg_login(proc, "md5user", "testdb", password) == (None, "md5user")


def test_auth_dbname_that_is_missing_or_disabled(proxy, base_config):
    config = base_config(auth_type="md5", auth_user="postgres", auth_dbname="nosuchdb")
    proc = proxy(config, userlist_text({"postgres": ""}))
    sqlstate, message = asyncpg_login(proc, "md5user", "testdb", PASSWORDS["md5user"])
    assert (sqlstate, message) == ("3D000", "bouncer config error")
    assert 'authentication database "nosuchdb" is not configured' in proc.log_text()

    config = base_config(auth_type="md5", auth_user="postgres", auth_dbname="postgres")
    proc = proxy(config, userlist_text({"postgres": "admin-pw"}))
    assert proc.psql("DISABLE postgres", db="pgbouncer", password="admin-pw").returncode == 0
    sqlstate, message = asyncpg_login(proc, "md5user", "testdb", PASSWORDS["md5user"])
    assert (sqlstate, message) == ("57P03", 'authentication database "postgres" is disabled')


def test_no_password_in_verbose_log(proxy, pg):
    """Debug logging of a full round of logins still keeps every password out of the log."""
    users = userlist_text({"postgres": "", "md5user": PASSWORDS["md5user"],
                           "passuser": PASSWORDS["passuser"],
                           "scramuser": pg.password_secret("scramuser")})
    proc = proxy({"auth_type": "md5", "verbose": 2}, users)
    for user in ("md5user", "passuser", "scramuser"):
        assert asyncpg_login(proc, user, "testdb", PASSWORDS[user]) == (None, user)
        sqlstate, _ = asyncpg_login(proc, user, "testdb", WRONG_PASSWORD)
        assert sqlstate == "28P01"
    # The `proxy` fixture checks the log for the passwords and secrets at teardown.
