"""Listening sockets: TCP on listen_addr/listen_port and PostgreSQL's Unix socket name."""

from __future__ import annotations

import asyncio
import functools
import grp
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING

from . import tcp_tuning
from ._codec import Acceptor
from .client import ClientConnection

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgmulti.listener")


def listen_addresses(value: str | None) -> list[str]:
    """`*` means every IPv4 and IPv6 address; otherwise a comma-separated list."""
    if not value:
        return []
    result: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part == "*":
            result += ["0.0.0.0", "::"]
        elif part:
            result.append(part)
    return result


def tcp_socket(host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "*" binds :: and 0.0.0.0 separately, as PgBouncer does.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def unix_socket(directory: str, port: int, backlog: int, mode: int,
                group: str = "") -> tuple[socket.socket, str]:
    """The listening socket .s.PGSQL.<port> in `directory`, with unix_socket_mode and, if
    given, unix_socket_group."""
    path = os.path.join(directory, f".s.PGSQL.{port}")
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        # A socket file left by a dead process; a live one would accept our probe.
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(f"{path} is in use by another process")
        finally:
            probe.close()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(f"unix_socket_group: unknown group {group!r}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, path


# How long every listening socket stops accepting after accept() failed (out of descriptors,
# most likely), as in PgBouncer: the clients already connected go on meanwhile.
ACCEPT_RETRY_DELAY = 5.0


class Listener:
    """Owns the listening sockets; the codec accepts their connections (Acceptor) into
    transports of its own, each given to a new ClientConnection."""

    def __init__(self, app: App):
        self.app = app
        self.acceptors: list[Acceptor] = []
        self.tcp_sockets: list[socket.socket] = []
        self.unix_path: str | None = None
        self.addresses: list[str] = []

    def start(self, sockets=None) -> None:
        """Open the configured sockets, or serve `sockets` (kind, label, socket) that a
        parent process bound for this worker (pgmulti.supervisor); those it does not unlink."""
        if sockets is not None:
            self._serve_inherited(sockets)
            return
        cfg = self.app.config.pgbouncer
        for host in listen_addresses(cfg.listen_addr):
            sock = tcp_socket(host, cfg.listen_port, cfg.listen_backlog, bool(cfg.so_reuseport))
            self._serve("tcp", sock)
            self.addresses.append(f"{host}:{cfg.listen_port}")
            log.info("listening on %s:%d", host, cfg.listen_port)
        if cfg.unix_socket_dir:
            mode = socket_mode(cfg.unix_socket_mode)
            sock, path = unix_socket(cfg.unix_socket_dir, cfg.listen_port, cfg.listen_backlog, mode,
                                     cfg.unix_socket_group)
            self._serve("unix", sock)
            self.unix_path = path
            log.info("listening on unix:%s", path)
        if not self.acceptors:
            raise OSError("nothing to listen on: set listen_addr or unix_socket_dir")

    def _serve_inherited(self, sockets) -> None:
        for kind, label, sock in sockets:
            self._serve(kind, sock)
            self.addresses.append(label)

    def _serve(self, kind: str, sock: socket.socket) -> None:
        if kind == "tcp":
            tcp_tuning.tune_listening(sock, self.app.config.pgbouncer)
            self.tcp_sockets.append(sock)
        acceptor = Acceptor(sock, self._client_factory(kind), self.app.direct_io,
                            functools.partial(self._accept_failed, sock))
        acceptor.start()
        self.acceptors.append(acceptor)

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        log.error("accept() failed on %s: %s", sock.getsockname() or "unix socket", exc)
        if not any(acceptor.accepting for acceptor in self.acceptors):
            return  # already waiting
        for acceptor in self.acceptors:
            acceptor.stop()
        asyncio.get_running_loop().call_later(ACCEPT_RETRY_DELAY, self._resume, self.acceptors)

    def _resume(self, acceptors: list[Acceptor]) -> None:
        if acceptors is self.acceptors:  # not closed meanwhile (shutdown)
            for acceptor in acceptors:
                acceptor.start()

    def retune(self) -> None:
        """RELOAD/SET: the tcp_* settings as they are now, for connections accepted from now on."""
        cfg = self.app.config.pgbouncer
        for sock in self.tcp_sockets:
            try:
                tcp_tuning.tune_listening(sock, cfg)
            except OSError as exc:
                log.warning("could not apply tcp_* settings to a listening socket: %s", exc)

    def _client_factory(self, kind: str):
        """A new ClientConnection per accepted socket (a partial: no Python frame of its own)."""
        return functools.partial(ClientConnection, self.app, kind)

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors = []
        self.tcp_sockets = []
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None


def socket_mode(value) -> int:
    if isinstance(value, int):
        return value
    return int(str(value), 0) if str(value).startswith("0") else int(str(value), 8)
