#!/usr/bin/env python3
"""User-space instructions per transaction, pgmulti against PgBouncer, counted by callgrind.

CPU time on a shared machine varies by 15-25% between identical runs; instructions do not.
Each proxy runs under `valgrind --tool=callgrind` (one worker for pgmulti, log settings as
given) in front of one throwaway PostgreSQL. For each workload pgbench warms the proxy up,
the counters are zeroed (callgrind_control -z), pgbench runs a fixed number of
transactions, the counters are dumped, and the instructions the proxy executed (its own
code, the libraries it calls and, for pgmulti, the interpreter; not the kernel's) are
divided by the transactions.

Instructions are not time: a cache miss costs far more than an instruction, and Python's
objects are spread over more memory than PgBouncer's structures. Read the count beside
txn_cpu.py's CPU time, not instead of it. Under callgrind a proxy runs about 50 times
slower, so it finds more ready sockets per wake-up than it would at full speed; both
proxies alike.

    python bench/micro/instructions.py                      # select, and -C, 8 clients
    python bench/micro/instructions.py --log-connections    # PgBouncer's logging defaults
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_DIR / "src"))
from pgmulti.cluster import (  # noqa: E402
    HOST, SERVER_OS_USER, Cluster, clean_env, find_free_port, give_to_server_user,
    server_user_popen_kwargs, stop_process)
from txn_cpu import BENCH_DB, BENCH_USER, bench_cluster, pooler_ini  # noqa: E402

WORKLOADS = {"select": (), "-C select": ("-C",)}
START_TIMEOUT_S = 180  # Python's start-up under callgrind takes most of a minute


def options(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=8)
    parser.add_argument("-t", "--transactions", type=int, default=250,
                        help="per client, counted (default %(default)s)")
    parser.add_argument("--log-connections", action="store_true",
                        help="log_connections and log_disconnections on, to a log file and "
                             "stderr")
    parser.add_argument("--targets", default="pgbouncer,pgmulti")
    args = parser.parse_args(argv)
    args.mode, args.pool_size = "transaction", 20  # as txn_cpu.py's defaults
    return args


class Target:
    """One proxy under callgrind, and the account callgrind_control must use to reach it."""

    def __init__(self, name: str, pg: Cluster, root: Path, args):
        self.name = name
        self.port = find_free_port()
        self.workdir = root / name
        self.workdir.mkdir()
        give_to_server_user(self.workdir)
        (self.workdir / "userlist.txt").write_text(f'"{BENCH_USER}" ""\n')
        ini = self.workdir / "pooler.ini"
        text = pooler_ini(pg, self.workdir, self.port, args)  # txn_cpu.py's
        valgrind = [shutil.which("valgrind") or "valgrind", "--tool=callgrind",
                    f"--callgrind-out-file={self.workdir}/callgrind.%p"]
        if name == "pgmulti":
            ini.write_text(text + "workers = 1\n")
            # The interpreter itself, not a launcher script: callgrind does not follow exec.
            command = [*valgrind, os.path.realpath(sys.executable), "-m", "pgmulti", str(ini)]
            self.popen_kwargs: dict = {}
            self.user = pwd.getpwuid(os.geteuid()).pw_name
            env = clean_env(PYTHONPATH=str(REPO_DIR / "src"))
        else:
            ini.write_text(text)
            command = [*valgrind, shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", str(ini)]
            self.popen_kwargs = server_user_popen_kwargs()
            self.user = SERVER_OS_USER if self.popen_kwargs else pwd.getpwuid(os.geteuid()).pw_name
            env = clean_env()
        # vgdb, which callgrind_control talks through, names its pipes after $USER.
        self.env = {**env, "USER": self.user, "LOGNAME": self.user}
        for path in (self.workdir / "userlist.txt", ini):
            give_to_server_user(path)
        self.log = open(self.workdir / "proxy.log", "ab")
        self.process = subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.env, **self.popen_kwargs)

    def wait_ready(self, pg: Cluster) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.workdir / 'proxy.log'}")
            probe = subprocess.run([str(pg.bindir / "psql"), "-h", HOST, "-p", str(self.port),
                                    "-U", BENCH_USER, "-c", "SELECT 1", BENCH_DB],
                                   env=clean_env(), capture_output=True, timeout=60, check=False)
            if probe.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_S} s")

    def control(self, *arguments: str) -> None:
        subprocess.run(["callgrind_control", *arguments, str(self.process.pid)], env=self.env,
                       capture_output=True, timeout=60, check=True, **self.popen_kwargs)

    def dumped_instructions(self, dumps_before: int) -> int:
        """The instruction total of the next dump (callgrind writes it at its next chance)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dumps = sorted(self.workdir.glob(f"callgrind.{self.process.pid}.*"))
            if len(dumps) > dumps_before:
                match = re.search(r"^summary: (\d+)$", dumps[-1].read_text(), re.MULTILINE)
                if match:
                    return int(match.group(1))
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: no callgrind dump")

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def pgbench(pg: Cluster, port: int, args, extra: tuple[str, ...], transactions: int) -> int:
    result = subprocess.run(
        [str(pg.bindir / "pgbench"), "-n", "-S", "-M", "simple", "-c", str(args.clients),
         "-j", "2", "-t", str(transactions), "-h", HOST, "-p", str(port), "-U", BENCH_USER,
         *extra, BENCH_DB],
        env=clean_env(), capture_output=True, text=True, timeout=1800, check=False)
    match = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()[-500:]}")
    return int(match.group(1))


def main(argv=None) -> int:
    args = options(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        root, pg = bench_cluster(stack, "instructions-")
        names = args.targets.split(",")
        targets = {}
        for name in names:
            target = Target(name, pg, root, args)
            stack.callback(target.stop)
            targets[name] = target
        for target in targets.values():
            target.wait_ready(pg)
        per_txn: dict[tuple[str, str], float] = {}
        for workload, extra in WORKLOADS.items():
            for name, target in targets.items():
                pgbench(pg, target.port, args, extra, 20)  # warm-up: pools and caches filled
                dumps = len(list(target.workdir.glob(f"callgrind.{target.process.pid}.*")))
                target.control("-z")
                transactions = pgbench(pg, target.port, args, extra, args.transactions)
                target.control("-d")
                instructions = target.dumped_instructions(dumps)
                per_txn[workload, name] = instructions / transactions
                print(f"{workload} {name}: {transactions} transactions, "
                      f"{instructions / transactions:,.0f} instructions per transaction",
                      flush=True)
            for name in names[1:]:
                print(f"{workload} ratio {name}/{names[0]}: "
                      f"{per_txn[workload, name] / per_txn[workload, names[0]]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
