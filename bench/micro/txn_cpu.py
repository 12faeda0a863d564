#!/usr/bin/env python3
"""Proxy CPU per transaction, pgmulti against PgBouncer, under the same pgbench load.

Starts one throwaway PostgreSQL, one PgBouncer and one pgmulti (`workers = 1`) with the same
pooling settings (transaction mode, pool 20), then runs `pgbench -S -M simple -c 16 -T 10`
against each in turn, ROUNDS rounds, reading each proxy's utime+stime from /proc before and
after, and prints µs of proxy CPU per transaction for each and its ratio to the first target
per round. The machine may be shared: compare within one run only. With more clients than
the pool has servers (-c 64) most transactions queue for a server.

    python bench/micro/txn_cpu.py [--rounds 3] [--duration 10] [-c 16]
    python bench/micro/txn_cpu.py -c 64 --baseline-src /tmp/old/src   # before and after
    python bench/micro/txn_cpu.py -C           # connection churn: CPU per login+transaction
    python bench/micro/txn_cpu.py --targets pgbouncer,pgmulti,relay   # and uvloop's floor
    python bench/micro/txn_cpu.py -C --targets pgbouncer,pgmulti,login  # a login's floor
    python bench/micro/txn_cpu.py --hold 300   # start everything, print pids/ports, wait
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_DIR / "src"))
from pgmulti.cluster import (  # noqa: E402
    HOST, Cluster, clean_env, find_free_port, give_to_server_user, server_user_popen_kwargs,
    stop_process, wait_until_listening)

BENCH_DB = BENCH_USER = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def options(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("-c", "--clients", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("-M", "--protocol", default="simple",
                        choices=("simple", "extended", "prepared"))
    parser.add_argument("-C", "--connect", action="store_true",
                        help="a new connection per transaction (pgbench -C): login cost")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--mode", default="transaction", choices=("transaction", "session"))
    parser.add_argument("--targets", default="pgbouncer,pgmulti")
    parser.add_argument("--pgmulti-src", default=str(REPO_DIR / "src"),
                        help="src directory of the pgmulti to run (default: this checkout)")
    parser.add_argument("--baseline-src", default="",
                        help="also run the pgmulti in this src directory, as pgmulti-base")
    parser.add_argument("--log-connections", action="store_true",
                        help="log_connections and log_disconnections on (PgBouncer's defaults), "
                             "to a log file and stderr")
    parser.add_argument("--hold", type=int, default=0,
                        help="start the targets, print their pids and ports, wait this long")
    return parser.parse_args(argv)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of the process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat_file:
        fields = stat_file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def pooler_ini(pg: Cluster, workdir: Path, port: int, args) -> str:
    return f"""\
[databases]
{BENCH_DB} = host={pg.host} port={pg.port} dbname={BENCH_DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir = {workdir}
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = {args.mode}
default_pool_size = {args.pool_size}
max_client_conn = {args.clients + 20}
logfile = {workdir / "pooler.log" if args.log_connections else ""}
log_connections = {int(args.log_connections)}
log_disconnections = {int(args.log_connections)}
"""


def start(name: str, pg: Cluster, root: Path, args) -> tuple[subprocess.Popen, int]:
    workdir, port = root / name, find_free_port()
    workdir.mkdir()
    give_to_server_user(workdir)
    (workdir / "userlist.txt").write_text(f'"{BENCH_USER}" ""\n')
    ini = workdir / "pooler.ini"
    text = pooler_ini(pg, workdir, port, args)
    if name == "relay":  # the floor: a bare uvloop relay, no pooling (bare_relay.py)
        command = [sys.executable, str(Path(__file__).with_name("bare_relay.py")), str(port),
                   pg.host, str(pg.port)]
        extra = {"env": clean_env()}
    elif name == "login":  # a login's floor on uvloop: no server at all (bare_login.py)
        command = [sys.executable, str(Path(__file__).with_name("bare_login.py")), str(port)]
        extra = {"env": clean_env()}
    elif name.startswith("pgmulti"):
        ini.write_text(text + "workers = 1\n")
        command = [sys.executable, "-m", "pgmulti", str(ini)]
        src = args.baseline_src if name == "pgmulti-base" else args.pgmulti_src
        extra = {"env": clean_env(PYTHONPATH=src)}
    else:
        ini.write_text(text)
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", str(ini)]
        extra = {"env": clean_env(), **server_user_popen_kwargs()}
    log = open(workdir / f"{name}.log", "ab")
    process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True, **extra)
    wait_until_listening(process, port, 20)
    return process, port


def pgbench(pg: Cluster, port: int, args, duration: int) -> int:
    """Run select-only pgbench (`SELECT 1` from args.script when the login floor runs, which
    cannot answer pgbench's own queries); the number of transactions it made."""
    script = ["-f", str(args.script)] if args.script else ["-S"]
    result = subprocess.run(
        [str(pg.bindir / "pgbench"), "-n", *script, "-M", args.protocol, "-T", str(duration),
         "-c", str(args.clients), "-j", str(args.jobs), "-h", HOST, "-p", str(port),
         "-U", BENCH_USER, BENCH_DB] + (["-C"] if args.connect else []),
        env=clean_env(), capture_output=True, text=True, timeout=duration + 60, check=False)
    match = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()[-500:]}")
    return int(match.group(1))


def bench_cluster(stack: contextlib.ExitStack, prefix: str) -> tuple[Path, Cluster]:
    """A directory and a throwaway PostgreSQL in it with the bench role and database and
    pgbench's tables (scale 1), both gone when the stack closes."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    give_to_server_user(root)
    pg = Cluster(root / "pg")
    pg.init()
    pg.start()
    stack.callback(pg.stop)
    pg.psql(f"CREATE ROLE {BENCH_USER} LOGIN")
    pg.psql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}")
    subprocess.run([str(pg.bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", pg.host,
                    "-p", str(pg.port), "-U", BENCH_USER, BENCH_DB],
                   env=clean_env(), capture_output=True, timeout=120, check=True)
    return root, pg


def main(argv=None) -> int:
    args = options(argv)
    with contextlib.ExitStack() as stack:
        root, pg = bench_cluster(stack, "txn-cpu-")
        targets = {}
        names = args.targets.split(",")
        args.script = None
        if "login" in names:
            args.script = root / "select1.sql"
            args.script.write_text("SELECT 1;\n")
        if args.baseline_src:
            names.append("pgmulti-base")
        for name in names:
            process, port = start(name, pg, root, args)
            stack.callback(stop_process, process)
            targets[name] = (process, port)
            print(f"{name}: pid {process.pid} port {port}", flush=True)
        if args.hold:
            print(f"postgres port {pg.port}; holding {args.hold} s", flush=True)
            time.sleep(args.hold)
            return 0
        for name, (process, port) in targets.items():  # warm-up: connections open
            pgbench(pg, port, args, 2)
        results: dict[str, list[float]] = {name: [] for name in targets}
        for round_number in range(args.rounds):
            order = names[round_number % len(names):] + names[:round_number % len(names)]
            for name in order:
                process, port = targets[name]
                user_before, sys_before = cpu_seconds(process.pid)
                started = time.monotonic()
                transactions = pgbench(pg, port, args, args.duration)
                elapsed = time.monotonic() - started
                user_after, sys_after = cpu_seconds(process.pid)
                user_us = (user_after - user_before) * 1e6 / transactions
                sys_us = (sys_after - sys_before) * 1e6 / transactions
                results[name].append(user_us + sys_us)
                print(f"round {round_number + 1} {name}: {transactions / elapsed:.0f} txn/s, "
                      f"{user_us + sys_us:.2f} µs CPU/txn (user {user_us:.2f}, sys {sys_us:.2f})",
                      flush=True)
            first = results[names[0]][-1]
            for name in names[1:]:
                print(f"round {round_number + 1} ratio {name}/{names[0]}: "
                      f"{results[name][-1] / first:.3f}", flush=True)
        for name, values in results.items():
            print(f"{name}: median {statistics.median(values):.2f} µs CPU/txn over {len(values)} rounds")
        for name in names[1:]:
            ratios = [b / a for a, b in zip(results[names[0]], results[name])]
            print(f"ratio {name}/{names[0]}: median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
