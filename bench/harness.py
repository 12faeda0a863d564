"""Benchmark plumbing: start the targets, run pgbench through them in rotating rounds, measure CPU."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "src"))  # run from a checkout, installed or not

from pgmulti.__version__ import __version__ as PGMULTI_VERSION  # noqa: E402
from pgmulti.cluster import (  # noqa: E402
    HOST,
    Cluster,
    ClusterError,
    clean_env,
    find_free_port,
    give_to_server_user,
    process_tree,
    server_user_popen_kwargs,
    stop_process,
    wait_until_listening,
)

from scraper import MetricsScraper, fetch_metrics  # noqa: E402  (bench/ is on sys.path)

BENCH_DB = "bench"
BENCH_USER = "bench"
START_TIMEOUT_S = 20.0
CHECK_TIMEOUT_S = 30.0
WORKERS_TIMEOUT_S = 10.0
# pgbench may run past -T: connecting, and finishing the transactions under way.
PGBENCH_GRACE_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PGBOUNCER_BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
PGPOOL_BINARY = shutil.which("pgpool") or "/usr/sbin/pgpool"


class TargetUnavailable(Exception):
    """A target could not be started, or does not do what its spec asks (workers, metrics)."""


@dataclass(frozen=True)
class TargetSpec:
    """One thing pgbench connects to: a kind of server and the settings it runs with."""
    name: str                  # label in the tables, e.g. "pgmulti w=2"
    kind: str                  # direct | pgbouncer | pgmulti | pgpool
    settings: tuple[tuple[str, str], ...] = ()  # extra [pgbouncer] keys, after the shared ones
    tls: bool = False          # client_tls_sslmode = require with the bench certificate
    metrics: bool = False      # metrics_port set, scraped once a second during each run
    workers: int = 1           # pgmulti worker processes (`workers` key); checked after start


@dataclass(frozen=True)
class Workload:
    """One row of a table: a pgbench invocation."""
    name: str
    pgbench_args: tuple[str, ...]  # e.g. ("-S", "-M", "simple")
    clients: int = 16
    env: tuple[tuple[str, str], ...] = ()  # e.g. (("PGSSLMODE", "require"),)
    # tpcb appends to pgbench_history: each run starts from it empty, as pgbench without -n does.
    resets_history: bool = False


@dataclass
class Target:
    spec: TargetSpec
    port: int
    # The proxy process, whose CPU time is measured; None for PostgreSQL itself.
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    metrics_url: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def cpu_seconds(self) -> float | None:
        return None if self.process is None else tree_cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int | None:
        return None if self.process is None else tree_rss_bytes(self.process.pid)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Run:
    table: str
    workload: str
    target: str
    round: int     # -1: warm-up
    position: int  # place of the target in this round's order
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    proxy_cpu_us_per_txn: float | None = None
    server_cpu_us_per_txn: float | None = None
    metrics_scrapes: int | None = None
    metrics_scrape_failures: int | None = None
    error: str | None = None


@dataclass
class Bench:
    """What every table shares: the PostgreSQL cluster, the work directory, the settings."""
    pg: Cluster
    root: Path
    args: object  # the parsed command line
    tls_files: tuple[Path, Path] | None = None  # (cert, key), made on first use
    pgbouncer_version: tuple[int, ...] | None = None
    environment: dict = field(default_factory=dict)


# --- processes: CPU and memory from /proc ---


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants, reaped children included."""
    ticks = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # ended meanwhile: its time is now in its parent's cutime/cstime
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (shared pages counted per process)."""
    pages = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/statm") as statm:
                pages += int(statm.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * PAGE_SIZE


# --- starting targets ---


def make_workdir(keep: bool, stack: contextlib.ExitStack) -> Path:
    # Under /tmp, not a private directory: the servers run as postgres and must reach it.
    root = Path(tempfile.mkdtemp(prefix="pgmulti-bench-"))
    root.chmod(0o755)
    give_to_server_user(root)
    if keep:
        stack.callback(print, f"work directory kept: {root}", file=sys.stderr)
    else:
        stack.callback(shutil.rmtree, root, True)
    return root


def launch(name: str, command: list[str], workdir: Path, port: int, *, drop_root: bool,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start a proxy in the foreground, output to workdir/<name>.log; wait until it listens."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env or clean_env(),
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            **(server_user_popen_kwargs() if drop_root else {}),
        )
    try:
        wait_until_listening(process, port, START_TIMEOUT_S)
    except ClusterError as exc:
        stop_process(process)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise TargetUnavailable(f"could not start: {exc}\n{tail}") from None
    return process, log_path


def tls_files(bench: Bench) -> tuple[Path, Path]:
    """A throwaway CA's certificate for 127.0.0.1, readable by PgBouncer (run as postgres) too."""
    if bench.tls_files is None:
        from pgmulti.certs import CertificateAuthority

        directory = bench.root / "tls"
        ca = CertificateAuthority(directory, "pgmulti bench CA", days=2)
        issued = ca.issue("proxy", "localhost", ("localhost", HOST))
        for path in (directory, issued.cert_file, issued.key_file):
            give_to_server_user(path)
        bench.tls_files = (issued.cert_file, issued.key_file)
    return bench.tls_files


def pooler_ini(bench: Bench, spec: TargetSpec, workdir: Path, port: int, max_clients: int) -> str:
    """pgbouncer.ini for PgBouncer and pgmulti alike; pgmulti-only keys come from the spec."""
    settings = {
        "listen_addr": HOST,
        "listen_port": port,
        "unix_socket_dir": workdir,
        "auth_type": "trust",
        "auth_file": workdir / "userlist.txt",
        "pool_mode": "transaction",
        "default_pool_size": bench.args.pool_size,
        "max_client_conn": max(100, max_clients + 20),
        "logfile": "",
        "log_connections": 0,
        "log_disconnections": 0,
    }
    if spec.kind == "pgmulti":
        settings["workers"] = spec.workers  # 0 would mean one per core: always say it
    if spec.tls:
        cert, key = tls_files(bench)
        settings.update(client_tls_sslmode="require", client_tls_cert_file=cert, client_tls_key_file=key)
    settings.update(dict(spec.settings))
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return f"[databases]\n{BENCH_DB} = host={bench.pg.host} port={bench.pg.port} dbname={BENCH_DB}\n\n[pgbouncer]\n{lines}"


def write_pooler_files(bench: Bench, spec: TargetSpec, workdir: Path, port: int, max_clients: int) -> Path:
    (workdir / "userlist.txt").write_text(f'"{BENCH_USER}" ""\n')
    ini = workdir / "pooler.ini"
    ini.write_text(pooler_ini(bench, spec, workdir, port, max_clients))
    return ini


def start_pgbouncer(bench: Bench, spec: TargetSpec, workdir: Path, max_clients: int) -> Target:
    if not Path(PGBOUNCER_BINARY).exists():
        raise TargetUnavailable("pgbouncer is not installed")
    port = find_free_port()
    ini = write_pooler_files(bench, spec, workdir, port, max_clients)
    process, log = launch("pgbouncer", [PGBOUNCER_BINARY, str(ini)], workdir, port, drop_root=True)
    return Target(spec, port, process, log)


def start_pgmulti(bench: Bench, spec: TargetSpec, workdir: Path, max_clients: int) -> Target:
    port = find_free_port()
    metrics_port = None
    if spec.metrics:
        metrics_port = find_free_port()
        spec = replace(spec, settings=spec.settings + (("metrics_port", str(metrics_port)),))
    ini = write_pooler_files(bench, spec, workdir, port, max_clients)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_DIR / "src"), os.environ.get("PYTHONPATH")]))
    process, log = launch("pgmulti", [sys.executable, "-m", "pgmulti", str(ini)], workdir, port,
                          drop_root=False, env=clean_env(PYTHONPATH=pythonpath))
    url = f"http://{HOST}:{metrics_port}/metrics" if metrics_port else None
    return Target(spec, port, process, log, metrics_url=url)


def pgpool_conf(bench: Bench, workdir: Path, port: int, pcp_port: int, max_clients: int) -> str:
    """Pgpool-II 4.x in raw mode with connection caching: one child per client, no failover."""
    settings = {
        "backend_clustering_mode": "'raw'",
        "listen_addresses": f"'{HOST}'",
        "port": port,
        "socket_dir": f"'{workdir}'",
        "pcp_listen_addresses": "''",
        "pcp_port": pcp_port,
        "pcp_socket_dir": f"'{workdir}'",
        "wd_ipc_socket_dir": f"'{workdir}'",
        "backend_hostname0": f"'{bench.pg.host}'",
        "backend_port0": bench.pg.port,
        "backend_weight0": 1,
        "backend_flag0": "'DISALLOW_TO_FAILOVER'",
        # A child serves one client at a time: one per pgbench client, plus room for our check.
        "num_init_children": max_clients + 4,
        "max_pool": 1,
        "connection_cache": "on",
        "child_life_time": 0,
        "connection_life_time": 0,
        "child_max_connections": 0,
        "load_balance_mode": "off",
        "enable_pool_hba": "off",
        "pool_passwd": "''",
        "health_check_period": 0,
        "sr_check_period": 0,
        "failover_on_backend_error": "off",
        "use_watchdog": "off",
        "memory_cache_enabled": "off",
        "log_destination": "'stderr'",
        "log_min_messages": "warning",
        "logdir": f"'{workdir}'",
        "pid_file_name": f"'{workdir / 'pgpool.pid'}'",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def start_pgpool(bench: Bench, spec: TargetSpec, workdir: Path, max_clients: int) -> Target:
    if not Path(PGPOOL_BINARY).exists():
        raise TargetUnavailable("pgpool is not installed")
    if max_clients + 4 > 180:
        raise TargetUnavailable("pgpool needs a server connection per client: too many clients")
    port = find_free_port()
    conf, pcp_conf, hba = workdir / "pgpool.conf", workdir / "pcp.conf", workdir / "pool_hba.conf"
    conf.write_text(pgpool_conf(bench, workdir, port, find_free_port(), max_clients))
    pcp_conf.write_text("")
    hba.write_text("")
    command = [PGPOOL_BINARY, "-n", "-f", str(conf), "-F", str(pcp_conf), "-a", str(hba)]
    process, log = launch("pgpool", command, workdir, port, drop_root=True)
    return Target(spec, port, process, log)


STARTERS = {"pgbouncer": start_pgbouncer, "pgmulti": start_pgmulti, "pgpool": start_pgpool}


def psql_through(target: Target, bench: Bench, sql: str) -> subprocess.CompletedProcess:
    env = clean_env(PGCONNECT_TIMEOUT="10", PGSSLMODE="require" if target.spec.tls else "prefer")
    return subprocess.run(
        [str(bench.pg.bindir / "psql"), "-X", "-A", "-t", "-w", "-h", HOST, "-p", str(target.port),
         "-U", BENCH_USER, "-d", BENCH_DB, "-c", sql],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CHECK_TIMEOUT_S, check=False,
    )


def check_serves(target: Target, bench: Bench) -> None:
    """One query through the target, so a broken proxy is reported before the rounds."""
    try:
        result = psql_through(target, bench, "SELECT count(*) FROM pgbench_branches")
    except subprocess.TimeoutExpired:
        raise TargetUnavailable(f"no answer to a query within {CHECK_TIMEOUT_S:g} s") from None
    if result.returncode != 0:
        raise TargetUnavailable(f"query failed: {result.stderr.strip()}")


def check_workers(target: Target) -> None:
    """`workers = N > 1` must give N worker processes under the parent; else it is not built yet."""
    wanted = target.spec.workers
    if target.spec.kind != "pgmulti" or wanted <= 1:
        return
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    while True:
        found = len(process_tree(target.process.pid)) - 1
        if found >= wanted:
            return
        if time.monotonic() > deadline:
            raise TargetUnavailable(f"workers = {wanted} not in effect: {found} worker processes")
        time.sleep(0.1)


def check_metrics(target: Target) -> None:
    if target.metrics_url is None:
        return
    try:
        fetch_metrics(target.metrics_url)
    except OSError as exc:
        raise TargetUnavailable(f"metrics_port set but GET /metrics failed: {exc}") from None


def start_target(spec: TargetSpec, bench: Bench, stack: contextlib.ExitStack, label: str,
                 max_clients: int) -> Target:
    """A running target that answered a query; TargetUnavailable with the reason otherwise."""
    if spec.kind == "direct":
        target = Target(spec, bench.pg.port)
    else:
        workdir = bench.root / f"{label}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec.name)}"
        workdir.mkdir()
        give_to_server_user(workdir)  # the servers we start as postgres write here
        target = STARTERS[spec.kind](bench, spec, workdir, max_clients)
        stack.callback(stop_process, target.process)
    check_serves(target, bench)
    check_workers(target)
    check_metrics(target)
    return target


def start_targets(specs: list[TargetSpec], bench: Bench, stack: contextlib.ExitStack, label: str,
                  max_clients: int) -> tuple[list[Target], dict[str, str]]:
    """The targets that answer a query, in the order given, and why the others cannot run."""
    targets, unavailable = [], {}
    for spec in specs:
        try:
            targets.append(start_target(spec, bench, stack, label, max_clients))
        except TargetUnavailable as exc:
            unavailable[spec.name] = str(exc)
            print(f"{label}: {spec.name}: unavailable: {exc}", file=sys.stderr, flush=True)
    return targets, unavailable


# --- pgbench ---


# pgbench's summary lines: field -> (pattern, type). Before PostgreSQL 14 tps said
# "excluding connections establishing"; with -C it says "including reconnection times";
# before 15 there was no failed-transactions line.
PGBENCH_FIELDS = {
    "tps": (r"^tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing"
            r"|including reconnection times|including connections establishing)\)", float),
    "latency_ms": (r"^latency average = ([\d.]+) ms", float),
    "transactions": (r"^number of transactions actually processed: (\d+)", int),
    "failed_transactions": (r"^number of failed transactions: (\d+)", int),
}


def parse_pgbench(output: str) -> dict[str, float | int | None]:
    values = {}
    for name, (pattern, convert) in PGBENCH_FIELDS.items():
        match = re.search(pattern, output, re.MULTILINE)
        values[name] = convert(match.group(1)) if match else None
    if values["failed_transactions"] is None and values["transactions"] is not None:
        values["failed_transactions"] = 0
    return values


def pgbench_error(result: subprocess.CompletedProcess) -> str:
    """The most telling line of a failed pgbench run."""
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "FATAL" in line]
    return (errors or lines or [f"exit code {result.returncode}"])[0]


def init_pgbench(pg: Cluster, scale: int) -> None:
    pg.psql(f"CREATE ROLE {BENCH_USER} LOGIN")
    pg.psql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}")
    result = subprocess.run(
        [str(pg.bindir / "pgbench"), "-i", "-q", "-s", str(scale), "-h", pg.host, "-p", str(pg.port),
         "-U", BENCH_USER, BENCH_DB],
        env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120 + 60 * scale, check=False,
    )
    if result.returncode != 0:
        raise ClusterError(f"pgbench -i failed: {result.stderr.strip()}")


def reset_history(pg: Cluster) -> None:
    """What pgbench does before a TPC-B run unless -n, done directly so every target gets it."""
    pg.psql("VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history;", db=BENCH_DB)


def run_pgbench(target: Target, workload: Workload, duration: int, bench: Bench) -> subprocess.CompletedProcess:
    jobs = min(bench.args.jobs, workload.clients)
    command = [
        str(bench.pg.bindir / "pgbench"), "-n", "-T", str(duration), "-c", str(workload.clients),
        "-j", str(jobs), *workload.pgbench_args,
        "-h", HOST, "-p", str(target.port), "-U", BENCH_USER, BENCH_DB,
    ]
    env = clean_env(PGCONNECT_TIMEOUT="10", **dict(workload.env))
    return subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=duration + PGBENCH_GRACE_S, check=False)


def measure(table: str, target: Target, workload: Workload, duration: int, bench: Bench,
            round_number: int, position: int) -> Run:
    """One pgbench run through `target`, with the CPU its proxy and the server spent on it."""
    run = Run(table, workload.name, target.name, round_number, position)
    if workload.resets_history:
        reset_history(bench.pg)
    scraper = MetricsScraper(target.metrics_url) if target.metrics_url else contextlib.nullcontext()
    server_pid = bench.pg.postmaster_pid()
    with scraper:
        proxy_before, server_before = target.cpu_seconds(), tree_cpu_seconds(server_pid)
        try:
            result = run_pgbench(target, workload, duration, bench)
        except subprocess.TimeoutExpired:
            run.error = f"pgbench did not finish within {duration + PGBENCH_GRACE_S:g} s"
            return run
        proxy_after, server_after = target.cpu_seconds(), tree_cpu_seconds(server_pid)
    if isinstance(scraper, MetricsScraper):
        run.metrics_scrapes, run.metrics_scrape_failures = scraper.scrapes, scraper.failures
    values = parse_pgbench(result.stdout)
    if result.returncode != 0 or values["tps"] is None:
        run.error = pgbench_error(result)
        return run
    run.tps, run.latency_ms = values["tps"], values["latency_ms"]
    run.transactions, run.failed_transactions = values["transactions"], values["failed_transactions"]
    if run.transactions:
        run.server_cpu_us_per_txn = (server_after - server_before) * 1e6 / run.transactions
        if proxy_before is not None:
            run.proxy_cpu_us_per_txn = (proxy_after - proxy_before) * 1e6 / run.transactions
    return run


# --- interleaved rounds ---


def rotated(items: list, round_number: int) -> list:
    """Round r starts at item r mod n, so no target always runs first or last."""
    start = round_number % len(items)
    return items[start:] + items[:start]


def report_progress(run: Run) -> None:
    label = "warm-up" if run.round < 0 else f"round {run.round + 1}"
    if run.error:
        outcome = f"FAILED: {run.error}"
    else:
        cpu = "" if run.proxy_cpu_us_per_txn is None else f", proxy {run.proxy_cpu_us_per_txn:.1f} µs/txn"
        outcome = f"{run.tps:.1f} tps, {run.latency_ms:.3f} ms{cpu}"
    print(f"{run.table} {run.workload} {label} {run.target}: {outcome}", file=sys.stderr, flush=True)


@dataclass
class TableRuns:
    """Everything one interleaved table run produced."""
    runs: list[Run]
    specs: list[TargetSpec]
    workloads: list[Workload]
    unavailable: dict[str, str]                 # target -> why it did not start
    unsupported: dict[tuple[str, str], str]     # (workload, target) -> why it was not run
    failed: dict[tuple[str, str], str]          # (workload, target) -> pgbench's error


def run_table(label: str, specs: list[TargetSpec], workloads: list[Workload], bench: Bench,
              unsupported=lambda spec, workload: None) -> TableRuns:
    """Every (workload, target) pair once per round, target order rotated each round.

    `unsupported(spec, workload)` returns why a pair cannot run (it is then reported, not run).
    A pair whose run fails is dropped from the later rounds.
    """
    args = bench.args
    with contextlib.ExitStack() as stack:
        targets, unavailable = start_targets(specs, bench, stack, label, max(w.clients for w in workloads))
        skipped = {(w.name, s.name): reason for w in workloads for s in specs
                   if s.name not in unavailable and (reason := unsupported(s, w))}
        failed: dict[tuple[str, str], str] = {}

        def pairs(workload: Workload, round_number: int):
            for position, target in enumerate(rotated(targets, round_number)):
                key = (workload.name, target.name)
                if key not in skipped and key not in failed:
                    yield position, target, key

        runs = []
        for round_number in ([-1] if args.warmup else []) + list(range(args.rounds)):
            duration = args.warmup if round_number < 0 else args.duration
            for workload in workloads:
                for position, target, key in pairs(workload, max(round_number, 0)):
                    run = measure(label, target, workload, duration, bench, round_number, position)
                    report_progress(run)
                    if run.error:
                        failed[key] = run.error
                    if round_number >= 0:
                        runs.append(run)
    return TableRuns(runs, specs, workloads, unavailable, skipped, failed)


# --- summaries ---


def median_of(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def cell(table: TableRuns, workload: str, target: str) -> dict:
    """Medians of one (workload, target) pair, or why it has none."""
    if target in table.unavailable:
        return {"status": "unavailable", "reason": table.unavailable[target]}
    if (workload, target) in table.unsupported:
        return {"status": "unsupported", "reason": table.unsupported[(workload, target)]}
    own = [run for run in table.runs if (run.workload, run.target) == (workload, target) and not run.error]
    failure = table.failed.get((workload, target))
    if not own:
        return {"status": "failed", "reason": failure or "no run"}
    return {
        "status": "failed" if failure else "ok",
        "reason": failure,
        "runs": len(own),
        "tps": median_of(run.tps for run in own),
        "latency_ms": median_of(run.latency_ms for run in own),
        "failed_transactions": sum(run.failed_transactions or 0 for run in own),
        "proxy_cpu_us_per_txn": median_of(run.proxy_cpu_us_per_txn for run in own),
        "server_cpu_us_per_txn": median_of(run.server_cpu_us_per_txn for run in own),
    }


def same_round_ratio(table: TableRuns, numerator: tuple[str, str], denominator: tuple[str, str],
                     metric: str) -> float | None:
    """Median over rounds of numerator/denominator, each (workload, target), from the same round.

    Both ran at most minutes apart, so the ratio cancels most of a shared machine's drift.
    """
    by_round: dict[int, dict[tuple[str, str], float]] = {}
    for run in table.runs:
        value = getattr(run, metric)
        if value is not None and not run.error:
            by_round.setdefault(run.round, {})[(run.workload, run.target)] = value
    ratios = [values[numerator] / values[denominator] for values in by_round.values()
              if numerator in values and values.get(denominator)]
    return statistics.median(ratios) if ratios else None


# --- environment ---


def first_line(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = (result.stdout or result.stderr).strip()
    return output.splitlines()[0] if result.returncode == 0 and output else None


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    match = re.search(r"(\d+(?:\.\d+)+)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(pg: Cluster) -> dict:
    git_sha = first_line(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"])
    git_status = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=False)
    return {
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpu_model": cpu_model(),
            "nproc": os.cpu_count(),
            "nproc_available": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "git": {"sha": git_sha, "dirty": bool(git_status.stdout.strip()) if git_sha else None},
        "versions": {
            "postgresql": pg.psql("SHOW server_version"),
            "pgbench": first_line([str(pg.bindir / "pgbench"), "--version"]),
            "pgbouncer": first_line([PGBOUNCER_BINARY, "--version"]),
            "pgpool": first_line([PGPOOL_BINARY, "--version"]),
            "pgmulti": PGMULTI_VERSION,
        },
    }
