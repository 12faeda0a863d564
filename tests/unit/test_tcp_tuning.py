"""tcp_tuning: options set on a listening socket are the accepted sockets' options."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from pgmulti import tcp_tuning

TCP = socket.IPPROTO_TCP


def settings(**changes) -> SimpleNamespace:
    values = dict(tcp_keepalive=True, tcp_keepidle=0, tcp_keepintvl=0, tcp_keepcnt=0,
                  tcp_user_timeout=0, tcp_socket_buffer=0, tcp_defer_accept=False)
    return SimpleNamespace(**{**values, **changes})


def accepted(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.sendall(b"x")  # deferred accept hands over only connections with data
    listener.settimeout(5)
    server_side, _ = listener.accept()
    return client, server_side


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def options(sock: socket.socket) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(TCP, socket.TCP_KEEPIDLE),
        "intvl": sock.getsockopt(TCP, socket.TCP_KEEPINTVL),
        "cnt": sock.getsockopt(TCP, socket.TCP_KEEPCNT),
        "user_timeout": sock.getsockopt(TCP, socket.TCP_USER_TIMEOUT),
        "nodelay": sock.getsockopt(TCP, socket.TCP_NODELAY),
    }


def test_accepted_sockets_take_the_listening_sockets_settings(listener):
    tcp_tuning.tune_listening(listener, settings(
        tcp_keepidle=17, tcp_keepintvl=5, tcp_keepcnt=3, tcp_user_timeout=1234,
        tcp_socket_buffer=65536, tcp_defer_accept=True))
    assert listener.getsockopt(TCP, socket.TCP_DEFER_ACCEPT) > 0
    client, server_side = accepted(listener)
    with client, server_side:
        assert options(server_side) == {"keepalive": 1, "idle": 17, "intvl": 5, "cnt": 3,
                                        "user_timeout": 1234, "nodelay": 1}
        # The kernel doubles what is set, for its bookkeeping.
        assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536


def test_settings_back_to_zero_restore_the_kernels_defaults(listener):
    with socket.socket() as fresh:
        defaults = options(fresh)
    tcp_tuning.tune_listening(listener, settings(tcp_keepidle=17, tcp_keepintvl=5,
                                                 tcp_keepcnt=3, tcp_user_timeout=1234,
                                                 tcp_defer_accept=True))
    tcp_tuning.tune_listening(listener, settings())  # a RELOAD to the defaults
    assert listener.getsockopt(TCP, socket.TCP_DEFER_ACCEPT) == 0
    client, server_side = accepted(listener)
    with client, server_side:
        assert options(server_side) == {**defaults, "keepalive": 1, "nodelay": 1}


def test_keepalive_off(listener):
    tcp_tuning.tune_listening(listener, settings(tcp_keepalive=False, tcp_keepidle=17))
    client, server_side = accepted(listener)
    with client, server_side:
        assert options(server_side)["keepalive"] == 0


def test_a_value_the_kernel_refuses_is_an_error(listener):
    with pytest.raises(OSError, match="tcp_keepcnt = 100000: Invalid argument"):
        tcp_tuning.tune(listener, settings(tcp_keepcnt=100000))
