"""The control channel between worker processes.

Every worker listens on its own Unix socket in a private directory the parent created. A
worker asks its peers when something needs every process: a CancelRequest for another
worker's client, the admin console's SHOW commands and PAUSE/RESUME/... commands, metrics.
One request per connection: a 4-byte length and a msgpack map, answered the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Awaitable, Callable

import msgspec

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("pgmulti.peers")

ASK_TIMEOUT_S = 10.0          # a peer busy answering PAUSE may take a while; a dead one fails fast
MAX_MESSAGE_BYTES = 64 << 20  # SHOW CLIENTS with many thousand clients stays far below

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def control_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


def control_socket(directory: str, index: int) -> socket.socket:
    """Bound by the parent before the fork, so a restarted worker keeps the same address."""
    path = control_path(directory, index)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def _read_message(reader: asyncio.StreamReader):
    header = await reader.readexactly(4)
    length = int.from_bytes(header, "big")
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(f"control message of {length} bytes refused")
    return _decode(await reader.readexactly(length))


def _frame(message) -> bytes:
    body = _encode(message)
    return len(body).to_bytes(4, "big") + body


def send_signal(directory: str, index: int, signo: int) -> None:
    """From the parent (no event loop there): pass a signal on to a worker. A worker still
    starting finds it waiting in its control socket's backlog."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(control_path(directory, index))
        sock.sendall(_frame({"op": "signal", "signo": int(signo)}))
        try:
            sock.recv(64)  # the answer: the worker has acted on the signal
        except socket.timeout:
            log.info("worker %d is busy; the signal waits for it", index)


Handler = Callable[[dict], Awaitable[object]]


class Peers:
    """This worker's side of the channel: serve requests, ask the other workers."""

    def __init__(self, directory: str, index: int, count: int):
        self.directory = directory
        self.index = index
        self.count = count
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    # -- serving -------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_message(reader)
            handler = self.handlers.get(request.get("op"))
            if handler is None:
                answer = {"error": f"unknown control operation {request.get('op')!r}"}
            else:
                answer = {"result": await handler(request)}
            writer.write(_frame(answer))
            await writer.drain()
        except (OSError, EOFError, asyncio.IncompleteReadError, ValueError,
                msgspec.DecodeError) as exc:
            log.warning("control request failed: %s", exc)
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()

    # -- asking --------------------------------------------------------------------------

    async def ask(self, index: int, op: str, *, timeout: float | None = ASK_TIMEOUT_S, **fields):
        """One peer's answer; raises OSError when it cannot be reached or fails. timeout=None
        waits as long as the answer takes (PAUSE, WAIT_CLOSE wait for transactions to end)."""
        path = control_path(self.directory, index)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), ASK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise OSError(f"worker {index} did not accept a control connection") from None
        try:
            writer.write(_frame({"op": op, **fields}))
            answer = await asyncio.wait_for(_read_message(reader), timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                msgspec.DecodeError) as exc:
            raise OSError(f"worker {index} gave no answer to {op}: {exc or 'timeout'}") from None
        finally:
            writer.close()
        if "error" in answer:
            raise OSError(f"worker {index}: {answer['error']}")
        return answer["result"]

    async def ask_others(self, op: str, *, timeout: float | None = ASK_TIMEOUT_S, **fields) -> list:
        """Every other worker's answer; one that cannot answer (restarting) is left out."""
        results = await asyncio.gather(*(self.ask(i, op, timeout=timeout, **fields)
                                         for i in self.others()),
                                       return_exceptions=True)
        answers = []
        for index, result in zip(self.others(), results):
            if isinstance(result, BaseException):
                log.warning("worker %d left out of %s: %s", index, op, result)
            else:
                answers.append(result)
        return answers

    def tell(self, app: App, index: int, op: str, **fields) -> None:
        """Fire and forget (a cancel request): failures are logged, nobody waits."""
        async def send() -> None:
            try:
                await self.ask(index, op, **fields)
            except OSError as exc:
                log.warning("could not pass %s to worker %d: %s", op, index, exc)
        app.spawn(send())
