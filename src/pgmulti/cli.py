"""Command line: `pgmulti [-d] [-R] [-q] [-v] [-u USER] [-V] [--check] CONFIG` and sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import signal
import sys

from . import logs, supervisor, systemd
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
    config_path = os.path.abspath(args.config)

    def relog(new_cfg) -> None:
        setup_logging(new_cfg, quiet, args.verbose)

    count = supervisor.worker_count(cfg.workers)
    try:
        if count > 1:
            return run_workers(config, config_path, args.user, count, relog)
        import uvloop
        return uvloop.run(serve(config, config_path, args.user, relog=relog))
    except (OSError, ValueError) as exc:  # ValueError: TlsConfigError and friends
        log.error("could not start: %s", exc)
        return 1


def run_workers(config, config_path: str, run_as: str | None, count: int, relog) -> int:
    """Several worker processes behind the same sockets (pgmulti.supervisor)."""
    import uvloop  # imported before -u drops privileges: the new user may not read it

    from .app import preflight

    preflight(config)  # fail here, once, rather than in every worker
    # Read now: after -u the new user may not be allowed to (as with PgBouncer).
    userlist = read_userlist(config)

    def start_worker(index: int, sockets, control_dir: str) -> int:
        try:
            return uvloop.run(serve(config, config_path, None, relog=relog,
                                    worker=(index, count, sockets, control_dir),
                                    userlist=userlist))
        except (OSError, ValueError) as exc:
            log.error("worker %d could not start: %s", index, exc)
            return 1

    workers = supervisor.Supervisor(config, count, start_worker)
    try:
        workers.bind()
        if run_as:
            entry = pwd.getpwnam(run_as)
            for path in [workers.control_dir] + [os.path.join(workers.control_dir, name)
                                                  for name in os.listdir(workers.control_dir)]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
            drop_privileges(run_as)
    except OSError:
        workers.cleanup()
        raise
    pidfile = write_pidfile(config.pgbouncer.pidfile)
    log.info("pgmulti %s started, pid %d, %d workers", __version__, os.getpid(), count)
    try:
        return workers.run()
    finally:
        remove_pidfile(pidfile)
        log.info("pgmulti stopped")


def write_pidfile(path: str) -> str:
    if path:
        with open(path, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    return path


def remove_pidfile(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def read_userlist(config) -> dict[str, str]:
    from . import auth

    path = config.pgbouncer.auth_file
    if not path:
        return {}
    try:
        return auth.load_userlist(path)
    except (OSError, auth.AuthFileError) as exc:
        log.error("could not load auth_file: %s", exc)
        return {}


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


async def serve(config, config_path: str, run_as: str | None, relog=None, worker=None,
                userlist=None) -> int:
    """Run the pooler until it stops.

    relog(cfg), if given, re-applies the logging settings after a SIGHUP reload.
    systemd (Type=notify, when $NOTIFY_SOCKET is set) hears READY=1 once listening,
    RELOADING=1 / READY=1 around SIGHUP reloads and STOPPING=1 when shutdown starts.
    worker: (index, count, sockets, control directory) in a worker process; the parent then
    owns the pid file, the privileges and systemd, and passes signals on to us; userlist is
    the auth_file as the parent read it before dropping privileges.
    """
    from .app import App

    app = App(config, config_path, userlist)
    actions = signal_actions(app, relog)
    if worker is not None:
        index, count, sockets, control_dir = worker
        app.become_worker(index, count, control_dir)
        app.peers.handlers["signal"] = lambda request: _act_on(actions, request["signo"])
        await app.start(sockets.listening, sockets.control)
        app.spawn(_stop_when_orphaned(app, os.getppid()))
        pidfile = None
    else:
        await app.start()
        if run_as:
            drop_privileges(run_as)
        pidfile = write_pidfile(config.pgbouncer.pidfile)
        loop = asyncio.get_running_loop()
        for signo, action in actions.items():
            loop.add_signal_handler(signo, action)
        log.info("pgmulti %s started, pid %d", __version__, os.getpid())
        systemd.ready()
    if not app.direct_io.drive_loop():
        log.info("uvloop's libuv functions are not reachable: the loop waits in uvloop's "
                 "epoll set (more CPU per transaction)")
    try:
        await app.stopped
    finally:
        app.direct_io.release_loop()  # before the loop closes: it must not see our handles
        systemd.stopping()  # a console SHUTDOWN does not pass through our signal handlers
        app.janitor.stop()
        remove_pidfile(pidfile)
    log.info("pgmulti stopped")
    return 0


async def _act_on(actions, signo: int) -> None:
    action = actions.get(signo)
    if action is not None:
        action()


async def _stop_when_orphaned(app, parent: int) -> None:
    """A worker whose parent was killed outright stops safely instead of serving on alone."""
    while not app.stopped.done():
        await asyncio.sleep(1.0)
        if os.getppid() != parent and not app.shutting_down:
            log.error("the pgmulti parent process is gone; worker %d shuts down", app.worker_index)
            app.shutdown("servers")


def signal_actions(app, relog=None) -> dict:
    """PgBouncer 1.23+ signals: HUP reload, INT safe, TERM wait for clients, QUIT now,
    USR1 pause, USR2 resume."""
    from .errors import PgError

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

    return {signal.SIGHUP: on_hup, signal.SIGINT: lambda: shutdown("servers"),
            signal.SIGTERM: on_term, signal.SIGQUIT: lambda: shutdown(None),
            signal.SIGUSR1: app.pause, signal.SIGUSR2: app.resume}
