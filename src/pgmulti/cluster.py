"""Throwaway local PostgreSQL clusters and the process helpers that run servers beside them."""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

HOST = "127.0.0.1"
SUPERUSER = "postgres"
# PostgreSQL (and PgBouncer, Pgpool-II) refuse to run as root; when we are root they run as this.
SERVER_OS_USER = "postgres"
# Below Linux's ephemeral range (32768 and up), so our own outgoing connections never take them.
PORT_RANGE = (20000, 32000)

# role -> (password, password_encryption it is stored with); None: no password (trust only).
TEST_ROLES: dict[str, tuple[str | None, str | None]] = {
    "md5user": ("md5pass", "md5"),
    "scramuser": ("scrampass", "scram-sha-256"),
    "passuser": ("plainpass", "scram-sha-256"),
    "plainuser": (None, None),
}
TEST_DATABASE = "testdb"
# pg_hba method per role for TCP logins; every other role is trusted.
HBA_METHODS = {"md5user": "md5", "scramuser": "scram-sha-256", "passuser": "password"}
LOOPBACK_NETWORKS = ("127.0.0.1/32", "::1/128")

INITDB_TIMEOUT_S = 120
PG_CTL_TIMEOUT_S = 60
PSQL_TIMEOUT_S = 60
SETTINGS_FILE = "pgmulti.conf"


class ClusterError(RuntimeError):
    """A cluster or helper process could not be set up, started or stopped."""


def find_free_port(host: str = HOST, attempts: int = 200) -> int:
    """A random port in PORT_RANGE that nothing listens on right now."""
    for _ in range(attempts):
        port = random.randint(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free port in {PORT_RANGE} on {host} after {attempts} tries")


def _version_key(bindir: str) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin paths."""
    version = Path(bindir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl: $PGMULTI_PG_BINDIR, pg_config, newest Debian, PATH."""
    candidates: list[Path] = []
    if os.environ.get("PGMULTI_PG_BINDIR"):
        candidates.append(Path(os.environ["PGMULTI_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates.extend(Path(path) for path in debian)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise ClusterError("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql")


def server_user_popen_kwargs() -> dict:
    """subprocess arguments that drop root to SERVER_OS_USER; empty when we are not root."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam(SERVER_OS_USER)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def give_to_server_user(path: Path) -> None:
    """Make a directory we created usable by the servers we start as SERVER_OS_USER."""
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_OS_USER)
        os.chown(path, account.pw_uid, account.pw_gid)


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without PG* variables, which would override the settings we pass."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(extra)
    return env


def process_tree(pid: int) -> list[int]:
    """pid followed by all its live descendants, found by scanning /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # the process ended while we looked
        # The command name may hold spaces and ')': the fixed fields start after the last ')'.
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[parent].append(int(stat_path.split("/")[2]))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def _listening_socket_inodes(port: int) -> set[str]:
    """Inodes of TCP sockets in LISTEN state on `port`, any address, IPv4 or IPv6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as table_file:
                rows = table_file.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local_address.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def is_listening(port: int, pids: list[int] | None = None) -> bool:
    """Whether a TCP socket listens on `port`; with `pids`, one that those processes hold.

    Read from /proc rather than by connecting, so the server under test never sees a probe client.
    """
    inodes = _listening_socket_inodes(port)
    if pids is None or not inodes:
        return bool(inodes)
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return False


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 15.0) -> None:
    """Wait until `process` (or a child of it) listens on `port`; ClusterError if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"process {process.pid} exited with code {process.returncode}")
        if is_listening(port, process_tree(process.pid)):
            return
        time.sleep(0.05)
    raise ClusterError(f"process {process.pid} did not listen on port {port} within {timeout:g} s")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGQUIT, then SIGKILL to the process and its group, each with a bounded wait.

    `process` must have been started with start_new_session=True: its group then holds its
    workers and nothing of ours.
    """
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGQUIT, 3.0)):
        if process.poll() is not None:
            break
        process.send_signal(sig)
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Leftover workers (or a parent that ignored both signals) die with the group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(5.0)


def _stop_postmaster(pg_ctl: str, data_dir: str, popen_kwargs: dict) -> None:
    """Last-resort shutdown at interpreter exit for a cluster that was never stopped."""
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        subprocess.run(
            [pg_ctl, "-D", data_dir, "-m", "immediate", "-w", "-t", "20", "stop"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
            env=clean_env(),
            **popen_kwargs,
        )


class Cluster:
    """A local PostgreSQL cluster in `base_dir`: data in data/, log and Unix socket beside it."""

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None, *, auth_setup: bool = True):
        """auth_setup: TCP logins of the test roles need md5/SCRAM/password; else all trusted."""
        self.base_dir = Path(base_dir).resolve()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        self.log_path = self.base_dir / "postgresql.log"
        self.host = HOST
        self.port = port if port is not None else find_free_port()
        self.auth_setup = auth_setup
        self._port_was_chosen = port is None
        self._bindir: Path | None = None
        self._finalizer: weakref.finalize | None = None

    # --- lifecycle ---

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb (unless done before) and write our settings and pg_hba.conf."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)  # other OS users (clients, PgBouncer) reach the socket
        give_to_server_user(self.base_dir)
        if not self.is_initialized():
            self._run_as_server_user(
                [self.bindir / "initdb", "-D", self.data_dir, "-U", SUPERUSER, "-E", "UTF8",
                 "--locale=C", "-A", "trust", "--no-sync"],
                timeout=INITDB_TIMEOUT_S,
                what="initdb",
            )
        self._write_settings()
        self._write_hba()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.is_running():
            return
        for _ in range(3):
            log_offset = self._log_size()
            try:
                self._pg_ctl("start", "-l", self.log_path, "-w", "-t", str(PG_CTL_TIMEOUT_S))
            except ClusterError:
                self.stop()  # pg_ctl may give up while the postmaster still starts
                new_log = self.log_text()[log_offset:]
                if self._port_was_chosen and "could not bind" in new_log:
                    self.port = find_free_port()  # lost a race for the port: take another
                    self._write_settings()
                    continue
                raise ClusterError(f"PostgreSQL did not start; log tail:\n{self.log_tail()}") from None
            self._finalizer = weakref.finalize(
                self, _stop_postmaster, str(self.bindir / "pg_ctl"), str(self.data_dir),
                server_user_popen_kwargs(),
            )
            return
        raise ClusterError(f"PostgreSQL found no free port; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown; immediate if that hangs; SIGKILL as the last resort."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for mode in ("fast", "immediate"):
            if not self.is_running():
                return
            try:
                self._pg_ctl("stop", "-m", mode, "-w", "-t", "30")
            except ClusterError:
                continue
        pid = self.postmaster_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def destroy(self) -> None:
        """Stop the server and delete base_dir."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, owned by another user
        return True

    def postmaster_pid(self) -> int | None:
        """The server's main process id from postmaster.pid; None when there is none."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (FileNotFoundError, ValueError):
            return None

    def __enter__(self) -> Cluster:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- using it ---

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; unaligned tuples-only output."""
        result = subprocess.run(
            [self.bindir / "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", SUPERUSER, "-d", db, "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            timeout=PSQL_TIMEOUT_S,
            env=clean_env(),
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"psql failed ({result.returncode}): {result.stderr.strip()}\nSQL: {sql}")
        return result.stdout.rstrip("\n")

    def create_test_roles(self) -> None:
        """Roles of TEST_ROLES with their passwords stored as named, and database testdb."""
        statements = []
        for role, (password, encryption) in TEST_ROLES.items():
            statements.append(
                f"DO $$BEGIN CREATE ROLE {role} LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END$$;"
            )
            if password is not None:
                # password_encryption decides the stored form: 'md5...' or 'SCRAM-SHA-256$...'.
                statements.append(f"SET password_encryption = '{encryption}';")
                statements.append(f"ALTER ROLE {role} PASSWORD '{password}';")
        self.psql("\n".join(statements))
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{TEST_DATABASE}'"):
            self.psql(f"CREATE DATABASE {TEST_DATABASE} OWNER {SUPERUSER}")
        roles = ", ".join(TEST_ROLES)
        self.psql(
            f"GRANT ALL PRIVILEGES ON DATABASE {TEST_DATABASE} TO {roles};\n"
            f"GRANT ALL ON SCHEMA public TO {roles};",
            db=TEST_DATABASE,
        )

    def password_secret(self, role: str) -> str:
        """The role's stored password: 'md5<hex>' or a 'SCRAM-SHA-256$...' secret (userlist.txt form)."""
        return self.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")

    def dsn(self, user: str = SUPERUSER, db: str = "postgres", password: str | None = None) -> str:
        """A postgresql:// URL over TCP (psql, psycopg and asyncpg all take it)."""
        credentials = quote(user, safe="")
        if password is not None:
            credentials += ":" + quote(password, safe="")
        return f"postgresql://{credentials}@{self.host}:{self.port}/{quote(db, safe='')}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- internals ---

    def _settings(self) -> dict[str, str]:
        return {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "max_prepared_transactions": "100",  # two-phase commit of the multi-main router
            # Throwaway data: speed over durability.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            # Shows each login's auth method, which the auth tests read back.
            "log_connections": "on",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }

    def _write_settings(self) -> None:
        """Our settings live in their own file, included once from postgresql.conf."""
        lines = [f"{name} = {value}" for name, value in self._settings().items()]
        settings_path = self.data_dir / SETTINGS_FILE
        settings_path.write_text("\n".join(lines) + "\n")
        give_to_server_user(settings_path)
        main_conf = self.data_dir / "postgresql.conf"
        include = f"include = '{SETTINGS_FILE}'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as conf:
                conf.write(f"\n{include}\n")

    def _hba_lines(self) -> list[str]:
        lines = ["local all all trust", "local replication all trust"]
        if self.auth_setup:
            for role, method in HBA_METHODS.items():
                lines += [f"host all {role} {network} {method}" for network in LOOPBACK_NETWORKS]
        for network in LOOPBACK_NETWORKS:
            lines += [f"host all all {network} trust", f"host replication all {network} trust"]
        return lines

    def _write_hba(self) -> None:
        (self.data_dir / "pg_hba.conf").write_text("\n".join(self._hba_lines()) + "\n")

    def _pg_ctl(self, *args) -> None:
        self._run_as_server_user(
            [self.bindir / "pg_ctl", "-D", self.data_dir, *args],
            timeout=PG_CTL_TIMEOUT_S + 30,
            what=f"pg_ctl {args[0]}",
        )

    def _run_as_server_user(self, args: list, timeout: float, what: str) -> None:
        try:
            result = subprocess.run(
                [str(arg) for arg in args],
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=clean_env(),
                check=False,
                **server_user_popen_kwargs(),
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{what} did not finish within {timeout:g} s") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise ClusterError(f"{what} failed ({result.returncode}): {output}")

    def _log_size(self) -> int:
        return len(self.log_text())
