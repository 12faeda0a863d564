"""`pgmulti analyze` between real clients (psql, psycopg) and PostgreSQL.

The analyzer runs as `python -m pgmulti.analyze ... --output FILE`; every test stops it before
reading the file, so the records are complete.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pgerrors

from pgmulti.cluster import (
    Cluster,
    ClusterError,
    clean_env,
    find_free_port,
    give_to_server_user,
    stop_process,
    wait_until_listening,
)
from support import recv_exactly

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT_S = 15.0
CLIENT_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 5


# --- the analyzer process ---


class Analyzer:
    """One `python -m pgmulti.analyze` process writing to its own output file."""

    def __init__(self, workdir: Path, target: str, args: tuple[str, ...], json_lines: bool):
        self.workdir = workdir
        self.port = find_free_port()
        self.target = target
        self.output = workdir / ("analyze.jsonl" if json_lines else "analyze.txt")
        self.stderr_path = workdir / "analyze.stderr"
        argv = [sys.executable, "-m", "pgmulti.analyze", "--listen", f"127.0.0.1:{self.port}",
                "--target", target, "--output", str(self.output), *args]
        if json_lines:
            argv.append("--json")
        pythonpath = os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")]))
        with open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                env=clean_env(PYTHONPATH=pythonpath), start_new_session=True)
        try:
            wait_until_listening(self.popen, self.port, START_TIMEOUT_S)
        except ClusterError as exc:
            self.stop()
            raise pytest.fail.Exception(f"analyzer did not start: {exc}\n{self.stderr()}",
                                        pytrace=False) from None

    def dsn(self, db: str = "testdb", user: str = "postgres", **params: str) -> str:
        extra = "".join(f" {key}={value}" for key, value in params.items())
        return f"host=127.0.0.1 port={self.port} user={user} dbname={db}{extra}"

    def stop(self) -> int | None:
        stop_process(self.popen, 10.0)
        return self.popen.returncode

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def text(self) -> str:
        try:
            return self.output.read_text()
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def analyzer(pg: Cluster, tmp_path: Path, failure_log) -> Iterator:
    """Factory: analyzer(*args, json_lines=True, target=None) -> Analyzer (stopped at teardown)."""
    started: list[Analyzer] = []

    def start(*args: str, json_lines: bool = True, target: str | None = None) -> Analyzer:
        workdir = tmp_path / f"analyze{len(started)}"
        workdir.mkdir()
        proc = Analyzer(workdir, target or f"127.0.0.1:{pg.port}", args, json_lines)
        started.append(proc)
        failure_log(f"analyzer stderr ({workdir.name})", proc.stderr)
        failure_log(f"analyzer output ({workdir.name})", proc.text)
        return proc

    yield start
    for proc in started:
        proc.stop()


# --- helpers ---


def psql(pg: Cluster, port: int, *args: str, env: dict | None = None,
         script: str | None = None) -> subprocess.CompletedProcess:
    """psql -X against 127.0.0.1:port as postgres on testdb; GSSAPI off for a fixed startup."""
    return subprocess.run(
        [pg.bindir / "psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "testdb", *args],
        input=script, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False,
        env=clean_env(PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10", **(env or {})))


def by_session(records: list[dict]) -> dict[int, list[dict]]:
    sessions: dict[int, list[dict]] = {}
    for record in records:
        sessions.setdefault(record["session"], []).append(record)
    return sessions


def messages(records: list[dict]) -> list[dict]:
    """The protocol messages, without the analyzer's own events."""
    return [r for r in records if r["direction"] != "analyzer"]


def steps(records: list[dict]) -> list[tuple[str, str]]:
    """(direction, type) per message, a run of ParameterStatus as one step."""
    out: list[tuple[str, str]] = []
    for record in messages(records):
        step = (record["direction"], record["type"])
        if step == ("server", "ParameterStatus") and out and out[-1] == step:
            continue
        out.append(step)
    return out


def find(records: list[dict], direction: str, msg_type: str, **fields) -> dict:
    for record in records:
        if record["direction"] == direction and record["type"] == msg_type and all(
                record["fields"].get(key) == value for key, value in fields.items()):
            return record
    raise AssertionError(f"no {direction} {msg_type} {fields} in {steps(records)}")


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


LOGIN = [("client", "SSLRequest"), ("server", "SSLResponse"), ("client", "StartupMessage"),
         ("server", "AuthenticationOk"), ("server", "ParameterStatus"),
         ("server", "BackendKeyData"), ("server", "ReadyForQuery")]


# --- the decoded stream ---


def test_psql_and_psycopg_sessions_decoded(analyzer, pg):
    proc = analyzer()
    result = psql(pg, proc.port, "-c", "select 1 as one", "-c", "select 'x'::text")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(proc.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        row = conn.execute("select %t::int4 + 1 as answer, %t::text as word",
                           ("41", "hello")).fetchone()
        assert row == (42, "hello")
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("select 1/0")
    assert proc.stop() == 0
    records = proc.records()
    sessions = by_session(records)
    assert sorted(sessions) == [1, 2]

    # Every record: a session, a direction, an ISO time, a type; messages have a length.
    for record in records:
        assert record["direction"] in ("client", "server", "analyzer")
        datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        if record["direction"] != "analyzer" and not record["fields"].get("origin"):
            assert record["length"] >= 4

    # psql: simple query protocol.
    first = sessions[1]
    assert steps(first) == LOGIN + [
        ("client", "Query"), ("server", "RowDescription"), ("server", "DataRow"),
        ("server", "CommandComplete"), ("server", "ReadyForQuery"),
        ("client", "Query"), ("server", "RowDescription"), ("server", "DataRow"),
        ("server", "CommandComplete"), ("server", "ReadyForQuery"),
        ("client", "Terminate")]
    msgs = messages(first)
    assert msgs[0]["fields"] == {"forwarded": False}
    assert msgs[1]["fields"] == {"answer": "N", "origin": "analyzer"}
    startup = msgs[2]["fields"]
    assert startup["protocol"] == "3.0"
    assert startup["params"]["user"] == "postgres"
    assert startup["params"]["database"] == "testdb"
    find(first, "server", "ParameterStatus", name="server_encoding", value="UTF8")
    assert find(first, "server", "BackendKeyData")["fields"]["pid"] > 0
    assert find(first, "server", "ReadyForQuery")["fields"] == {"status": "idle"}
    query = find(first, "client", "Query", query="select 1 as one")
    rest = first[first.index(query):]
    columns = find(rest, "server", "RowDescription")["fields"]["columns"]
    assert [(c["name"], c["type"], c["type_oid"]) for c in columns] == [("one", "int4", 23)]
    assert find(rest, "server", "DataRow")["fields"]["values"] == ["1"]
    assert find(rest, "server", "CommandComplete")["fields"]["tag"] == "SELECT 1"
    rest = rest[rest.index(find(rest, "client", "Query", query="select 'x'::text")):]
    assert [c["type"] for c in find(rest, "server", "RowDescription")["fields"]["columns"]] \
        == ["text"]
    assert find(rest, "server", "DataRow")["fields"]["values"] == ["x"]
    assert first[-1]["type"] == "SessionEnd"
    assert first[0]["type"] == "SessionStart"

    # psycopg: extended protocol with parameters, then an error.
    second = sessions[2]
    assert steps(second)[:len(LOGIN)] == LOGIN
    extended = [step for step in steps(second)[len(LOGIN):]]
    assert extended[:11] == [
        ("client", "Parse"), ("client", "Bind"), ("client", "Describe"), ("client", "Execute"),
        ("client", "Sync"), ("server", "ParseComplete"), ("server", "BindComplete"),
        ("server", "RowDescription"), ("server", "DataRow"), ("server", "CommandComplete"),
        ("server", "ReadyForQuery")]
    parse = find(second, "client", "Parse")["fields"]
    assert parse["query"] == "select $1::int4 + 1 as answer, $2::text as word"
    bind = find(second, "client", "Bind")["fields"]
    assert bind["params"] == ["41", "hello"]
    assert bind["param_formats"] in ([], ["text"], ["text", "text"])
    assert find(second, "client", "Execute")["fields"] == {"portal": "", "max_rows": 0}
    columns = find(second, "server", "RowDescription")["fields"]["columns"]
    assert [(c["name"], c["type"]) for c in columns] == [("answer", "int4"), ("word", "text")]
    assert find(second, "server", "DataRow")["fields"]["values"] == ["42", "hello"]
    error = find(second, "server", "ErrorResponse")["fields"]
    assert error["code"] == "22012"
    assert error["severity"] == "ERROR"
    assert error["message"] == "division by zero"
    after = second[second.index(find(second, "server", "ErrorResponse")):]
    assert find(after, "server", "ReadyForQuery")["fields"] == {"status": "idle"}
    assert steps(second)[-1] == ("client", "Terminate")


def test_authentication_secrets_redacted(analyzer, pg):
    proc = analyzer()
    logins = {"scramuser": "scrampass", "md5user": "md5pass", "passuser": "plainpass"}
    for user, password in logins.items():
        result = subprocess.run(
            [pg.bindir / "psql", "-X", "-w", "-A", "-t", "-h", "127.0.0.1", "-p", str(proc.port),
             "-U", user, "testdb", "-c", "select current_user"],
            capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False,
            env=clean_env(PGPASSWORD=password, PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10"))
        assert (result.returncode, result.stdout.strip()) == (0, user), result.stderr
    assert proc.stop() == 0
    text = proc.text()
    for password in logins.values():
        assert password not in text
    assert not re.search(r"md5[0-9a-f]{32}", text)
    sessions = by_session(proc.records())
    scram, md5, cleartext = (sessions[n] for n in (1, 2, 3))
    assert [step for step in steps(scram) if "SASL" in step[1]] == [
        ("server", "AuthenticationSASL"), ("client", "SASLInitialResponse"),
        ("server", "AuthenticationSASLContinue"), ("client", "SASLResponse"),
        ("server", "AuthenticationSASLFinal")]
    assert find(scram, "server", "AuthenticationSASL")["fields"]["mechanisms"] == [
        "SCRAM-SHA-256"]
    initial = find(scram, "client", "SASLInitialResponse")["fields"]
    assert (initial["mechanism"], initial["attributes"]) == ("SCRAM-SHA-256", ["n", "r"])
    assert find(scram, "server", "AuthenticationSASLContinue")["fields"]["attributes"] == [
        "r", "s", "i"]
    response = find(scram, "client", "SASLResponse")["fields"]
    assert set(response) == {"attributes", "data"}
    assert response["attributes"] == ["c", "r", "p"]
    assert response["data"].startswith("<redacted> (")
    assert find(scram, "server", "AuthenticationSASLFinal")["fields"]["attributes"] == ["v"]
    assert find(md5, "server", "AuthenticationMD5Password")["fields"] == {
        "salt": "<redacted> (4 bytes)"}
    assert find(md5, "client", "PasswordMessage")["fields"] == {
        "password": "<redacted> (36 bytes)"}
    find(cleartext, "server", "AuthenticationCleartextPassword")
    assert find(cleartext, "client", "PasswordMessage")["fields"] == {
        "password": f"<redacted> ({len('plainpass') + 1} bytes)"}
    for records in (scram, md5, cleartext):
        find(records, "server", "AuthenticationOk")


def test_text_output_is_aligned_and_traffic_unchanged(analyzer, pg):
    script = "\n".join([
        "select 1 as one, 'two' as two, null::int as three;",
        "select n, n * 2 as double, repeat('ab', n) as s from generate_series(1, 5) n;",
        "select md5(string_agg(repeat(chr(65 + n % 26), 1000), '')) from generate_series(1, 3000) n;",
        "select repeat('z', 300000) as big, 'after' as small;",
        "do $$ begin raise notice 'hello %', 42; end $$;",
        "create temp table t (a int, b text);",
        "copy t from stdin;",
        "1\tone",
        "2\ttwo",
        "\\.",
        "copy t to stdout;",
        "select * from nosuchtable;",
        "begin; select 1; rollback;",
        "",
    ])
    direct = psql(pg, pg.port, "-f", "-", script=script)
    proc = analyzer(json_lines=False)
    through = psql(pg, proc.port, "-f", "-", script=script)
    assert (through.returncode, through.stdout, through.stderr) == (
        direct.returncode, direct.stdout, direct.stderr)
    assert "hello 42" in through.stderr and "nosuchtable" in through.stderr
    assert proc.stop() == 0

    lines = proc.text().splitlines()
    assert len(lines) > 40
    # One line per message: time, session, arrow, type, length, fields in fixed columns.
    pattern = re.compile(r"^\d\d:\d\d:\d\d\.\d{6}  #1    (C→S|S→C|---)  (\w+) +(len=\d+)? *")
    for line in lines:
        assert pattern.match(line), line
    message_lines = [line for line in lines if "len=" in line]
    assert len({line.index("len=") for line in message_lines}) == 1
    assert len({line.index(" S→C ") for line in lines if " S→C " in line}
               | {line.index(" C→S ") for line in lines if " C→S " in line}) == 1
    text = "\n".join(lines)
    assert re.search(r"C→S  Query +len=\d+ +query=\"select 1 as one, ", text)
    assert re.search(r"S→C  RowDescription +len=\d+ +columns=\[one:int4, two:text, three:int4\]",
                     text)
    assert re.search(r"S→C  DataRow +len=\d+ +values=\['1', 'two', NULL\]", text)
    assert re.search(r"S→C  NoticeResponse .*message='hello 42'", text)
    assert re.search(r"S→C  ErrorResponse .*code='42P01'", text)
    assert re.search(r"S→C  CopyInResponse .*format=text", text)
    assert re.search(r"C→S  CopyData +len=19 +size=15", text)  # psql sends both lines at once
    assert re.search(r"C→S  CopyDone", text)
    assert re.search(r"S→C  CopyOutResponse", text)
    assert re.search(r"S→C  ReadyForQuery +len=5 +status='in transaction'", text)
    # The 300 kB value: a prefix and the full size; the message is longer than what was kept,
    # so the column after it is not shown.
    assert re.search(r"S→C  DataRow +len=300019 +values=\['z{64}… \[300000 bytes\]'\] truncated=true",
                     text)
    assert max(len(line) for line in lines) < 900


def test_big_datarow_streams_with_bounded_memory(analyzer):
    proc = analyzer()
    size = 48 * 1024 * 1024
    with psycopg.connect(proc.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute("select 1").fetchone()
        baseline = vm_kib(proc.popen.pid, "VmRSS")
        value = conn.execute("select repeat('x', %s::int4) as big, 7 as small",
                             (size,)).fetchone()
        assert len(value[0]) == size and value[1] == 7
        peak = vm_kib(proc.popen.pid, "VmHWM")
    # Holding the value whole would take at least its 48 MB; the analyzer keeps 64 kB of it.
    assert peak - baseline < 16 * 1024, (baseline, peak)
    assert proc.stop() == 0
    row = find(proc.records(), "server", "DataRow", truncated=True)
    assert row["length"] == 4 + 2 + 4 + size + 4 + 1
    assert row["fields"]["values"] == ["x" * 64 + f"… [{size} bytes]"]


def test_concurrent_sessions(analyzer):
    proc = analyzer()
    count = 12
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with psycopg.connect(proc.dsn(application_name=f"worker{n}"),
                                 connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
                for i in range(5):
                    got = conn.execute(f"select {n} * 100 + {i}, pg_sleep(0.01)").fetchone()[0]
                    assert got == n * 100 + i
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    assert not errors, errors
    assert proc.stop() == 0
    sessions = by_session(proc.records())
    assert sorted(sessions) == list(range(1, count + 1))
    for records in sessions.values():
        name = find(records, "client", "StartupMessage")["fields"]["params"]["application_name"]
        n = int(name.removeprefix("worker"))
        values = [r["fields"]["values"][0] for r in records if r["type"] == "DataRow"]
        assert values == [str(n * 100 + i) for i in range(5)]
        assert records[-1]["type"] == "SessionEnd"


def test_server_side_end_closes_the_client(analyzer, pg):
    proc = analyzer()
    with psycopg.connect(proc.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        pid = conn.info.backend_pid
        pg.psql(f"select pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError):
            for _ in range(50):
                conn.execute("select 1")
                time.sleep(0.05)
    assert proc.stop() == 0
    records = proc.records()
    find(records, "server", "ErrorResponse", code="57P01")
    assert find(records, "analyzer", "SessionEnd")["fields"]["closed_by"] == "server"


def test_client_side_end_closes_the_server(analyzer, pg):
    proc = analyzer()
    conn = psycopg.connect(proc.dsn(application_name="vanishing"),
                           connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
    conn.execute("select 1")
    # Drop the connection without Terminate: shut the socket down under libpq's feet.
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pg.psql("select count(*) from pg_stat_activity where application_name = 'vanishing'") \
                == "0":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the server connection outlived its client")
    conn.close()
    assert proc.stop() == 0
    end = find(proc.records(), "analyzer", "SessionEnd")
    assert end["fields"]["closed_by"] == "client"


def test_cancel_request(analyzer):
    proc = analyzer()
    with psycopg.connect(proc.dsn(), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        try:
            with pytest.raises(pgerrors.QueryCanceled):
                conn.execute("select pg_sleep(10)")
        finally:
            timer.cancel()
        pid = conn.info.backend_pid
    assert proc.stop() == 0
    sessions = by_session(proc.records())
    cancel = [records for records in sessions.values()
              if any(r["type"] == "CancelRequest" for r in records)]
    assert len(cancel) == 1
    request = find(cancel[0], "client", "CancelRequest")
    assert request["length"] == 16
    assert request["fields"]["pid"] == pid
    assert "redacted" in request["fields"]["key"]
    assert steps(cancel[0]) == [("client", "CancelRequest")]
    main = next(records for records in sessions.values() if records is not cancel[0])
    assert find(main, "server", "ErrorResponse")["fields"]["code"] == "57014"


def test_unreachable_target_reported_to_client(analyzer):
    proc = analyzer(target=f"127.0.0.1:{find_free_port()}")
    with pytest.raises(psycopg.OperationalError, match="could not connect"):
        psycopg.connect(proc.dsn(), connect_timeout=CONNECT_TIMEOUT_S)
    assert proc.stop() == 0
    records = proc.records()
    find(records, "analyzer", "ServerConnectFailed")
    assert find(records, "server", "ErrorResponse")["fields"]["code"] == "08006"


def read_until_ready(sock: socket.socket) -> list[str]:
    """Message types read until ReadyForQuery (or the connection ends)."""
    types = []
    while True:
        header = recv_exactly(sock, 5)
        if len(header) < 5:
            return types
        types.append(chr(header[0]))
        recv_exactly(sock, int.from_bytes(header[1:5], "big") - 4)
        if header[:1] == b"Z":
            return types


def test_gssenc_request_refused_then_plain_session(analyzer):
    proc = analyzer()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall((8).to_bytes(4, "big") + (80877104).to_bytes(4, "big"))
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
        assert recv_exactly(sock, 1) == b"N"
        params = b"user\0postgres\0database\0testdb\0\0"
        body = (3 << 16).to_bytes(4, "big") + params
        sock.sendall((len(body) + 4).to_bytes(4, "big") + body)
        types = read_until_ready(sock)
        assert types[0] == "R" and types[-1] == "Z"
        sock.sendall(b"X" + (4).to_bytes(4, "big"))
    assert proc.stop() == 0
    assert steps(proc.records())[:5] == [
        ("client", "GSSENCRequest"), ("server", "GSSENCResponse"), ("client", "SSLRequest"),
        ("server", "SSLResponse"), ("client", "StartupMessage")]
    assert steps(proc.records())[-1] == ("client", "Terminate")


def test_direct_tls_relayed_undecoded(analyzer):
    proc = analyzer()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        # A TLS record header as a direct-TLS client (PostgreSQL 17+) starts with.
        sock.sendall(b"\x16\x03\x01\x00\x40" + bytes(64))
        # PostgreSQL 15 takes it for a startup packet of absurd length and hangs up.
        while sock.recv(4096):
            pass
    assert proc.stop() == 0
    records = proc.records()
    find(records, "analyzer", "DirectTLS")
    assert not messages(records)
    find(records, "analyzer", "SessionEnd")


def test_unix_socket_target(analyzer, pg):
    proc = analyzer(target=str(pg.socket_dir / f".s.PGSQL.{pg.port}"))
    result = psql(pg, proc.port, "-A", "-t", "-c", "select 'via unix'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via unix"
    assert proc.stop() == 0
    find(proc.records(), "server", "DataRow", values=["via unix"])


# --- TLS termination ---


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA:TRUE certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def ssl_pg() -> Iterator[tuple[Cluster, Path]]:
    """A PostgreSQL cluster with ssl = on and its certificate (the key is next to it, .key).

    The test roles log in as on the `pg` cluster: scramuser with scram-sha-256, postgres
    trusted.
    """
    cluster = Cluster(tempfile.mkdtemp(prefix="pgmulti-ssl-pg-"))
    try:
        cluster.init()
        cert, key = make_certificate(cluster.base_dir, "server")
        for path in (cert, key):
            give_to_server_user(path)
        with open(cluster.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"\nssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
        cluster.start()
        cluster.create_test_roles()
    except BaseException:
        cluster.destroy()
        raise
    yield cluster, cert
    cluster.destroy()


def test_tls_terminated_both_legs(analyzer, ssl_pg, tmp_path):
    cluster, server_cert = ssl_pg
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key), "--target-ca",
                    str(server_cert), target=f"127.0.0.1:{cluster.port}")
    # The client checks the analyzer's certificate, and sees a TLS session.
    result = psql(cluster, proc.port, "-A", "-t", "-c",
                  "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                  "-c", "select 'secret-free text'",
                  env={"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(cert)})
    assert result.returncode == 0, result.stderr
    # The server leg is TLS too (pg_stat_ssl of the server's connection).
    assert result.stdout.split() == ["t", "secret-free", "text"]
    assert proc.stop() == 0
    records = proc.records()
    assert [(r["direction"], r["type"]) for r in records[:8]] == [
        ("analyzer", "SessionStart"), ("client", "SSLRequest"), ("server", "SSLResponse"),
        ("analyzer", "TLSHandshake"), ("client", "StartupMessage"), ("client", "SSLRequest"),
        ("server", "SSLResponse"), ("analyzer", "TLSHandshake")]
    assert records[2]["fields"] == {"answer": "S", "origin": "analyzer"}
    assert records[3]["fields"]["side"] == "client"
    assert records[3]["fields"]["version"].startswith("TLS")
    assert records[5]["fields"] == {"origin": "analyzer"}
    assert records[6]["fields"] == {"answer": "S"}
    assert records[7]["fields"]["side"] == "server"
    assert find(records, "analyzer", "ServerConnected")["fields"]["tls"] is True
    # Decrypted: the queries and results are readable.
    find(records, "client", "Query", query="select 'secret-free text'")
    find(records, "server", "DataRow", values=["secret-free text"])
    find(records, "server", "ReadyForQuery", status="idle")


def test_tls_client_leg_with_plain_target(analyzer, pg, tmp_path):
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key))
    result = psql(pg, proc.port, "-A", "-t", "-c", "select 40 + 2",
                  env={"PGSSLMODE": "require"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    # Without TLS the client is still served (the analyzer answers its SSLRequest with 'S').
    plain = psql(pg, proc.port, "-A", "-t", "-c", "select 1", env={"PGSSLMODE": "disable"})
    assert plain.stdout.strip() == "1"
    assert proc.stop() == 0
    sessions = by_session(proc.records())
    first = sessions[1]
    assert find(first, "server", "SSLResponse", origin="analyzer")["fields"]["answer"] == "S"
    # The target has no TLS: it says 'N' and the server leg stays plain.
    assert find(first, "server", "SSLResponse", answer="N")["length"] is None
    assert find(first, "analyzer", "ServerConnected")["fields"]["tls"] is False
    find(first, "server", "DataRow", values=["42"])
    assert steps(sessions[2])[0] == ("client", "StartupMessage")


def test_tls_unencrypted_bytes_after_ssl_request_refused(analyzer, pg, tmp_path):
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key))
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        # SSLRequest and, before the answer, a plain StartupMessage (CVE-2021-23214).
        params = b"user\0postgres\0database\0testdb\0\0"
        body = (3 << 16).to_bytes(4, "big") + params
        sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
                     + (len(body) + 4).to_bytes(4, "big") + body)
        assert sock.recv(100) == b""
    assert proc.stop() == 0
    records = proc.records()
    find(records, "analyzer", "ProtocolViolation")
    assert [step for step in steps(records)] == [("client", "SSLRequest")]


def test_tls_target_certificate_checked(analyzer, ssl_pg, tmp_path):
    cluster, _ = ssl_pg
    cert, key = make_certificate(tmp_path, "analyzer")
    # --target-ca is the analyzer's own certificate: the target's does not match it.
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key), "--target-ca", str(cert),
                    target=f"127.0.0.1:{cluster.port}")
    result = psql(cluster, proc.port, "-c", "select 1", env={"PGSSLMODE": "require"})
    assert result.returncode != 0
    assert "could not connect" in result.stderr
    assert proc.stop() == 0
    failed = find(proc.records(), "analyzer", "ServerConnectFailed")
    assert "certificate" in failed["fields"]["error"].lower()


# --- SCRAM channel binding through a TLS-terminating analyzer ---


def scram_login(proc, channel_binding: str, **params) -> str:
    """psycopg as scramuser over TLS; the current_user, or the login error's text."""
    dsn = proc.dsn(user="scramuser", password="scrampass", sslmode="require",
                   channel_binding=channel_binding, gssencmode="disable", **params)
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            return conn.execute("select current_user").fetchone()[0]
    except psycopg.OperationalError as exc:
        return f"error: {exc}"


def test_scram_plus_removed_when_the_analyzer_has_its_own_certificate(analyzer, ssl_pg,
                                                                         tmp_path):
    cluster, server_cert = ssl_pg
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key),
                    target=f"127.0.0.1:{cluster.port}")
    # Without binding, SCRAM works through the relay.
    assert scram_login(proc, "disable") == "scramuser"
    # require: no PLUS offered any more, so libpq itself refuses, before any password.
    required = scram_login(proc, "require")
    assert "channel binding is required, but server did not offer an authentication " \
           "method that supports channel binding" in required
    # prefer: libpq sends 'y', which PostgreSQL refuses because it offered PLUS over TLS.
    preferred = scram_login(proc, "prefer")
    assert "SCRAM channel binding negotiation error" in preferred
    # psql, with libpq's default channel_binding (prefer) and disable.
    result = psql(cluster, proc.port, "-A", "-t", "-U", "scramuser", "-c", "select 1",
                  env={"PGSSLMODE": "require", "PGPASSWORD": "scrampass",
                       "PGCHANNELBINDING": "disable"})
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    assert proc.stop() == 0

    records = proc.records()
    assert "scrampass" not in proc.text()
    sessions = by_session(records)
    for number in sorted(sessions):
        session = sessions[number]
        if not any(r["type"] == "SASLInitialResponse" for r in session):
            continue  # 'require' never got that far
        # The record shows what the server offered; one Rewrite line says what the client got.
        sasl = find(session, "server", "AuthenticationSASL")
        assert sasl["fields"]["mechanisms"] == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        rewrites = [r for r in session if r["type"] == "Rewrite"]
        assert len(rewrites) == 1
        assert rewrites[0]["fields"]["removed"] == "SCRAM-SHA-256-PLUS"
        assert rewrites[0]["fields"]["sent_to_client"] == ["SCRAM-SHA-256"]
        assert session.index(rewrites[0]) == session.index(sasl) + 1
    flags = [find(session, "client", "SASLInitialResponse")["fields"]["channel_binding"]
             for session in sessions.values()
             if any(r["type"] == "SASLInitialResponse" for r in session)]
    assert flags == ["n", "y", "n"]
    refused = next(session for session in sessions.values()
                   if any(r["type"] == "Note" for r in session))
    assert "gs2 flag 'y'" in find(refused, "analyzer", "Note")["fields"]["note"]
    assert find(refused, "server", "ErrorResponse")["fields"]["message"] == \
        "SCRAM channel binding negotiation error"
    # The session 'require' ended at the client, after the (rewritten) mechanism list.
    early = sessions[2]
    assert [r["type"] for r in messages(early)][-1] == "AuthenticationSASL"
    find(early, "analyzer", "Rewrite")


def test_scram_plus_passes_with_the_servers_own_certificate(analyzer, ssl_pg):
    cluster, server_cert = ssl_pg
    proc = analyzer("--tls-cert", str(server_cert), "--tls-key",
                    str(server_cert.with_suffix(".key")), target=f"127.0.0.1:{cluster.port}")
    assert scram_login(proc, "require") == "scramuser"
    assert scram_login(proc, "prefer") == "scramuser"
    assert proc.stop() == 0
    records = proc.records()
    assert not [r for r in records if r["type"] in ("Rewrite", "Note")]
    initial = [r["fields"] for r in records if r["type"] == "SASLInitialResponse"]
    assert [(f["mechanism"], f["channel_binding"]) for f in initial] == [
        ("SCRAM-SHA-256-PLUS", "p=tls-server-end-point")] * 2
    assert len([r for r in records if r["type"] == "AuthenticationOk"]) == 2


def test_plain_server_leg_keeps_default_channel_binding_working(analyzer, ssl_pg, tmp_path):
    cluster, _ = ssl_pg
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key), "--target-sslmode",
                    "disable", target=f"127.0.0.1:{cluster.port}")
    assert scram_login(proc, "prefer") == "scramuser"
    assert "channel binding is required" in scram_login(proc, "require")
    assert proc.stop() == 0
    records = proc.records()
    assert find(records, "analyzer", "ServerConnected")["fields"]["tls"] is False
    assert find(records, "server", "AuthenticationSASL")["fields"]["mechanisms"] == [
        "SCRAM-SHA-256"]
    assert find(records, "client", "SASLInitialResponse")["fields"]["channel_binding"] == "y"
    assert not [r for r in records if r["type"] == "Rewrite"]


def test_target_sslmode_require_refuses_a_plain_target(analyzer, pg, tmp_path):
    cert, key = make_certificate(tmp_path, "analyzer")
    proc = analyzer("--tls-cert", str(cert), "--tls-key", str(key), "--target-sslmode",
                    "require")
    result = psql(pg, proc.port, "-c", "select 1", env={"PGSSLMODE": "require"})
    assert result.returncode != 0 and "has no TLS" in result.stderr
    assert proc.stop() == 0
    failed = find(proc.records(), "analyzer", "ServerConnectFailed")
    assert "--target-sslmode require" in failed["fields"]["error"]
