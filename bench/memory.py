"""Table 6: the proxies' resident memory with many idle clients and while big results stream.

RSS is read from /proc (the proxy's whole process tree). The clients are rawclient.py
processes, which never hold what they receive, so only the proxy's own buffering shows.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    BENCH_DB,
    BENCH_USER,
    Bench,
    Target,
    TargetSpec,
    TargetUnavailable,
    start_target,
)
from tables import PGBOUNCER, Report, fmt

RAWCLIENT = Path(__file__).resolve().parent / "rawclient.py"
PGMULTI = TargetSpec("pgmulti", "pgmulti")  # workers = 1: one process, one figure
MEMORY_TARGETS = (PGBOUNCER, PGMULTI)
SETTLE_S = 1.0            # after the logins, before reading RSS: let buffers be released
SAMPLE_INTERVAL_S = 0.1
IDLE_TIMEOUT_S = 300.0
MIN_STREAM_RATE = 4 << 20  # bytes/s below which a streaming case counts as hung
PER_CLIENT_TARGET_BYTES = 5000
COPY_TABLE = "bench_copy"
MIB = 1 << 20


def rawclient(port: int, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RAWCLIENT), str(port), *args, "--user", BENCH_USER,
                             "--database", BENCH_DB], stdin=stdin, stdout=subprocess.PIPE, text=True)


def read_result(process: subprocess.Popen, timeout: float) -> dict:
    """rawclient's one JSON line (it prints one line per mode)."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rawclient gave no result within {timeout:g} s")
    line = process.stdout.readline()
    return json.loads(line) if line.strip() else {"error": f"rawclient exited with {process.wait()}"}


def mib(value: float | None) -> str:
    return fmt(None if value is None else value / MIB, ".1f")


# --- (a) idle clients ---


def idle_rss(target: Target, count: int) -> dict:
    """(RSS with `count` idle logged-in clients - RSS with none) / count."""
    time.sleep(SETTLE_S)
    before = target.rss_bytes()
    client = rawclient(target.port, "idle", str(count), stdin=subprocess.PIPE)
    try:
        result = read_result(client, IDLE_TIMEOUT_S)
        time.sleep(SETTLE_S)
        during = target.rss_bytes()
    finally:
        client.stdin.close()  # the clients log off
        try:
            client.wait(60)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    opened = result.get("opened") or 0
    return {**result, "rss_before": before, "rss_with_clients": during,
            "bytes_per_client": (during - before) / opened if opened else None}


def table_memory_idle(bench: Bench) -> Report:
    """6a. Bytes of RSS per idle client connection, pgmulti against PgBouncer."""
    count = bench.args.idle_clients
    columns = ["target", "clients", "login s", "RSS idle MiB", "RSS with clients MiB", "bytes/client"]
    rows, notes, data = [], [], {}
    for spec in MEMORY_TARGETS:
        with contextlib.ExitStack() as stack:
            try:
                target = start_target(spec, bench, stack, "memory-idle", count + 100)
                result = idle_rss(target, count)
            except (TargetUnavailable, TimeoutError) as exc:
                rows.append([spec.name, "unavailable", "-", "-", "-", "-"])
                notes.append(f"{spec.name}: {exc}")
                data[spec.name] = {"error": str(exc)}
                continue
        data[spec.name] = result
        print(f"memory-idle {spec.name}: {result}", file=sys.stderr, flush=True)
        if result.get("failed"):
            notes.append(f"{spec.name}: {result['failed']} of {count} logins failed, first: {result['first_error']}")
        rows.append([spec.name, str(result.get("opened", 0)), fmt(result.get("seconds"), ".1f"),
                     mib(result["rss_before"]), mib(result["rss_with_clients"]),
                     fmt(result["bytes_per_client"], ".0f")])
    ours, theirs = (data.get(s.name, {}).get("bytes_per_client") for s in (PGMULTI, PGBOUNCER))
    notes.append(f"pgmulti bytes/client: {fmt(ours, '.0f')} (goal: under {PER_CLIENT_TARGET_BYTES}); "
                 f"pgmulti / pgbouncer: {fmt(ours / theirs if ours and theirs else None, '.2f')}")
    title = f"6a. memory per idle client: {count} clients logged in (trust) and idle, transaction pooling"
    return Report("memory-idle", title, columns, rows, notes, data)


# --- (b) streaming ---


def streaming_cases(args) -> list[tuple[str, list[str], int]]:
    """(name, rawclient arguments, bytes that cross the proxy)."""
    return [
        (f"COPY FROM STDIN {args.stream_bytes // MIB} MiB", ["copy-in", str(args.stream_bytes)], args.stream_bytes),
        (f"COPY TO STDOUT {args.stream_bytes // MIB} MiB", ["copy-out", str(args.stream_bytes)], args.stream_bytes),
        (f"one DataRow of {args.big_row_bytes // MIB} MiB", ["big-row", str(args.big_row_bytes)], args.big_row_bytes),
        (f"SELECT {args.rows:,} rows", ["rows", str(args.rows)], args.rows * 20),  # ~20 bytes a DataRow
    ]


def peak_rss_while(target: Target, client: subprocess.Popen, timeout: float) -> tuple[int, dict]:
    """Sample the proxy's RSS every 100 ms until the client exits; its peak and the client's result."""
    peak, samples = target.rss_bytes(), 1
    deadline = time.monotonic() + timeout
    while client.poll() is None:
        if time.monotonic() > deadline:
            client.kill()
            client.wait()
            return peak, {"error": f"not done within {timeout:g} s", "rss_samples": samples}
        peak, samples = max(peak, target.rss_bytes()), samples + 1
        time.sleep(SAMPLE_INTERVAL_S)
    line = client.stdout.read().strip()
    result = json.loads(line.splitlines()[-1]) if line else {"error": f"exit code {client.returncode}"}
    return peak, {**result, "rss_samples": samples}


def stream_through(target: Target, bench: Bench, rawclient_args: list[str], size: int) -> dict:
    before = target.rss_bytes()
    client = rawclient(target.port, *rawclient_args)
    try:
        peak, result = peak_rss_while(target, client, 60 + size / MIN_STREAM_RATE)
    finally:
        if client.poll() is None:  # interrupted: the client must not outlive the benchmark
            client.kill()
            client.wait()
    if rawclient_args[0] == "copy-in":
        bench.pg.psql(f"TRUNCATE {COPY_TABLE}", db=BENCH_DB)
    return {**result, "rss_before": before, "rss_peak": peak}


def table_memory_streaming(bench: Bench) -> Report:
    """6b. Peak RSS while a big COPY, a huge DataRow and many rows pass through."""
    # Unlogged, and 'xxx...' lines compress to almost nothing: the server's disk stays out of it.
    bench.pg.psql(f"CREATE UNLOGGED TABLE IF NOT EXISTS {COPY_TABLE} (t text); "
                  f"ALTER TABLE {COPY_TABLE} OWNER TO {BENCH_USER}", db=BENCH_DB)
    cases = streaming_cases(bench.args)
    columns = ["case", "target", "seconds", "MiB/s", "RSS samples", "RSS before MiB", "peak RSS MiB",
               "peak growth MiB"]
    rows, notes, data = [], [], {}
    for spec in MEMORY_TARGETS:
        with contextlib.ExitStack() as stack:
            try:
                target = start_target(spec, bench, stack, "memory-stream", 20)
            except TargetUnavailable as exc:
                rows.append(["all", spec.name, "unavailable"] + ["-"] * 5)
                notes.append(f"{spec.name}: {exc}")
                continue
            for name, rawclient_args, size in cases:
                result = stream_through(target, bench, rawclient_args, size)
                data[f"{name} | {spec.name}"] = result
                print(f"memory-stream {spec.name} {name}: {result}", file=sys.stderr, flush=True)
                if "error" in result:
                    rows.append([name, spec.name, "failed"] + ["-"] * 5)
                    notes.append(f"{spec.name}, {name}: {result['error']}")
                    continue
                moved = result.get("sent_bytes") or result.get("received_bytes") or 0
                rows.append([name, spec.name, fmt(result["seconds"], ".1f"),
                             fmt(moved / MIB / result["seconds"] if result["seconds"] else None, ".0f"),
                             str(result["rss_samples"]), mib(result["rss_before"]), mib(result["rss_peak"]),
                             mib(result["rss_peak"] - result["rss_before"])])
    rows.sort(key=lambda row: [case[0] for case in cases].index(row[0]) if row[0] != "all" else -1)
    title = "6b. peak RSS while big data streams through (sampled every 100 ms, whole process tree)"
    return Report("memory-stream", title, columns, rows, notes, data)
