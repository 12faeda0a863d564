"""systemd ``Type=notify`` support without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

The service manager passes the path of a Unix datagram socket in ``NOTIFY_SOCKET`` (a
leading ``@`` means Linux's abstract namespace).  We send the same messages PgBouncer
sends through ``sd_notify()``:

* ``READY=1`` once the listening sockets are open (after ``App.start()``);
* ``RELOADING=1`` with ``MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`` when a reload starts and
  ``READY=1`` when it is over, whether it worked or not (so ``Type=notify-reload`` works too);
* ``STOPPING=1`` when shutdown starts.

Without ``NOTIFY_SOCKET`` every call is a no-op.  Sending never raises: a service manager
that went away must not take the pooler down with it.

The module remembers the last state it announced, so a reload or shutdown announced at
two levels (the signal handler in ``cli.py`` and ``App`` itself) is sent once: a second
``reloading()`` during a reload, a second ``ready()`` after a reload, and anything but
``stopping()`` after ``STOPPING=1`` are dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pgmulti.systemd")

_state: str | None = None  # None, "ready", "reloading" or "stopping"


def socket_address(value: str | None = None) -> str | None:
    """The address to send to: ``$NOTIFY_SOCKET`` with ``@`` turned into a NUL byte.

    None when the variable is unset or names something other than a Unix socket
    (``vsock:`` addresses are not supported).
    """
    value = os.environ.get("NOTIFY_SOCKET") if value is None else value
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None


def enabled() -> bool:
    return socket_address() is not None


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) as one newline-separated datagram.

    Returns True when sent, False when there is no socket or sending failed (logged).
    """
    address = socket_address()
    if address is None:
        return False
    data = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # the manager's queue is normally never full; never hang
            sock.sendto(data, address)
    except OSError as exc:
        log.warning("could not notify the service manager (%s): %s",
                    " ".join(fields), exc)
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ready() -> None:
    """READY=1: started, or a reload is over. Dropped when already ready or stopping."""
    global _state
    if _state in ("ready", "stopping"):
        return
    _state = "ready"
    notify("READY=1")


def reloading() -> None:
    """RELOADING=1 + MONOTONIC_USEC: a reload starts. Dropped during a reload or stop."""
    global _state
    if _state in ("reloading", "stopping"):
        return
    _state = "reloading"
    notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def stopping() -> None:
    """STOPPING=1: shutdown starts. Sent once."""
    global _state
    if _state == "stopping":
        return
    _state = "stopping"
    notify("STOPPING=1")


def status(text: str) -> None:
    """STATUS=text: a free-form line ``systemctl status`` shows."""
    notify("STATUS=" + text.replace("\n", " "))


def reset() -> None:
    """Forget the announced state (for tests)."""
    global _state
    _state = None
