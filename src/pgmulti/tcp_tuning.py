"""PgBouncer's tcp_* settings on sockets: keepalive, user timeout, buffer sizes, deferred accept.

PgBouncer sets them on every socket it accepts or connects. pgmulti sets them on its TCP
listening sockets instead, where Linux copies them into each accepted socket, so a login
costs no system call for them, and on each server connection once it is connected.
"""

from __future__ import annotations

import socket

# PgBouncer enables TCP_DEFER_ACCEPT with this fixed number of seconds.
DEFER_ACCEPT_SECONDS = 45

_KEEPALIVE_TIMES = (
    # (setting, socket option)
    ("tcp_keepidle", getattr(socket, "TCP_KEEPIDLE", None)),
    ("tcp_keepintvl", getattr(socket, "TCP_KEEPINTVL", None)),
    ("tcp_keepcnt", getattr(socket, "TCP_KEEPCNT", None)),
)
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", None)

_os_defaults: dict[int, int] = {}


def _os_default(option: int) -> int:
    """The kernel's value of a keepalive option for a socket that never set it (a setting of
    0 means this; a RELOAD back to 0 must put it back on the listening sockets)."""
    if option not in _os_defaults:
        with socket.socket() as probe:
            _os_defaults[option] = probe.getsockopt(socket.IPPROTO_TCP, option)
    return _os_defaults[option]


def _set(sock: socket.socket, level: int, option: int, value: int, setting: str) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise OSError(exc.errno, f"{setting} = {value}: {exc.strerror}") from None


def tune(sock: socket.socket, cfg) -> None:
    """Apply tcp_keepalive, tcp_keepidle/intvl/cnt, tcp_user_timeout and tcp_socket_buffer
    (`cfg`: the [pgbouncer] settings) to a TCP socket; OSError names a setting refused."""
    _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(cfg.tcp_keepalive), "tcp_keepalive")
    if cfg.tcp_keepalive:
        for setting, option in _KEEPALIVE_TIMES:
            if option is not None:
                value = getattr(cfg, setting) or _os_default(option)
                _set(sock, socket.IPPROTO_TCP, option, value, setting)
    if _USER_TIMEOUT is not None:
        _set(sock, socket.IPPROTO_TCP, _USER_TIMEOUT, cfg.tcp_user_timeout, "tcp_user_timeout")
    elif cfg.tcp_user_timeout:
        raise OSError("tcp_user_timeout is not supported on this platform")
    if cfg.tcp_socket_buffer:
        # Buffers once fixed stay fixed (the kernel stops sizing them itself): a RELOAD back
        # to 0 applies to sockets made afterwards only.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            _set(sock, socket.SOL_SOCKET, option, cfg.tcp_socket_buffer, "tcp_socket_buffer")


def tune_listening(sock: socket.socket, cfg) -> None:
    """tune(), TCP_NODELAY (as PgBouncer sets on every client socket) and tcp_defer_accept
    for a TCP listening socket: with the latter the kernel hands over a connection only once
    the client has sent something (its startup or SSL request)."""
    tune(sock, cfg)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _DEFER_ACCEPT is not None:
        seconds = DEFER_ACCEPT_SECONDS if cfg.tcp_defer_accept else 0
        _set(sock, socket.IPPROTO_TCP, _DEFER_ACCEPT, seconds, "tcp_defer_accept")
