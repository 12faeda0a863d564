"""Worker processes: past one core, which a single PgBouncer process cannot go.

The parent binds every listening socket before forking: per TCP address one SO_REUSEPORT
socket per worker (the kernel spreads new connections over them), one shared Unix socket,
and one control socket per worker (pgmulti.peers). Each worker runs its own event loop and
pools on its sockets. The parent keeps its copies open, so connections that arrive while a
dead worker is being replaced wait in the accept queue instead of being refused. It passes
the signals on, restarts a worker that dies, and exits once all have stopped.

Workers ignore the pooler's signals: a Ctrl-C or a service manager signalling the whole
process group reaches them once, through the parent, over the control channel.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field

from . import listener, peers, systemd

log = logging.getLogger("pgmulti")

FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
RESTART_BACKOFF_S = 1.0   # a worker that keeps dying at start must not spin the CPU
QUICK_DEATH_S = 5.0
MAX_QUICK_DEATHS = 5       # in a row: the configuration cannot work, stop instead


def worker_count(setting: int) -> int:
    """`workers = 0` means one per CPU core this process may run on."""
    if setting > 0:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def share(limit: int, index: int, count: int, at_least_one: bool = True) -> int:
    """Worker `index`'s part of a limit, so the parts add up to it (0 stays "unlimited").

    A limit smaller than the worker count still gives every worker one (at_least_one), or
    the clients that land on a worker without a share could never be served.
    """
    if limit <= 0 or count <= 1:
        return limit
    part = limit // count + (1 if index < limit % count else 0)
    return max(part, 1) if at_least_one else part


@dataclass
class WorkerSockets:
    """What one worker serves: its listening sockets and its control socket."""
    listening: list[tuple[str, str, socket.socket]] = field(default_factory=list)  # kind, label, sock
    control: socket.socket | None = None


class Supervisor:
    def __init__(self, config, count: int, start_worker):
        """start_worker(index, sockets, control_dir) runs a worker in the child process and
        returns its exit code."""
        self.config = config
        self.count = count
        self.start_worker = start_worker
        self.control_dir = tempfile.mkdtemp(prefix="pgmulti-workers-")
        self.sockets = [WorkerSockets() for _ in range(count)]
        self.unix_path: str | None = None
        self.pids: dict[int, int] = {}          # pid -> worker index
        self.started_at: dict[int, float] = {}  # worker index -> monotonic start
        self.stopping = False
        self.failed = False
        self.quick_deaths = 0

    # -- sockets -------------------------------------------------------------------------

    def bind(self) -> None:
        cfg = self.config.pgbouncer
        for host in listener.listen_addresses(cfg.listen_addr):
            for worker in self.sockets:
                sock = listener.tcp_socket(host, cfg.listen_port, cfg.listen_backlog, reuseport=True)
                worker.listening.append(("tcp", f"{host}:{cfg.listen_port}", sock))
            log.info("listening on %s:%d (%d workers)", host, cfg.listen_port, self.count)
        if cfg.unix_socket_dir:
            mode = listener.socket_mode(cfg.unix_socket_mode)
            sock, self.unix_path = listener.unix_socket(cfg.unix_socket_dir, cfg.listen_port,
                                                        cfg.listen_backlog, mode,
                                                        cfg.unix_socket_group)
            for worker in self.sockets:
                worker.listening.append(("unix", self.unix_path, sock))
            log.info("listening on unix:%s", self.unix_path)
        if not self.sockets[0].listening:
            raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")
        for index, worker in enumerate(self.sockets):
            worker.control = peers.control_socket(self.control_dir, index)

    def close_listening(self) -> None:
        """Shutting down: the workers' copies are the last ones, so their close ends listening."""
        for worker in self.sockets:
            for _, _, sock in worker.listening:
                sock.close()

    # -- workers -------------------------------------------------------------------------

    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                self._become_worker(index)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(1)  # _become_worker leaves through os._exit
        self.pids[pid] = index
        self.started_at[index] = time.monotonic()
        log.info("worker %d started, pid %d", index, pid)

    def _become_worker(self, index: int) -> None:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears from the parent only
        mine = self.sockets[index]
        for other, worker in enumerate(self.sockets):
            if other == index:
                continue
            worker.control.close()
            for kind, _, sock in worker.listening:
                if kind == "tcp":
                    sock.close()
        code = self.start_worker(index, mine, self.control_dir)
        os._exit(code or 0)

    def run(self) -> int:
        """Start the workers and supervise them until every one has stopped."""
        watched = set(FORWARDED_SIGNALS) | {signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            for index in range(self.count):
                self.spawn(index)
            systemd.ready()
            while self.pids:
                info = signal.sigtimedwait(watched, 1.0)
                if info is None:
                    continue
                if info.si_signo == signal.SIGCHLD:
                    self._reap()
                else:
                    self._forward(info.si_signo)
            return 1 if self.failed else 0
        finally:
            self.cleanup()

    def _forward(self, signo: int) -> None:
        if signo in STOP_SIGNALS:
            if not self.stopping:
                systemd.stopping()
                self.close_listening()
            self.stopping = True
        elif signo == signal.SIGHUP:
            systemd.reloading()
        for index in sorted(self.pids.values()):
            try:
                peers.send_signal(self.control_dir, index, signo)
            except OSError as exc:
                log.warning("could not pass signal %d to worker %d: %s", signo, index, exc)
        if signo == signal.SIGHUP:
            systemd.ready()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d (pid %d) stopped", index, pid)
                continue
            if code == 0:
                # A worker ends cleanly only when told to (console SHUTDOWN): all stop.
                log.info("worker %d (pid %d) exited; stopping the other workers", index, pid)
                self._forward(signal.SIGTERM)
                continue
            log.error("worker %d (pid %d) died (%s); starting a new one", index, pid,
                      f"exit code {code}" if code >= 0 else f"signal {-code}")
            if time.monotonic() - self.started_at.get(index, 0.0) < QUICK_DEATH_S:
                self.quick_deaths += 1
                if self.quick_deaths >= MAX_QUICK_DEATHS:
                    log.error("workers keep dying right after starting; stopping pgmulti")
                    self.failed = True
                    self._forward(signal.SIGQUIT)
                    continue
                time.sleep(RESTART_BACKOFF_S)
            else:
                self.quick_deaths = 0
            self.spawn(index)

    def cleanup(self) -> None:
        self.close_listening()
        for worker in self.sockets:
            if worker.control is not None:
                worker.control.close()
        shutil.rmtree(self.control_dir, ignore_errors=True)
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
