"""`pgmulti demo`: throwaway local PostgreSQL clusters behind a pgmulti, ready for psql and pgbench."""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .certs import CertificateAuthority
from .cluster import Cluster, ClusterError, find_free_port, stop_process, wait_until_listening

NODE_NAMES = ("node_a", "node_b", "node_c")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pgmulti demo",
        description="Start local PostgreSQL clusters (from this machine's PostgreSQL binaries) "
                    "behind pgmulti and print how to connect.")
    parser.add_argument("--port", type=int, default=6432,
                        help="pgmulti's port (default 6432; a free one if that is taken or 0)")
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3),
                        help="number of PostgreSQL clusters (default 3)")
    parser.add_argument("--pool-mode", default="transaction",
                        choices=("session", "transaction", "statement"))
    parser.add_argument("--selftest", action="store_true",
                        help="run a short pgbench through pgmulti, print the result and exit")
    parser.add_argument("--keep", action="store_true", help="keep the demo directory at exit")
    return parser.parse_args(argv)


def demo_config(base: Path, port: int, clusters: list[Cluster], pool_mode: str,
                tls_cert: Path, tls_key: Path) -> str:
    lines = ["[databases]",
             f"demo = host=127.0.0.1 port={clusters[0].port} dbname=demo"]
    for name, cluster in zip(NODE_NAMES, clusters):
        lines.append(f"{name} = host=127.0.0.1 port={cluster.port} dbname=demo")
    lines += ["", "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {port}",
              f"unix_socket_dir = {base}", "auth_type = trust",
              f"auth_file = {base / 'userlist.txt'}", "admin_users = postgres",
              "stats_users = postgres", f"pool_mode = {pool_mode}", "default_pool_size = 10",
              "max_client_conn = 500",
              # TLS out of the box with a throwaway CA (clients may still use plain text).
              "client_tls_sslmode = prefer", f"client_tls_cert_file = {tls_cert}",
              f"client_tls_key_file = {tls_key}", ""]
    return "\n".join(lines)


def pick_port(wanted: int) -> int:
    """The wanted port if free, else (or for 0) a free one."""
    if wanted == 0:
        return find_free_port()
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return find_free_port()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pgmulti-demo-"))
    base.chmod(0o755)
    clusters: list[Cluster] = []
    proxy: subprocess.Popen | None = None
    try:
        for name in NODE_NAMES[:args.nodes]:
            print(f"starting PostgreSQL cluster {name} ...", flush=True)
            cluster = Cluster(base / name, auth_setup=False)
            cluster.init()
            cluster.start()
            cluster.psql("CREATE DATABASE demo")
            clusters.append(cluster)
        port = pick_port(args.port)
        (base / "userlist.txt").write_text('"postgres" ""\n')
        ca = CertificateAuthority(base / "tls", "pgmulti demo CA")
        server_cert = ca.issue("pgmulti", "localhost", ("localhost", "127.0.0.1"))
        ini = base / "pgmulti.ini"
        ini.write_text(demo_config(base, port, clusters, args.pool_mode,
                                   server_cert.cert_file, server_cert.key_file))
        log = open(base / "pgmulti.log", "wb")
        proxy = subprocess.Popen([sys.executable, "-m", "pgmulti", str(ini)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_listening(proxy, port, timeout=15)
        print_instructions(base, port, clusters, args.pool_mode, ca.cert_file)
        if args.selftest:
            return selftest(port)
        wait_for_interrupt()
        return 0
    except ClusterError as exc:
        print(f"pgmulti demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if proxy is not None:
            stop_process(proxy)
        for cluster in clusters:
            cluster.stop()
        if args.keep:
            print(f"demo files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def print_instructions(base: Path, port: int, clusters: list[Cluster], pool_mode: str,
                       ca_file: Path) -> None:
    nodes = ", ".join(f"{name} (PostgreSQL on port {c.port})" for name, c in zip(NODE_NAMES, clusters))
    print(f"""
pgmulti is listening on 127.0.0.1:{port} ({pool_mode} pooling); logs in {base / 'pgmulti.log'}
databases: demo -> node_a; {nodes}

  psql -h 127.0.0.1 -p {port} -U postgres demo
  pgbench -h 127.0.0.1 -p {port} -U postgres -i demo
  pgbench -h 127.0.0.1 -p {port} -U postgres -c 16 -j 2 -T 30 -S demo
  psql -h 127.0.0.1 -p {port} -U postgres pgbouncer -c 'SHOW POOLS'    # admin console
  psql "host=localhost port={port} user=postgres dbname=demo sslmode=verify-full sslrootcert={ca_file}"

Multi-main (writes to every node, reads from the fastest) is not built yet: each node is
its own database entry for now. Press Ctrl-C to stop and remove everything.
""", flush=True)


def selftest(port: int) -> int:
    common = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    init = subprocess.run(["pgbench", *common, "-i", "-q", "demo"], capture_output=True,
                          text=True, timeout=120)
    if init.returncode != 0:
        print(init.stderr, file=sys.stderr)
        return 1
    run = subprocess.run(["pgbench", *common, "-c", "8", "-j", "2", "-T", "3", "-S", "demo"],
                         capture_output=True, text=True, timeout=60)
    summary = [line for line in run.stdout.splitlines()
               if line.startswith(("tps", "number of failed", "latency average"))]
    print("\n".join(summary) or run.stderr)
    return run.returncode


def wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
