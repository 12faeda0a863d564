#!/usr/bin/env python
"""Micro-benchmark of the codec hot path: pgmulti._codec.Relay without sockets.

Feeds a server relay the way uvloop does (get_buffer, fill the view, buffer_updated) with a
null peer transport, and reports messages per second and nanoseconds per read for:

  select-only   one pgbench -S response per read: RowDescription, DataRow, CommandComplete,
                ReadyForQuery (on_ready runs in Python once per read)
  copy-64k      one 64 kB CopyData message, streamed through the default 16 kB buffer
  copy-rows-64k 64 kB of 100-byte CopyData rows (COPY OUT), read through the 16 kB buffer
  baseline      the same Python driver loop against a no-op protocol: subtract it to get the
                relay's own cost (uvloop calls get_buffer / buffer_updated from C)

Each scenario runs a bounded number of iterations, best of --repeat runs.

    python bench/micro/bench_codec.py [--iterations N] [--repeat R]
"""

import argparse
import time

from pgmulti._codec import (
    INSPECT,
    PASS,
    Relay,
    action_table,
    command_complete,
    data_row,
    message,
    ready_for_query,
    row_description,
)

SIZEHINT = 65536


class NullPeer:
    """A transport that accepts every write at once."""

    def write(self, data):
        pass

    def get_write_buffer_size(self):
        return 0


class ServerRelay(Relay):
    def on_ready(self, status):
        pass

    def on_message(self, msg_type, view):
        pass


class NoopProtocol:
    """Driver baseline: a BufferedProtocol that does nothing with the bytes."""

    def __init__(self):
        self._view = memoryview(bytearray(16384))

    def get_buffer(self, sizehint):
        return self._view

    def buffer_updated(self, nbytes):
        pass


def server_relay():
    relay = ServerRelay()
    relay.set_actions(action_table(PASS, S=INSPECT))
    relay.link_output(NullPeer())
    return relay


def select_only_response():
    return b"".join(
        [
            row_description([("abalance", 23)]),
            data_row([-4711]),
            command_complete("SELECT 1"),
            ready_for_query("I"),
        ]
    )


def copy_data_message(size):
    return message(ord("d"), b"x" * (size - 5))


def copy_rows(total, row_size):
    row = copy_data_message(row_size)
    return row * (total // row_size)


def drive(protocol, stream, iterations):
    """Feed `stream` `iterations` times; returns (seconds, reads)."""
    data = memoryview(stream)
    length = len(stream)
    reads = 0
    start = time.perf_counter()
    for _ in range(iterations):
        pos = 0
        while pos < length:
            buffer = protocol.get_buffer(SIZEHINT)
            n = min(len(buffer), length - pos)
            buffer[:n] = data[pos : pos + n]
            protocol.buffer_updated(n)
            pos += n
            reads += 1
    return time.perf_counter() - start, reads


def best_of(repeat, make_protocol, stream, iterations):
    """The fastest of `repeat` runs, each on a fresh protocol: (seconds, reads)."""
    runs = [drive(make_protocol(), stream, iterations) for _ in range(repeat)]
    return min(runs, key=lambda run: run[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="select-only responses")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    select = select_only_response()
    copy_big = copy_data_message(64 * 1024)
    copy_small = copy_rows(64 * 1024, 100)
    copy_iterations = max(1, args.iterations // 20)
    scenarios = [
        ("select-only", server_relay, select, 4, args.iterations),
        ("copy-64k", server_relay, copy_big, 1, copy_iterations),
        ("copy-rows-64k", server_relay, copy_small, len(copy_small) // 100, copy_iterations),
        ("baseline select", NoopProtocol, select, 0, args.iterations),
        ("baseline copy", NoopProtocol, copy_big, 0, copy_iterations),
    ]

    header = f"{'scenario':<16} {'bytes':>7} {'reads':>9} {'ns/read':>9} {'msg/s':>12} {'MB/s':>9}"
    print(header)
    print("-" * len(header))
    for name, make_protocol, stream, messages, iterations in scenarios:
        seconds, reads = best_of(args.repeat, make_protocol, stream, iterations)
        ns_per_read = seconds / reads * 1e9
        rate = f"{messages * iterations / seconds:>12,.0f}" if messages else f"{'-':>12}"
        mb_per_s = len(stream) * iterations / seconds / 1e6
        print(
            f"{name:<16} {len(stream):>7} {reads:>9} {ns_per_read:>9.0f} {rate} {mb_per_s:>9.0f}"
        )


if __name__ == "__main__":
    main()
