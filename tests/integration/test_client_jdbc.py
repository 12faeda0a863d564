"""The PostgreSQL JDBC driver (pgjdbc) through transaction pooling, with server-side statements.

tests/clients/jdbc/PgmultiJdbcCheck.java is compiled into a temporary directory and run with
prepareThreshold=5, so its PreparedStatements become named server-side statements that pgmulti
must rewrite and prepare on whichever of its two servers a transaction lands on. The same
program runs against PostgreSQL directly as a control.

Needs `java`, `javac` and the driver jar (found in the local Maven repository, or fetched with
`mvn dependency:get`); the tests skip, saying what is missing, when the toolchain is not there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from pgmulti.cluster import clean_env

PGJDBC_VERSION = "42.7.13"
PGJDBC_ARTIFACT = f"org.postgresql:postgresql:{PGJDBC_VERSION}"
PGJDBC_JAR = (Path.home() / ".m2" / "repository" / "org" / "postgresql" / "postgresql"
              / PGJDBC_VERSION / f"postgresql-{PGJDBC_VERSION}.jar")
SOURCE = Path(__file__).resolve().parents[1] / "clients" / "jdbc" / "PgmultiJdbcCheck.java"
MAIN_CLASS = "PgmultiJdbcCheck"

MVN_TIMEOUT_S = 120
JAVAC_TIMEOUT_S = 60
RUN_TIMEOUT_S = 25
# The first test of a session may fetch the jar and compile; the run itself takes a few seconds.
FIRST_RUN_TIMEOUT_S = MVN_TIMEOUT_S + JAVAC_TIMEOUT_S + RUN_TIMEOUT_S + 15

# Two servers for three and more JDBC connections: statements must follow clients around.
PROXY_CONFIG = {"pool_mode": "transaction", "default_pool_size": 2}
EXPECTED_LINES = (
    "autocommit: ok runs=20 server-prepared=true",
    "prepared-on-server: ok",
    "transaction-rollback: ok rounds=3",
    "transaction-commit: ok rows=6",
    "error-recovery: ok",
    "batch: ok rows=260",
    "cross-servers: ok",
    "concurrent: ok threads=4 iterations=40",
)
CROSSED = "cross-servers: ok b-servers=2 b1-is-c=true b2-is-a=true"
EXPECTED_ROWS = {"batch": 260, "kept": 6}  # the "tx" rows are all rolled back

pytestmark = [pytest.mark.slow, pytest.mark.timeout(FIRST_RUN_TIMEOUT_S)]


def _pgjdbc_jar() -> Path:
    """The driver jar; fetched into the local Maven repository if missing; skip if impossible."""
    override = os.environ.get("PGJDBC_JAR")
    if override:
        if not Path(override).is_file():
            pytest.skip(f"PGJDBC_JAR={override} does not exist")
        return Path(override)
    if PGJDBC_JAR.is_file():
        return PGJDBC_JAR
    mvn = shutil.which("mvn")
    if mvn is None:
        pytest.skip(f"pgjdbc {PGJDBC_VERSION} is not at {PGJDBC_JAR} and Maven is not installed")
    try:
        result = subprocess.run(
            [mvn, "-B", "-q", "-Dstyle.color=never", "dependency:get",
             f"-Dartifact={PGJDBC_ARTIFACT}", "-Dtransitive=false"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MVN_TIMEOUT_S,
            check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"mvn dependency:get {PGJDBC_ARTIFACT} took over {MVN_TIMEOUT_S} s")
    if not PGJDBC_JAR.is_file():
        text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)  # colour codes
        errors = [line for line in text.splitlines() if "ERROR" in line]
        pytest.skip(f"pgjdbc {PGJDBC_VERSION} is not at {PGJDBC_JAR} and "
                    f"mvn dependency:get could not fetch it (exit {result.returncode}): "
                    f"{errors[0] if errors else 'no error message'}")
    return PGJDBC_JAR


@pytest.fixture(scope="session")
def jdbc_classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Classpath with the driver jar and the compiled check program."""
    java, javac = shutil.which("java"), shutil.which("javac")
    if java is None or javac is None:
        pytest.skip("a JDK (java and javac) is not installed")
    jar = _pgjdbc_jar()
    out_dir = tmp_path_factory.mktemp("jdbc-classes")
    result = subprocess.run(
        [javac, "-encoding", "UTF-8", "--release", "17", "-cp", str(jar), "-d", str(out_dir),
         str(SOURCE)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=JAVAC_TIMEOUT_S,
        check=False)
    if result.returncode == 2 and "release" in result.stderr and "17" in result.stderr:
        pytest.skip(f"javac cannot compile for Java 17: {result.stderr.strip()}")
    assert result.returncode == 0, f"javac failed:\n{result.stdout}{result.stderr}"
    return os.pathsep.join([str(jar), str(out_dir)])


@pytest.fixture
def table(pg):
    """A fresh, ordinary (not temporary) table for the program to fill; dropped afterwards."""
    name = f"jdbc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, val text NOT NULL,"
                     " grp text NOT NULL)")
    yield name
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def jdbc_url(host: str, port: int) -> str:
    return (f"jdbc:postgresql://{host}:{port}/testdb?user=postgres&prepareThreshold=5"
            "&connectTimeout=5&loginTimeout=10&socketTimeout=20")


def run_check(classpath: str, url: str, table: str, scenario: str = "main") -> list[str]:
    """Run the program; fail with its output unless it exits 0 and prints ALL OK."""
    java = shutil.which("java")
    try:
        result = subprocess.run(
            [java, "-cp", classpath, MAIN_CLASS, url, table, scenario],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
            check=False, env=clean_env())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the JDBC program ran over {RUN_TIMEOUT_S} s; output so far:\n"
                    f"{exc.stdout or ''}{exc.stderr or ''}", pytrace=False)
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == "ALL OK", output
    if scenario == "main":
        for expected in EXPECTED_LINES:
            assert any(line.startswith(expected) for line in lines), f"no {expected!r} in\n{output}"
    return lines


def line_for(lines: list[str], prefix: str) -> str:
    return next(line for line in lines if line.startswith(prefix))


def servers_used(line: str) -> int:
    """The N of a "... servers=N" line: distinct backend pids seen."""
    return int(re.search(r"servers=(\d+)", line).group(1))


def rows_by_group(pg, table: str) -> dict[str, int]:
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        return dict(conn.execute(f"SELECT grp, count(*) FROM {table} GROUP BY grp").fetchall())


def test_jdbc_direct_control(jdbc_classpath, pg, table):
    lines = run_check(jdbc_classpath, jdbc_url(pg.host, pg.port), table)
    # One backend per connection: B never changes server.
    assert "b-servers=1 " in line_for(lines, "cross-servers:")
    assert servers_used(line_for(lines, "concurrent:")) == 4
    assert rows_by_group(pg, table) == EXPECTED_ROWS


def test_jdbc_through_transaction_pooling(jdbc_classpath, pgmulti, pg, table):
    proxy = pgmulti(PROXY_CONFIG)
    lines = run_check(jdbc_classpath, jdbc_url(proxy.host, proxy.port), table)
    # B's named statement ran on both servers, the second one prepared on demand.
    assert line_for(lines, "cross-servers:") == CROSSED
    # Never more backends than the pool has (PostgreSQL directly: one per connection).
    assert servers_used(line_for(lines, "concurrent:")) <= 2
    assert rows_by_group(pg, table) == EXPECTED_ROWS
    # The proxy took it all in its stride and still serves.
    assert "Traceback" not in proxy.log_text()
    result = proxy.psql("SELECT 41 + 1", db="testdb")
    assert result.stdout.strip() == "42", result.stderr




def test_jdbc_named_statement_after_failed_transaction_direct_control(jdbc_classpath, pg, table):
    lines = run_check(jdbc_classpath, jdbc_url(pg.host, pg.port), table, "aborted-transaction")
    assert "aborted-transaction: ok b-first-on-a=false b-after-on-a=false" in lines


def test_jdbc_named_statement_after_failed_transaction_through_pooling(jdbc_classpath, pgmulti,
                                                                       table):
    proxy = pgmulti(PROXY_CONFIG)
    url = jdbc_url(proxy.host, proxy.port)
    lines = run_check(jdbc_classpath, url, table, "aborted-transaction")
    assert "aborted-transaction: ok b-first-on-a=false b-after-on-a=true" in lines
