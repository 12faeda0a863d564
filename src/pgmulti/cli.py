"""Command line: `pgmulti [-d] [-R] [-q] [-v] [-u USER] [-V] [--check] CONFIG` and sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import signal
import sys

from . import logs, systemd
from .__version__ import __version__
from .logs import PgBouncerFormatter  # noqa: F401  (its former home; kept importable)

log = logging.getLogger("pgmulti")



def setup_logging(cfg, quiet: bool, verbose: int) -> None:
    """Log destinations and format from the [pgbouncer] settings (see pgmulti.logs).

    Run again on SIGHUP: that reopens the log file (rotation) and applies a changed
    log_format, syslog or verbose. OSError (log file cannot be opened) keeps the old setup.
    """
    warnings = logs.configure(
        logfile=cfg.logfile or None,
        stderr=not quiet,
        level=logging.DEBUG if verbose + cfg.verbose else logging.INFO,
        log_format=cfg.log_format,
        syslog=cfg.syslog,
        syslog_ident=cfg.syslog_ident,
        syslog_facility=cfg.syslog_facility,
    )
    for warning in warnings:
        log.warning("%s", warning)


def pooler_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pgmulti",
        description="PostgreSQL connection pooler (PgBouncer-compatible). "
                    "Sub-commands: demo (local clusters behind pgmulti), "
                    "analyze (relay and decode a session).")
    parser.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    parser.add_argument("-R", "--reboot", action="store_true",
                        help="online restart (not supported: use so_reuseport rolling restarts)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no log output to stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-u", "--user", help="switch to this OS user after opening sockets")
    parser.add_argument("-V", "--version", action="store_true", help="print version and exit")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration (and auth_file, TLS files) and exit: "
                             "0 if it has no error, 1 otherwise")
    parser.add_argument("config", nargs="?", help="pgbouncer.ini-style configuration file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from . import demo
        return demo.main(argv[1:])
    if argv and argv[0] == "analyze":
        from . import analyze
        return analyze.main(argv[1:])
    args = pooler_arguments(argv)
    if args.version:
        print(f"pgmulti {__version__} (PgBouncer-compatible)")
        return 0
    if args.reboot:
        print("pgmulti: -R (online restart) is not supported; start a new pgmulti with "
              "so_reuseport = 1 on the same port, then SIGTERM the old one", file=sys.stderr)
        return 1
    if not args.config:
        print("pgmulti: a configuration file is required (see pgmulti --help)", file=sys.stderr)
        return 1
    if args.check:
        from . import check
        return check.run(args.config)
    return run_pooler(args)


def run_pooler(args: argparse.Namespace) -> int:
    from . import loader

    try:
        config = loader.load_config(args.config)
    except (loader.ConfigError, OSError) as exc:
        print(f"pgmulti: {exc}", file=sys.stderr)
        return 1
    cfg = config.pgbouncer
    if args.daemon and not cfg.logfile and not cfg.syslog:
        print("pgmulti: in daemon mode set logfile (or syslog) in the config", file=sys.stderr)
        return 1
    quiet = args.quiet or args.daemon
    try:
        setup_logging(cfg, quiet, args.verbose)
    except OSError as exc:
        print(f"pgmulti: cannot open logfile: {exc}", file=sys.stderr)
        return 1
    if args.daemon:
        daemonize()
    try:
        import uvloop
        return uvloop.run(serve(config, os.path.abspath(args.config), args.user,
                                relog=lambda new_cfg: setup_logging(new_cfg, quiet, args.verbose)))
    except (OSError, ValueError) as exc:  # ValueError: TlsConfigError and friends
        log.error("could not start: %s", exc)
        return 1


def daemonize() -> None:
    """Classic double fork so the pooler is not a session leader and has no terminal."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def drop_privileges(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgid(entry.pw_gid)
    os.initgroups(user, entry.pw_gid)
    os.setuid(entry.pw_uid)


async def serve(config, config_path: str, run_as: str | None, relog=None) -> int:
    """Run the pooler until it stops.

    relog(cfg), if given, re-applies the logging settings after a SIGHUP reload.
    systemd (Type=notify, when $NOTIFY_SOCKET is set) hears READY=1 once listening,
    RELOADING=1 / READY=1 around SIGHUP reloads and STOPPING=1 when shutdown starts.
    """
    from .app import App

    app = App(config, config_path)
    await app.start()
    if run_as:
        drop_privileges(run_as)
    pidfile = config.pgbouncer.pidfile
    if pidfile:
        with open(pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    install_signal_handlers(app, relog)
    log.info("pgmulti %s started, pid %d", __version__, os.getpid())
    systemd.ready()
    try:
        await app.stopped
    finally:
        systemd.stopping()  # a console SHUTDOWN does not pass through our signal handlers
        app.janitor.stop()
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
    log.info("pgmulti stopped")
    return 0


def install_signal_handlers(app, relog=None) -> None:
    """PgBouncer 1.23+ signals: HUP reload, INT safe, TERM wait for clients, QUIT now."""
    from .errors import PgError

    loop = asyncio.get_running_loop()

    def shutdown(wait_for: str | None) -> None:
        systemd.stopping()
        app.shutdown(wait_for)

    def on_term() -> None:
        if app.shutting_down and app.shutdown_waits_for_clients:
            shutdown(None)  # a second SIGTERM exits at once
        else:
            shutdown("clients")

    def on_hup() -> None:
        systemd.reloading()
        try:
            app.reload()
        except PgError:
            pass  # already logged by reload(); the old configuration stays
        finally:
            if relog is not None:
                # Reopen the log file (rotation) and apply changed log settings; with a
                # failed reload app.config is still the old configuration.
                try:
                    relog(app.config.pgbouncer)
                except OSError as exc:
                    log.error("could not reopen the log: %s; logging continues as before", exc)
            systemd.ready()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGINT, lambda: shutdown("servers"))
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGQUIT, lambda: shutdown(None))
    loop.add_signal_handler(signal.SIGUSR1, app.pause)
    loop.add_signal_handler(signal.SIGUSR2, app.resume)
