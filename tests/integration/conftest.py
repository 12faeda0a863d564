"""Integration fixtures: a session PostgreSQL cluster (`pg`) and pgmulti processes (`pgmulti`)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest

from pgmulti.cluster import (
    HOST,
    Cluster,
    ClusterError,
    clean_env,
    find_free_port,
    stop_process,
    wait_until_listening,
)

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
PSQL_TIMEOUT_S = 20.0  # below the 30 s test timeout, so the psql call is what reports it

DEFAULT_DATABASES = {
    "testdb": "host=127.0.0.1 port={pg_port} dbname=testdb",
    "postgres": "host=127.0.0.1 port={pg_port} dbname=postgres",
}
DEFAULT_SETTINGS = {
    "listen_addr": "127.0.0.1",
    "listen_port": "{listen_port}",
    "unix_socket_dir": "{tmp}",
    "auth_type": "trust",
    "auth_file": "{auth_file}",
    "admin_users": "postgres",
    "stats_users": "stats",
    "pool_mode": "transaction",
    "default_pool_size": "5",
    "logfile": "",
    # One process, so pool limits and SHOW output are exact; worker tests set their own.
    "workers": "1",
}
# userlist.txt entries; passwords in plain text (PgBouncer also takes md5 and SCRAM secrets).
DEFAULT_USERS = {
    "postgres": "",
    "md5user": "md5pass",
    "scramuser": "scrampass",
    "passuser": "plainpass",
    "stats": "",
    "plainuser": "",
}

Config = str | Mapping[str, object] | None


# --- config text ---


def _ini_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # PgBouncer's spelling
    return str(value)


def _merged(defaults: Mapping[str, str], overrides: Mapping[str, object]) -> dict[str, str]:
    """defaults updated by overrides; an override of None removes the key."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _ini_value(value)
    return merged


def render_ini(sections: Mapping[str, Mapping[str, str]]) -> str:
    blocks = []
    for section, entries in sections.items():
        lines = [f"[{section}]"] + [f"{key} = {value}".rstrip() for key, value in entries.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def base_config(*, databases: Mapping[str, object] | None = None, **settings: object) -> str:
    """The default test config as ini text; keyword arguments override [pgbouncer] keys.

    `databases` entries are merged into [databases]. None removes a key. The text keeps the
    {pg_port} {pg_host} {listen_port} {auth_file} {tmp} placeholders, filled in at start.
    """
    return render_ini(
        {
            "databases": _merged(DEFAULT_DATABASES, databases or {}),
            "pgbouncer": _merged(DEFAULT_SETTINGS, settings),
        }
    )


def userlist(**passwords: str | None) -> str:
    """The default userlist.txt text; keyword arguments set passwords, None removes a user."""
    entries = _merged(DEFAULT_USERS, passwords)
    return "".join(f'"{user}" "{password}"\n' for user, password in entries.items())


def _config_text(config: Config) -> str:
    """Text is used as given; a mapping overrides base_config(); None is base_config()."""
    if config is None:
        return base_config()
    if isinstance(config, str):
        return config
    return base_config(**config)


# --- the proxy process ---


class Proc:
    """One `python -m pgmulti CONFIG` process with its own directory, config and log."""

    host = HOST

    def __init__(self, workdir: Path, port: int, pg: Cluster):
        self.workdir = workdir
        self.port = port
        self.pg = pg
        self.config_path = workdir / "pgmulti.ini"
        self.auth_file = workdir / "userlist.txt"
        self.log_path = workdir / "pgmulti.log"
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def render(self, text: str) -> str:
        """Fill in the placeholders; other braces in the text stay as they are."""
        values = {
            "pg_port": self.pg.port,
            "pg_host": self.pg.host,
            "listen_port": self.port,
            "auth_file": self.auth_file,
            "tmp": self.workdir,
        }
        for name, value in values.items():
            text = text.replace("{" + name + "}", str(value))
        return text

    def write_config(self, config: Config = None) -> None:
        """(Re)write pgmulti.ini, e.g. before .signal(signal.SIGHUP)."""
        self.config_path.write_text(self.render(_config_text(config)))

    def write_users(self, users: str | None = None) -> None:
        self.auth_file.write_text(self.render(users if users is not None else userlist()))

    def start(self, args: tuple[str, ...] = ()) -> None:
        # Our tree first, so the process runs the code under test, as the tests import it.
        pythonpath = os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pgmulti", *args, str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(PYTHONPATH=pythonpath),
                start_new_session=True,  # its own group: Ctrl-C stays ours, workers die with it
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        assert self.popen is not None, "not started"
        wait_until_listening(self.popen, self.port, timeout)

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen, STOP_TIMEOUT_S)

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None, "not started"
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; subprocess.TimeoutExpired if still running after `timeout` s."""
        assert self.popen is not None, "not started"
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def dsn(self, user: str = "postgres", db: str = "postgres", password: str | None = None) -> str:
        """A postgresql:// URL to the proxy over TCP."""
        credentials = quote(user, safe="")
        if password is not None:
            credentials += ":" + quote(password, safe="")
        return f"postgresql://{credentials}@{self.host}:{self.port}/{quote(db, safe='')}"

    def psql(
        self,
        sql: str,
        user: str = "postgres",
        db: str = "postgres",
        password: str | None = None,
        timeout: float = PSQL_TIMEOUT_S,
    ) -> subprocess.CompletedProcess:
        """psql -X -A -t -c SQL through the proxy; never prompts, result returned unchecked."""
        env = clean_env(PGCONNECT_TIMEOUT="10")
        if password is not None:
            env["PGPASSWORD"] = password
        return subprocess.run(
            [self.pg.bindir / "psql", "-X", "-A", "-t", "-w", "-h", self.host, "-p", str(self.port),
             "-U", user, "-d", db, "-c", sql],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# --- fixtures ---


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """A running PostgreSQL cluster with the test roles and testdb, shared by the session."""
    # Not under pytest's tmp_path: its root is private to root, and the server runs as postgres.
    cluster = Cluster(tempfile.mkdtemp(prefix="pgmulti-pg-"))
    try:
        cluster.init()
        cluster.start()
        cluster.create_test_roles()
    except BaseException:
        cluster.destroy()
        raise
    yield cluster
    cluster.destroy()


@pytest.fixture(autouse=True)
def _pg_log_on_failure(request: pytest.FixtureRequest, failure_log) -> None:
    """A failing test that used `pg` shows what the server logged during it."""
    if "pg" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("pg")
    start = len(cluster.log_text())
    failure_log("postgres log during the test", lambda: cluster.log_text()[start:])


@pytest.fixture(name="base_config")
def _base_config_fixture() -> Callable[..., str]:
    """base_config(**overrides) -> ini text, for tests (conftest modules are not importable)."""
    return base_config


@pytest.fixture(name="userlist")
def _userlist_fixture() -> Callable[..., str]:
    """userlist(**passwords) -> userlist.txt text."""
    return userlist


@pytest.fixture
def pgmulti(pg: Cluster, tmp_path: Path, failure_log) -> Iterator[Callable[..., Proc]]:
    """Factory: pgmulti(config=None, users=None, *, port=None, args=(), wait=True) -> Proc.

    config: ini text (placeholders allowed), a mapping of [pgbouncer] overrides for
    base_config(), or None for base_config(). users: userlist.txt text, None for userlist().
    port: listen port (default: a free one). wait=False returns without waiting for the port,
    for tests of failed starts. Every process is stopped at teardown; a failing test shows
    their logs.
    """
    started: list[Proc] = []
    counter = itertools.count()

    def start(
        config: Config = None,
        users: str | None = None,
        *,
        port: int | None = None,
        args: tuple[str, ...] = (),
        wait: bool = True,
    ) -> Proc:
        workdir = tmp_path / f"pgmulti{next(counter)}"
        workdir.mkdir()
        proc = Proc(workdir, port if port is not None else find_free_port(), pg)
        proc.write_config(config)
        proc.write_users(users)
        proc.start(args)
        started.append(proc)
        failure_log(f"pgmulti log ({workdir.name}, port {proc.port})", proc.log_text)
        if wait:
            try:
                proc.wait_ready()
            except ClusterError as exc:
                message = f"pgmulti did not start: {exc} (its log is shown below)"
                raise pytest.fail.Exception(message, pytrace=False) from None
        return proc

    yield start
    for proc in started:
        proc.stop()

