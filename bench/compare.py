#!/usr/bin/env python3
"""pgmulti against PostgreSQL direct, PgBouncer and Pgpool-II: interleaved pgbench, CPU and memory.

    python3 bench/compare.py --suite full            # every table; about 25 min
    python3 bench/compare.py --suite full --quick    # smoke test of every table; about 2 min
    python3 bench/compare.py --suite tls,metrics     # some tables
    python3 bench/compare.py                         # ad hoc: --targets, --workloads, --protocol
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench modules beside this file

import memory  # noqa: E402
import tables  # noqa: E402
from harness import (  # noqa: E402
    REPO_DIR,
    Bench,
    Cluster,
    ClusterError,
    environment,
    init_pgbench,
    make_workdir,
    version_tuple,
)

# name -> (function, (workload, target) pairs it runs: for the time estimate)
TABLES = {
    "protocols": (tables.table_protocols, 8),
    "workers": (tables.table_workers, 8),
    "churn": (tables.table_churn, 4),
    "churn-logged": (tables.table_churn_logged, 2),
    "tls": (tables.table_tls, 4),
    "metrics": (tables.table_metrics, 2),
    "memory-idle": (memory.table_memory_idle, 0),
    "memory-stream": (memory.table_memory_streaming, 0),
}
SUITES = {
    "full": list(TABLES),
    "pgbench": ["protocols", "workers", "churn", "churn-logged", "tls", "metrics"],
    "memory": ["memory-idle", "memory-stream"],
}
CUSTOM_TARGETS = ("direct", "pgbouncer", "pgmulti", "pgpool")
RECOMMENDED_ROUNDS = 5
# Settings of a full run, and of --quick (a smoke test: the numbers mean little).
FULL = {"duration": 10, "rounds": 5, "warmup": 2, "scale": 10, "idle_clients": 10_000,
        "stream_bytes": 1 << 30, "big_row_bytes": 100 << 20, "rows": 10_000_000}
QUICK = {"duration": 2, "rounds": 1, "warmup": 1, "scale": 1, "idle_clients": 1000,
         "stream_bytes": 64 << 20, "big_row_bytes": 16 << 20, "rows": 1_000_000}
# Rough wall time of the memory tables (start, logins, streaming), for the estimate.
MEMORY_ESTIMATE_S = {"memory-idle": 30, "memory-stream": 60}
SETUP_ESTIMATE_S = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="tables: " + ", ".join(TABLES) + "; suites: " + ", ".join(SUITES))
    parser.add_argument("--suite", help="comma-separated suites or tables; without it, one ad hoc table")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round x 2 s, small memory cases (figures not to be quoted)")
    parser.add_argument("--duration", type=int, help=f"seconds per run (default {FULL['duration']})")
    parser.add_argument("--rounds", type=int, help=f"runs per target and workload (default {FULL['rounds']})")
    parser.add_argument("--warmup", type=int,
                        help=f"unrecorded seconds per target and workload first; 0: none (default {FULL['warmup']})")
    parser.add_argument("--scale", type=int, help=f"pgbench -i -s (default {FULL['scale']})")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default: %(default)s)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="default_pool_size of PgBouncer and pgmulti (default: %(default)s)")
    parser.add_argument("--idle-clients", type=int, help=f"memory-idle connections (default {FULL['idle_clients']})")
    parser.add_argument("--stream-bytes", type=int, help=f"memory-stream COPY size (default {FULL['stream_bytes']})")
    parser.add_argument("--big-row-bytes", type=int, help=f"memory-stream DataRow size (default {FULL['big_row_bytes']})")
    parser.add_argument("--rows", type=int, help=f"memory-stream SELECT rows (default {FULL['rows']})")
    custom = parser.add_argument_group("ad hoc table (without --suite)")
    custom.add_argument("--targets", default="direct,pgbouncer,pgmulti",
                        help=f"comma-separated, from {','.join(CUSTOM_TARGETS)} (default: %(default)s)")
    custom.add_argument("--pgpool", action="store_true", help="add pgpool to --targets")
    custom.add_argument("--workloads", default="select,tpcb",
                        help=f"comma-separated, from {','.join(tables.CUSTOM_WORKLOADS)} (default: %(default)s)")
    custom.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple",
                        help="pgbench -M (default: %(default)s)")
    custom.add_argument("--clients", type=int, default=16, help="pgbench -c (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="result file (default: bench/results/compare-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args(argv)

    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.suite:
        args.tables = split_choices(parser, "--suite", args.suite, [*SUITES, *TABLES])
        args.tables = list(dict.fromkeys(t for name in args.tables for t in SUITES.get(name, [name])))
    else:
        args.tables = ["custom"]
    args.targets = split_choices(parser, "--targets", args.targets, CUSTOM_TARGETS)
    if args.pgpool and "pgpool" not in args.targets:
        args.targets.append("pgpool")
    args.workloads = split_choices(parser, "--workloads", args.workloads, tables.CUSTOM_WORKLOADS)
    for option in ("clients", "jobs", "duration", "rounds", "scale", "pool_size", "idle_clients",
                   "stream_bytes", "big_row_bytes", "rows"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.rounds < RECOMMENDED_ROUNDS and not args.quick:
        print(f"note: {args.rounds} rounds; medians want at least {RECOMMENDED_ROUNDS}", file=sys.stderr)
    return args


def split_choices(parser: argparse.ArgumentParser, option: str, text: str, choices) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        parser.error(f"{option}: unknown or empty {unknown or text!r}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(names))  # without repeats, in the order given


def estimate_seconds(args: argparse.Namespace) -> float:
    """Wall time the tables should take: every pair runs warm-up + rounds x duration."""
    per_pair = args.warmup + (args.rounds + 1) * 0.2 + args.rounds * args.duration  # 0.2: pgbench start, stop
    total = SETUP_ESTIMATE_S + 3 * args.scale
    for name in args.tables:
        if name == "custom":
            total += per_pair * len(args.targets) * len(args.workloads)
        elif name in MEMORY_ESTIMATE_S:
            total += MEMORY_ESTIMATE_S[name] * (0.2 if args.quick else 1)
        else:
            total += per_pair * TABLES[name][1] + 2  # 2: starting the targets
    return total


# --- output ---


def markdown(report: tables.Report) -> str:
    lines = [f"### {report.title}", "", "| " + " | ".join(report.columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(report.columns))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in report.rows]
    if report.notes:
        lines.append("")
        lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines)


def default_json_path() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO_DIR / "bench" / "results" / f"compare-{stamp}.json"


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


# --- main ---


def raise_on_termination() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every process we started is stopped."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def raise_file_limit() -> None:
    """10,000 idle clients need as many descriptors in each proxy, which inherit our limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def settings(args: argparse.Namespace) -> dict:
    keys = ("tables", "quick", "duration", "rounds", "warmup", "scale", "jobs", "pool_size",
            "idle_clients", "stream_bytes", "big_row_bytes", "rows")
    chosen = {key: getattr(args, key) for key in keys}
    if "custom" in args.tables:
        chosen.update(targets=args.targets, workloads=args.workloads, protocol=args.protocol, clients=args.clients)
    return {**chosen, "pool_mode": "transaction"}


def benchmark(args: argparse.Namespace) -> dict:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = make_workdir(args.keep, stack)
        pg = Cluster(root / "pg")
        stack.callback(pg.stop)
        pg.init()
        pg.start()
        init_pgbench(pg, args.scale)
        bench = Bench(pg, root, args, environment=environment(pg))
        bench.pgbouncer_version = version_tuple(bench.environment["versions"]["pgbouncer"])
        reports = []
        for name in args.tables:
            print(f"== {name} ==", file=sys.stderr, flush=True)
            function = tables.table_custom if name == "custom" else TABLES[name][0]
            report = function(bench)
            reports.append(report)
            print("\n" + markdown(report), flush=True)
        return {
            "started_at": started_at,
            "wall_seconds": round(time.monotonic() - started, 1),
            **bench.environment,
            "settings": settings(args),
            "tables": {report.name: {"title": report.title, "columns": report.columns, "rows": report.rows,
                                     "notes": report.notes, **report.data} for report in reports},
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_termination()
    raise_file_limit()
    print(f"tables: {', '.join(args.tables)}; {args.rounds} rounds x {args.duration} s, warm-up {args.warmup} s; "
          f"expected about {estimate_seconds(args) / 60:.0f} min", file=sys.stderr, flush=True)
    if args.quick:
        print("quick: a smoke test; the figures are not to be quoted", flush=True)
    try:
        result = benchmark(args)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); all processes stopped", file=sys.stderr)
        return 130
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = args.json or default_json_path()
    write_json(result, path)
    print(f"\nwall time {result['wall_seconds'] / 60:.1f} min; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
