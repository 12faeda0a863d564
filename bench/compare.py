#!/usr/bin/env python3
"""Interleaved pgbench comparison of PostgreSQL direct, PgBouncer, Pgpool-II and pgmulti."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
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

TARGETS = ("direct", "pgbouncer", "pgmulti", "pgpool")
BASELINES = ("direct", "pgbouncer")  # ratios are taken against these
BENCH_DB = "bench"
BENCH_USER = "bench"
START_TIMEOUT_S = 20.0
CHECK_TIMEOUT_S = 30.0
# pgbench may run past -T: connecting, and finishing the transactions under way.
PGBENCH_GRACE_S = 60.0
RECOMMENDED_ROUNDS = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    pgbench_args: tuple[str, ...]
    # tpcb appends to pgbench_history: each run starts from it empty, as pgbench without -n does.
    resets_history: bool


WORKLOADS = {
    "select": Workload("select", "built-in select-only (-S)", ("-S",), resets_history=False),
    "tpcb": Workload("tpcb", "built-in TPC-B-like", (), resets_history=True),
}


class TargetUnavailable(Exception):
    """A target could not be started or does not answer a query."""


@dataclass
class Target:
    name: str
    port: int
    # The proxy process, whose CPU time is measured; None for PostgreSQL itself.
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def proxy_cpu_seconds(self) -> float | None:
        return None if self.process is None else tree_cpu_seconds(self.process.pid)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Run:
    workload: str
    round: int
    position: int  # place of the target in this round's order
    target: str
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    proxy_cpu_us_per_txn: float | None = None
    server_cpu_us_per_txn: float | None = None
    error: str | None = None


# --- command line ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench through each target in rotating order; medians and same-round ratios.")
    parser.add_argument("--targets", default="direct,pgbouncer,pgmulti",
                        help=f"comma-separated, from {','.join(TARGETS)} (default: %(default)s)")
    parser.add_argument("--pgpool", action="store_true", help="add pgpool to --targets")
    parser.add_argument("--workloads", default="select,tpcb",
                        help=f"comma-separated, from {','.join(WORKLOADS)} (default: %(default)s)")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple",
                        help="pgbench -M (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="pgbench -c (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default: %(default)s)")
    parser.add_argument("--duration", type=int, default=30,
                        help="seconds per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=RECOMMENDED_ROUNDS,
                        help="runs per target and workload (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="unrecorded seconds per target and workload first; 0: none (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default: %(default)s)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="default_pool_size of PgBouncer and pgmulti (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="result file (default: bench/results/compare-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args(argv)
    args.targets = split_choices(parser, "--targets", args.targets, TARGETS)
    if args.pgpool and "pgpool" not in args.targets:
        args.targets.append("pgpool")
    args.workloads = split_choices(parser, "--workloads", args.workloads, WORKLOADS)
    for option in ("clients", "jobs", "duration", "rounds", "scale", "pool_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.rounds < RECOMMENDED_ROUNDS:
        print(f"note: {args.rounds} rounds; medians want at least {RECOMMENDED_ROUNDS}", file=sys.stderr)
    return args


def split_choices(parser: argparse.ArgumentParser, option: str, text: str, choices) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        parser.error(f"{option}: unknown or empty {unknown or text!r}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(names))  # without repeats, in the order given


# --- processes and CPU time ---


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


def launch(name: str, command: list[str], workdir: Path, port: int, *, drop_root: bool,
           env: dict[str, str] | None = None) -> Target:
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
    target = Target(name, port, process, log_path)
    try:
        wait_until_listening(process, port, START_TIMEOUT_S)
    except ClusterError as exc:
        stop_process(process)
        raise TargetUnavailable(f"could not start: {exc}\n{target.log_tail()}") from None
    return target


def target_workdir(root: Path, name: str) -> Path:
    workdir = root / name
    workdir.mkdir()
    give_to_server_user(workdir)  # the servers we start as postgres write here
    return workdir


def pooler_ini(pg: Cluster, workdir: Path, port: int, args: argparse.Namespace) -> str:
    """One pgbouncer.ini, read by PgBouncer and pgmulti alike, so both pool the same way."""
    return f"""\
[databases]
{BENCH_DB} = host={pg.host} port={pg.port} dbname={BENCH_DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir = {workdir}
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {args.pool_size}
max_client_conn = {max(100, args.clients + 20)}
logfile =
log_connections = 0
log_disconnections = 0
"""


def write_pooler_files(pg: Cluster, workdir: Path, port: int, args: argparse.Namespace) -> Path:
    (workdir / "userlist.txt").write_text(f'"{BENCH_USER}" ""\n')
    ini = workdir / "pooler.ini"
    ini.write_text(pooler_ini(pg, workdir, port, args))
    return ini


def start_pgbouncer(pg: Cluster, root: Path, args: argparse.Namespace) -> Target:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise TargetUnavailable("pgbouncer is not installed")
    workdir, port = target_workdir(root, "pgbouncer"), find_free_port()
    ini = write_pooler_files(pg, workdir, port, args)
    return launch("pgbouncer", [binary, str(ini)], workdir, port, drop_root=True)


def start_pgmulti(pg: Cluster, root: Path, args: argparse.Namespace) -> Target:
    workdir, port = target_workdir(root, "pgmulti"), find_free_port()
    ini = write_pooler_files(pg, workdir, port, args)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_DIR / "src"), os.environ.get("PYTHONPATH")]))
    return launch("pgmulti", [sys.executable, "-m", "pgmulti", str(ini)], workdir, port,
                  drop_root=False, env=clean_env(PYTHONPATH=pythonpath))


def pgpool_conf(pg: Cluster, workdir: Path, port: int, pcp_port: int, args: argparse.Namespace) -> str:
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
        "backend_hostname0": f"'{pg.host}'",
        "backend_port0": pg.port,
        "backend_weight0": 1,
        "backend_flag0": "'DISALLOW_TO_FAILOVER'",
        # A child serves one client at a time: one per pgbench client, plus room for our check.
        "num_init_children": args.clients + 4,
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


def start_pgpool(pg: Cluster, root: Path, args: argparse.Namespace) -> Target:
    binary = shutil.which("pgpool") or "/usr/sbin/pgpool"
    if not Path(binary).exists():
        raise TargetUnavailable("pgpool is not installed")
    if args.clients + 4 > 180:
        raise TargetUnavailable("pgpool needs a server connection per client: too many clients")
    workdir, port = target_workdir(root, "pgpool"), find_free_port()
    conf, pcp_conf, hba = workdir / "pgpool.conf", workdir / "pcp.conf", workdir / "pool_hba.conf"
    conf.write_text(pgpool_conf(pg, workdir, port, find_free_port(), args))
    pcp_conf.write_text("")
    hba.write_text("")
    command = [binary, "-n", "-f", str(conf), "-F", str(pcp_conf), "-a", str(hba)]
    return launch("pgpool", command, workdir, port, drop_root=True)


def check_serves(target: Target, pg: Cluster) -> None:
    """One query through the target, so a broken proxy is reported before the rounds."""
    try:
        result = subprocess.run(
            [str(pg.bindir / "psql"), "-X", "-A", "-t", "-w", "-h", HOST, "-p", str(target.port),
             "-U", BENCH_USER, "-d", BENCH_DB, "-c", "SELECT count(*) FROM pgbench_branches"],
            env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        raise TargetUnavailable(f"no answer to a query within {CHECK_TIMEOUT_S:g} s") from None
    if result.returncode != 0:
        raise TargetUnavailable(f"query failed: {result.stderr.strip()}")


STARTERS = {"pgbouncer": start_pgbouncer, "pgmulti": start_pgmulti, "pgpool": start_pgpool}


def start_targets(names: list[str], pg: Cluster, root: Path, args: argparse.Namespace,
                  stack: contextlib.ExitStack) -> tuple[list[Target], dict[str, str]]:
    """The targets that answer a query, in the order given, and why the others cannot run."""
    targets, unavailable = [], {}
    for name in names:
        try:
            target = Target(name, pg.port) if name == "direct" else STARTERS[name](pg, root, args)
            if target.process is not None:
                stack.callback(stop_process, target.process)
            check_serves(target, pg)
        except TargetUnavailable as exc:
            unavailable[name] = str(exc)
            print(f"{name}: unavailable: {exc}", file=sys.stderr)
            continue
        targets.append(target)
    return targets, unavailable


# --- pgbench ---


# pgbench's summary lines: field -> (pattern, type). Before PostgreSQL 14 tps said
# "excluding connections establishing"; before 15 there was no failed-transactions line.
PGBENCH_FIELDS = {
    "tps": (r"^tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)", float),
    "latency_ms": (r"^latency average = ([\d.]+) ms", float),
    "transactions": (r"^number of transactions actually processed: (\d+)", int),
    "failed_transactions": (r"^number of failed transactions: (\d+)", int),
}


def parse_pgbench(output: str) -> dict[str, float | int | None]:
    values = {}
    for field, (pattern, convert) in PGBENCH_FIELDS.items():
        match = re.search(pattern, output, re.MULTILINE)
        values[field] = convert(match.group(1)) if match else None
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


def run_pgbench(target: Target, workload: Workload, duration: int, pg: Cluster,
                args: argparse.Namespace) -> subprocess.CompletedProcess:
    command = [
        str(pg.bindir / "pgbench"), "-n", "-T", str(duration), "-c", str(args.clients),
        "-j", str(args.jobs), "-M", args.protocol, *workload.pgbench_args,
        "-h", HOST, "-p", str(target.port), "-U", BENCH_USER, BENCH_DB,
    ]
    return subprocess.run(command, env=clean_env(PGCONNECT_TIMEOUT="10"), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=duration + PGBENCH_GRACE_S,
                          check=False)


def measure(target: Target, workload: Workload, duration: int, pg: Cluster,
            args: argparse.Namespace, round_number: int, position: int) -> Run:
    """One pgbench run through `target`, with the CPU its proxy and the server spent on it."""
    run = Run(workload.name, round_number, position, target.name)
    if workload.resets_history:
        reset_history(pg)
    server_pid = pg.postmaster_pid()
    proxy_before, server_before = target.proxy_cpu_seconds(), tree_cpu_seconds(server_pid)
    try:
        result = run_pgbench(target, workload, duration, pg, args)
    except subprocess.TimeoutExpired:
        run.error = f"pgbench did not finish within {duration + PGBENCH_GRACE_S:g} s"
        return run
    proxy_after, server_after = target.proxy_cpu_seconds(), tree_cpu_seconds(server_pid)
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


def rotated(targets: list[Target], round_number: int) -> list[Target]:
    """Round r starts at target r mod n, so no target always runs first or last."""
    start = round_number % len(targets)
    return targets[start:] + targets[:start]


def run_workload(workload: Workload, targets: list[Target], pg: Cluster,
                 args: argparse.Namespace) -> tuple[list[Run], dict[str, str]]:
    """All rounds of one workload; a target that fails a run is dropped from the rest."""
    failed: dict[str, str] = {}
    if args.warmup:
        for target in targets:
            warmup = measure(target, workload, args.warmup, pg, args, -1, 0)
            if warmup.error:
                failed[target.name] = warmup.error
                report_progress(warmup)
    runs = []
    for round_number in range(args.rounds):
        for position, target in enumerate(rotated(targets, round_number)):
            if target.name in failed:
                continue
            run = measure(target, workload, args.duration, pg, args, round_number, position)
            report_progress(run)
            runs.append(run)
            if run.error:
                failed[target.name] = run.error
    return runs, failed


def report_progress(run: Run) -> None:
    label = "warm-up" if run.round < 0 else f"round {run.round + 1}"
    if run.error:
        outcome = f"FAILED: {run.error}"
    else:
        cpu = "" if run.proxy_cpu_us_per_txn is None else f", proxy {run.proxy_cpu_us_per_txn:.1f} µs/txn"
        outcome = f"{run.tps:.1f} tps, {run.latency_ms:.3f} ms{cpu}"
    print(f"{run.workload} {label} {run.target}: {outcome}", file=sys.stderr, flush=True)


# --- summary ---


def median_of(runs: list[Run], metric: str) -> float | None:
    values = [getattr(run, metric) for run in runs if getattr(run, metric) is not None]
    return statistics.median(values) if values else None


def same_round_ratios(runs: list[Run], target: str, baseline: str, metric: str) -> list[float]:
    """target/baseline for each round where both have the metric: both ran minutes apart at most."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        value = getattr(run, metric)
        if value is not None:
            by_round.setdefault(run.round, {})[run.target] = value
    return [values[target] / values[baseline] for values in by_round.values()
            if target in values and values.get(baseline)]


def summarize_workload(runs: list[Run], names: list[str], unavailable: dict[str, str],
                       failed: dict[str, str]) -> dict:
    targets = {}
    for name in names:
        own = [run for run in runs if run.target == name and run.error is None]
        if name in unavailable:
            targets[name] = {"status": "unavailable", "reason": unavailable[name]}
        elif name in failed and not own:
            targets[name] = {"status": "failed", "reason": failed[name]}
        else:
            targets[name] = {
                "status": "failed" if name in failed else "ok",
                "reason": failed.get(name),
                "runs": len(own),
                "tps": median_of(own, "tps"),
                "latency_ms": median_of(own, "latency_ms"),
                "failed_transactions": sum(run.failed_transactions or 0 for run in own),
                "proxy_cpu_us_per_txn": median_of(own, "proxy_cpu_us_per_txn"),
                "server_cpu_us_per_txn": median_of(own, "server_cpu_us_per_txn"),
            }
    ratios = {}
    for name, baseline in ratio_pairs(names):
        pair = {}
        for metric in ("tps", "proxy_cpu_us_per_txn"):
            values = same_round_ratios(runs, name, baseline, metric)
            if values:
                pair[metric] = statistics.median(values)
        if pair:
            ratios[f"{name}/{baseline}"] = pair
    return {"targets": targets, "ratios": ratios}


def ratio_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(target, baseline) for every proxy against each baseline other than itself."""
    return [(name, baseline) for baseline in BASELINES for name in names
            if name != baseline and name != "direct"]


def first_line(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = (result.stdout or result.stderr).strip()
    return output.splitlines()[0] if result.returncode == 0 and output else None


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
        },
        "git": {"sha": git_sha, "dirty": bool(git_status.stdout.strip()) if git_sha else None},
        "versions": {
            "postgresql": pg.psql("SHOW server_version"),
            "pgbench": first_line([str(pg.bindir / "pgbench"), "--version"]),
            "pgbouncer": first_line([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"]),
            "pgpool": first_line([shutil.which("pgpool") or "/usr/sbin/pgpool", "--version"]),
            "pgmulti": PGMULTI_VERSION,
        },
    }


# --- output ---


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    settings = report["settings"]
    for name, summary in report["summary"].items():
        workload = WORKLOADS[name]
        print(f"\n{name}: {workload.description}, -M {settings['protocol']}, {settings['clients']} clients, "
              f"{settings['jobs']} threads, {settings['rounds']} rounds x {settings['duration_s']} s; medians")
        header = ("target", "tps", "lat ms", "failed", "proxy µs/txn", "server µs/txn",
                  "tps/direct", "tps/pgbouncer", "cpu/pgbouncer")
        print("{:<10} {:>10} {:>8} {:>7} {:>13} {:>14} {:>11} {:>14} {:>14}".format(*header))
        for target, row in summary["targets"].items():
            if row["status"] != "ok" and "runs" not in row:
                print(f"{target:<10} {row['status']}: {row['reason'].splitlines()[0]}")
                continue
            vs_direct = summary["ratios"].get(f"{target}/direct", {})
            vs_bouncer = summary["ratios"].get(f"{target}/pgbouncer", {})
            print("{:<10} {:>10} {:>8} {:>7} {:>13} {:>14} {:>11} {:>14} {:>14}".format(
                target, fmt(row["tps"], ".1f"), fmt(row["latency_ms"], ".3f"), row["failed_transactions"],
                fmt(row["proxy_cpu_us_per_txn"], ".1f"), fmt(row["server_cpu_us_per_txn"], ".1f"),
                fmt(vs_direct.get("tps"), ".3f"), fmt(vs_bouncer.get("tps"), ".3f"),
                fmt(vs_bouncer.get("proxy_cpu_us_per_txn"), ".3f")))
            if row["status"] == "failed":
                print(f"{'':<10} failed after {row['runs']} runs: {row['reason']}")


def default_json_path() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_DIR / "bench" / "results" / f"compare-{stamp}.json"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# --- main ---


def raise_on_termination() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every process we started is stopped."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


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


def benchmark(args: argparse.Namespace) -> dict:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        root = make_workdir(args.keep, stack)
        pg = Cluster(root / "pg")
        stack.callback(pg.stop)
        pg.init()
        pg.start()
        init_pgbench(pg, args.scale)
        targets, unavailable = start_targets(args.targets, pg, root, args, stack)
        if not targets:
            raise SystemExit("no target could run")
        runs, summary = [], {}
        for name in args.workloads:
            workload_runs, failed = run_workload(WORKLOADS[name], targets, pg, args)
            runs += workload_runs
            summary[name] = summarize_workload(workload_runs, args.targets, unavailable, failed)
        return {
            "started_at": started_at,
            **environment(pg),
            "settings": {
                "targets": args.targets, "workloads": args.workloads, "protocol": args.protocol,
                "clients": args.clients, "jobs": args.jobs, "duration_s": args.duration,
                "rounds": args.rounds, "warmup_s": args.warmup, "scale": args.scale,
                "pool_size": args.pool_size, "pool_mode": "transaction",
            },
            "summary": summary,
            "runs": [asdict(run) for run in runs],
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_termination()
    try:
        report = benchmark(args)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); all processes stopped", file=sys.stderr)
        return 130
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    path = args.json or default_json_path()
    write_json(report, path)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
