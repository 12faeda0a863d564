"""The pgbench tables of the benchmark suite: one function per table, each one interleaved run.

Every function takes the shared Bench and returns a Report: Markdown-ready columns and rows,
notes (what could not run and why, the ratios the issue asks for) and the data for the JSON.
pgmulti runs with `workers = 1` unless the table is about workers, so CPU per transaction
compares one process with PgBouncer's one process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from harness import Bench, TableRuns, TargetSpec, Workload, cell, run_table, same_round_ratio

# PgBouncer's prepared-statement support in transaction pooling (max_prepared_statements) came in 1.21.
PGBOUNCER_PREPARED_SINCE = (1, 21)
METRICS_CPU_TARGET = 1.05

DIRECT = TargetSpec("direct", "direct")
PGBOUNCER = TargetSpec("pgbouncer", "pgbouncer")
# As PgBouncer 1.25 runs by default: prepared statements tracked in transaction pooling.
PGMULTI = TargetSpec("pgmulti", "pgmulti", settings=(("max_prepared_statements", "200"),))


@dataclass
class Report:
    """One table: what is printed and what goes to the JSON."""
    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def select_only(name: str, protocol: str = "simple", clients: int = 16, *, connect: bool = False,
                tls: bool = False) -> Workload:
    args = ("-S", "-M", protocol) + (("-C",) if connect else ())
    return Workload(name, args, clients, env=(("PGSSLMODE", "require"),) if tls else ())


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def standard_report(name: str, title: str, table: TableRuns, *, baselines: tuple[str, ...] = ("direct", "pgbouncer"),
                    per: str = "txn") -> Report:
    """Rows of medians per (workload, target), with same-round ratios against the baselines.

    `tps/B` for every baseline present; `cpu/B` (proxy CPU per transaction) for the last one,
    which is the proxy the others are compared with.
    """
    names = [spec.name for spec in table.specs]
    baselines = tuple(b for b in baselines if b in names)
    cpu_baseline = next((b for b in reversed(baselines) if b != "direct"), None)
    columns = ["workload", "target", "tps", "lat ms", f"proxy µs/{per}", f"server µs/{per}"]
    columns += [f"tps/{b}" for b in baselines] + ([f"cpu/{cpu_baseline}"] if cpu_baseline else [])
    rows, notes, cells = [], [], {}
    for workload in table.workloads:
        for target in names:
            result = cell(table, workload.name, target)
            cells[f"{workload.name} | {target}"] = result
            if "runs" not in result:
                rows.append([workload.name, target, result["status"]] + ["-"] * (len(columns) - 3))
                where = target if result["status"] == "unavailable" else f"{target}, {workload.name}"
                note = f"{where}: {result['status']}: {first_line(result['reason'])}"
                if note not in notes:  # an unavailable target: once, not per workload
                    notes.append(note)
                continue
            if result["status"] == "failed":
                notes.append(f"{target}, {workload.name}: failed after {result['runs']} runs: "
                             f"{first_line(result['reason'])}")
            key = (workload.name, target)
            ratios = [fmt(same_round_ratio(table, key, (workload.name, b), "tps"), ".3f") if b != target else "1"
                      for b in baselines]
            if cpu_baseline:
                ratios.append("1" if target == cpu_baseline else fmt(same_round_ratio(
                    table, key, (workload.name, cpu_baseline), "proxy_cpu_us_per_txn"), ".3f"))
            rows.append([workload.name, target, fmt(result["tps"], ".1f"), fmt(result["latency_ms"], ".3f"),
                         fmt(result["proxy_cpu_us_per_txn"], ".1f"), fmt(result["server_cpu_us_per_txn"], ".1f"),
                         *ratios])
    data = {"cells": cells, "runs": [asdict(run) for run in table.runs],
            "workloads": [asdict(w) for w in table.workloads], "targets": [asdict(s) for s in table.specs]}
    return Report(name, title, columns, rows, notes, data)


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def add_ratio(report: Report, label: str, value: float | None, goal: str = "") -> None:
    report.notes.append(f"{label}: {fmt(value, '.3f')}{goal}")
    report.data.setdefault("ratios", {})[label] = value


# --- 1. protocols ---


def pgbouncer_lacks_prepared(bench: Bench):
    version = bench.pgbouncer_version

    def unsupported(spec: TargetSpec, workload: Workload) -> str | None:
        if spec.kind == "pgbouncer" and "prepared" in workload.pgbench_args and version \
                and version < PGBOUNCER_PREPARED_SINCE:
            shown = ".".join(map(str, version))
            return (f"PgBouncer {shown} has no max_prepared_statements (1.21+): "
                    "-M prepared cannot work in transaction pooling")
        return None

    return unsupported


def table_protocols(bench: Bench) -> Report:
    """1. select-only with -M simple, extended and prepared, 16 clients."""
    workloads = [select_only(protocol, protocol) for protocol in ("simple", "extended", "prepared")]
    table = run_table("protocols", [DIRECT, PGBOUNCER, PGMULTI], workloads, bench,
                      unsupported=pgbouncer_lacks_prepared(bench))
    report = standard_report("protocols", "1. select-only by query protocol, 16 clients, transaction pooling "
                             "(pgmulti: max_prepared_statements = 200, workers = 1)", table)
    for protocol in ("extended", "prepared"):
        add_ratio(report, f"pgmulti CPU/txn, -M {protocol} / -M simple (same round)",
                  same_round_ratio(table, (protocol, "pgmulti"), ("simple", "pgmulti"), "proxy_cpu_us_per_txn"))
    return report


# --- 2. workers ---


def table_workers(bench: Bench) -> Report:
    """2. select-only simple at 16 and 64 clients; pgmulti with one and with two worker processes."""
    specs = [DIRECT, PGBOUNCER, TargetSpec("pgmulti w=1", "pgmulti", workers=1),
             TargetSpec("pgmulti w=2", "pgmulti", workers=2)]
    workloads = [select_only(f"{clients} clients", clients=clients) for clients in (16, 64)]
    table = run_table("workers", specs, workloads, bench)
    report = standard_report("workers", "2. select-only -M simple by pgmulti worker count, transaction pooling "
                             "(CPU of pgmulti = its whole process tree)", table)
    for workload in workloads:
        add_ratio(report, f"{workload.name}: tps pgmulti w=2 / w=1",
                  same_round_ratio(table, (workload.name, "pgmulti w=2"), (workload.name, "pgmulti w=1"), "tps"))
    return report


# --- 3. connection churn ---


def table_churn(bench: Bench) -> Report:
    """3. pgbench -C: a new connection (login) per transaction."""
    # pgmulti with two workers too: issue 5 asks for PgBouncer's rate "with the same cores".
    specs = [DIRECT, PGBOUNCER, PGMULTI, TargetSpec("pgmulti w=2", "pgmulti", workers=2)]
    table = run_table("churn", specs, [select_only("-C select", connect=True)], bench)
    report = standard_report("churn", "3. connection churn: select-only -M simple -C, 16 clients "
                             "(tps = connections/s; µs per connection)", table, per="conn")
    return report


def table_churn_logged(bench: Bench) -> Report:
    """3b. pgbench -C with log_connections and log_disconnections on, PgBouncer's defaults:
    two log lines per connection (to stderr, as under systemd)."""
    logged = (("log_connections", "1"), ("log_disconnections", "1"))
    specs = [TargetSpec("pgbouncer logged", "pgbouncer", settings=logged),
             TargetSpec("pgmulti logged", "pgmulti", settings=PGMULTI.settings + logged)]
    table = run_table("churn-logged", specs, [select_only("-C select", connect=True)], bench)
    return standard_report("churn-logged", "3b. connection churn with log_connections = 1 and "
                           "log_disconnections = 1 (the defaults), select-only -M simple -C, 16 clients "
                           "(tps = connections/s; µs per connection)", table, per="conn",
                           baselines=("pgbouncer logged",))


# --- 4. TLS ---


def table_tls(bench: Bench) -> Report:
    """4. Clients over TLS (sslmode=require), persistent and one connection per transaction."""
    specs = [TargetSpec("pgbouncer tls", "pgbouncer", tls=True), TargetSpec("pgmulti tls", "pgmulti", tls=True)]
    workloads = [select_only("tls select", tls=True), select_only("tls -C select", connect=True, tls=True)]
    table = run_table("tls", specs, workloads, bench)
    report = standard_report("tls", "4. TLS from clients (client_tls_sslmode = require, same ECDSA P-256 "
                             "certificate for both; PGSSLMODE=require), select-only -M simple, 16 clients",
                             table, baselines=("pgbouncer tls",))
    report.notes.append("direct is not run: the benchmark's PostgreSQL has no TLS; the server leg is plain TCP")
    return report


# --- 5. metrics ---


def table_metrics(bench: Bench) -> Report:
    """5. pgmulti with metrics_port set and scraped once a second, against metrics off."""
    specs = [TargetSpec("pgmulti metrics off", "pgmulti"), TargetSpec("pgmulti metrics on", "pgmulti", metrics=True)]
    workloads = [select_only("select")]
    table = run_table("metrics", specs, workloads, bench)
    report = standard_report("metrics", "5. metrics endpoint on (GET /metrics every second) vs off, "
                             "select-only -M simple, 16 clients", table, baselines=("pgmulti metrics off",))
    add_ratio(report, "pgmulti CPU/txn, metrics on / off (same round)",
              same_round_ratio(table, ("select", "pgmulti metrics on"), ("select", "pgmulti metrics off"),
                               "proxy_cpu_us_per_txn"), f" (goal: under {METRICS_CPU_TARGET})")
    scrapes = [run for run in table.runs if run.metrics_scrapes is not None]
    if scrapes:
        report.notes.append(f"scrapes: {sum(r.metrics_scrapes for r in scrapes)} answered, "
                            f"{sum(r.metrics_scrape_failures for r in scrapes)} failed")
    return report


# --- ad hoc: the targets, workloads and protocol given on the command line ---


CUSTOM_WORKLOADS = {
    "select": ("-S",),
    "tpcb": (),
}


def table_custom(bench: Bench) -> Report:
    args = bench.args
    specs = [TargetSpec(name, name) if name != "pgmulti" else PGMULTI for name in args.targets]
    workloads = [Workload(name, CUSTOM_WORKLOADS[name] + ("-M", args.protocol), args.clients,
                          resets_history=name == "tpcb") for name in args.workloads]
    table = run_table("custom", specs, workloads, bench, unsupported=pgbouncer_lacks_prepared(bench))
    return standard_report("custom", f"pgbench -M {args.protocol}, {args.clients} clients, transaction pooling",
                           table)
