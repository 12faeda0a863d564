"""Command line: PgBouncer's `pgmulti [-d] [-R] [-q] [-v] [-u USER] [-V] CONFIG` and sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import signal
import sys
import time

from .__version__ import __version__

log = logging.getLogger("pgmulti")

SUBCOMMANDS = ("demo", "analyze")


class PgBouncerFormatter(logging.Formatter):
    """PgBouncer's log line: time with milliseconds and zone, [pid], level word."""

    LEVELS = {"INFO": "LOG", "WARNING": "WARNING", "ERROR": "ERROR", "DEBUG": "DEBUG",
              "CRITICAL": "FATAL"}

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        zone = time.strftime("%Z", time.localtime(record.created))
        level = self.LEVELS.get(record.levelname, record.levelname)
        text = f"{stamp}.{int(record.msecs):03d} {zone} [{record.process}] {level} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(logfile: str | None, quiet: bool, verbose: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter = PgBouncerFormatter()
    if not quiet:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(formatter)
        root.addHandler(handler)


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
    setup_logging(cfg.logfile or None, args.quiet or args.daemon, args.verbose + cfg.verbose)
    if args.daemon:
        daemonize()
    try:
        import uvloop
        return uvloop.run(serve(config, os.path.abspath(args.config), args.user))
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


async def serve(config, config_path: str, run_as: str | None) -> int:
    from .app import App

    app = App(config, config_path)
    await app.start()
    if run_as:
        drop_privileges(run_as)
    pidfile = config.pgbouncer.pidfile
    if pidfile:
        with open(pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    install_signal_handlers(app)
    log.info("pgmulti %s started, pid %d", __version__, os.getpid())
    try:
        await app.stopped
    finally:
        app.janitor.stop()
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
    log.info("pgmulti stopped")
    return 0


def install_signal_handlers(app) -> None:
    """PgBouncer 1.23+ signals: HUP reload, INT safe, TERM wait for clients, QUIT now."""
    from .errors import PgError

    loop = asyncio.get_running_loop()

    def on_term() -> None:
        if app.shutting_down and app.shutdown_waits_for_clients:
            app.shutdown(None)  # a second SIGTERM exits at once
        else:
            app.shutdown("clients")

    def on_hup() -> None:
        try:
            app.reload()
        except PgError:
            pass  # already logged by reload(); the old configuration stays

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGINT, lambda: app.shutdown("servers"))
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGQUIT, lambda: app.shutdown(None))
    loop.add_signal_handler(signal.SIGUSR1, app.pause)
    loop.add_signal_handler(signal.SIGUSR2, app.resume)
