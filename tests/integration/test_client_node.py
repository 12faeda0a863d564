"""node-postgres (pg 8) through transaction pooling, with named prepared statements.

tests/clients/node/check.js runs pg.Client named statements from three clients at once on a
pool of two servers, a transaction, errors followed by more named statements, and pg.Pool. The
same script runs against PostgreSQL directly as a control.

`npm install` of tests/clients/node/package.json goes to a cache directory keyed by the
file's contents (~/.cache/pgmulti-tests/node/KEY, or $PGMULTI_TEST_CACHE/node/KEY) and is
reused; nothing is installed in the source tree. The tests skip, saying why, when Node, npm or
the registry is not available.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from pgmulti.cluster import clean_env

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
SCRIPT = CLIENT_DIR / "check.js"
PACKAGE_JSON = CLIENT_DIR / "package.json"

MIN_NODE_MAJOR = 16
NPM_TIMEOUT_S = 120
RUN_TIMEOUT_S = 25
# The first test of a session may run npm install; the script itself takes a second or two.
FIRST_RUN_TIMEOUT_S = NPM_TIMEOUT_S + RUN_TIMEOUT_S + 15

PROXY_CONFIG = {"pool_mode": "transaction", "default_pool_size": 2}
EXPECTED_LINES = (
    "concurrent-named: ok clients=3 runs=60",
    "cross-servers: ok",
    "transaction: ok committed=5 rolled-back=3",
    "error-recovery: ok",
    "pool: ok queries=50",
)

CROSSED = "cross-servers: ok b-servers=2 b1-is-c=true b2-is-a=true"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(FIRST_RUN_TIMEOUT_S)]


def _cache_root() -> Path:
    base = os.environ.get("PGMULTI_TEST_CACHE")
    if base:
        return Path(base) / "node"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pgmulti-tests" / "node"


def _installed(directory: Path) -> bool:
    return (directory / "node_modules" / "pg" / "package.json").is_file()


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """node_modules with pg installed from package.json, cached across runs."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js (node) is not installed")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        pytest.skip(f"node-postgres 8 needs Node.js {MIN_NODE_MAJOR}+; "
                    f"`node --version` says {version!r}")
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    package = PACKAGE_JSON.read_bytes()
    target = _cache_root() / hashlib.sha256(package).hexdigest()[:16]
    if _installed(target):
        return target / "node_modules"

    # Install beside the target and move it in place, so a half-done install is never used.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / "package.json").write_bytes(package)
    try:
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--ignore-scripts",
             "--loglevel=error"],
            cwd=staging, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=NPM_TIMEOUT_S, check=False, env=clean_env())
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"npm install of {PACKAGE_JSON.name} took over {NPM_TIMEOUT_S} s")
    if result.returncode != 0 or not _installed(staging):
        shutil.rmtree(staging, ignore_errors=True)
        head = " | ".join((result.stderr or result.stdout).strip().splitlines()[:4])
        pytest.skip(f"npm install of {PACKAGE_JSON} failed (exit {result.returncode}): {head}")
    try:
        staging.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
        if not _installed(target):
            raise
    return target / "node_modules"


@pytest.fixture
def table(pg):
    """A fresh, ordinary (not temporary) table for the script; dropped afterwards."""
    name = f"node_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, val text NOT NULL,"
                     " grp text NOT NULL)")
    yield name
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def run_check(node_modules: Path, host: str, port: int, table: str,
              scenario: str = "main") -> list[str]:
    """Run check.js; fail with its output unless it exits 0 and prints ALL OK."""
    try:
        result = subprocess.run(
            [shutil.which("node"), str(SCRIPT), host, str(port), table, scenario],
            cwd=node_modules.parent, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=RUN_TIMEOUT_S, check=False, env=clean_env(NODE_PATH=str(node_modules)))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"check.js ran over {RUN_TIMEOUT_S} s; output so far:\n"
                    f"{exc.stdout or ''}{exc.stderr or ''}", pytrace=False)
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == "ALL OK", output
    return lines


def line_for(lines: list[str], prefix: str) -> str:
    return next(line for line in lines if line.startswith(prefix))


def check_main_output(lines: list[str]) -> None:
    for expected in EXPECTED_LINES:
        assert any(line.startswith(expected) for line in lines), (expected, lines)


def servers_used(line: str) -> int:
    """The N of a "... servers=N" line: distinct backend pids seen."""
    return int(re.search(r"servers=(\d+)", line).group(1))


def rows_by_group(pg, table: str) -> dict[str, int]:
    with psycopg.connect(pg.dsn(db="testdb"), autocommit=True) as conn:
        return dict(conn.execute(f"SELECT grp, count(*) FROM {table} GROUP BY grp").fetchall())


def test_node_direct_control(node_modules, pg, table):
    lines = run_check(node_modules, pg.host, pg.port, table)
    check_main_output(lines)
    assert "b-servers=1 " in line_for(lines, "cross-servers:")  # one backend per client
    assert servers_used(line_for(lines, "concurrent-named:")) == 3
    assert servers_used(line_for(lines, "pool:")) == 5
    assert rows_by_group(pg, table) == {"committed": 5}


def test_node_through_transaction_pooling(node_modules, pgmulti, pg, table):
    proxy = pgmulti(PROXY_CONFIG)
    lines = run_check(node_modules, proxy.host, proxy.port, table)
    check_main_output(lines)
    # B's named statement ran on both servers, prepared on the second one on demand.
    assert line_for(lines, "cross-servers:") == CROSSED
    # Never more backends than the pool has (PostgreSQL directly: one per client).
    assert servers_used(line_for(lines, "concurrent-named:")) <= 2
    assert servers_used(line_for(lines, "pool:")) <= 2
    assert rows_by_group(pg, table) == {"committed": 5}
    assert "Traceback" not in proxy.log_text()
    result = proxy.psql("SELECT 41 + 1", db="testdb")
    assert result.stdout.strip() == "42", result.stderr




def test_node_named_statement_after_failed_transaction_direct_control(node_modules, pg, table):
    lines = run_check(node_modules, pg.host, pg.port, table, "aborted-transaction")
    assert "aborted-transaction: ok b-first-on-a=false b-after-on-a=false" in lines


def test_node_named_statement_after_failed_transaction_through_pooling(node_modules, pgmulti,
                                                                       table):
    proxy = pgmulti(PROXY_CONFIG)
    lines = run_check(node_modules, proxy.host, proxy.port, table, "aborted-transaction")
    assert "aborted-transaction: ok b-first-on-a=false b-after-on-a=true" in lines
