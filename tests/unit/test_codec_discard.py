"""Unit tests for the codec's DEALLOCATE ALL / DISCARD ALL detection (watch_discard).

A server relay with watch_discard set reports a passed CommandComplete whose tag is
DEALLOCATE ALL or DISCARD ALL once per read, after forwarding, before on_ready; every other
tag, and every relay without the flag, passes as before.
"""

import pytest

from pgmulti._codec import (
    INSPECT,
    PASS,
    Relay,
    action_table,
    command_complete,
    ready_for_query,
)

from codec_feed import feed

SERVER_ACTIONS = action_table(PASS, S=INSPECT)


class Peer:
    def __init__(self, log):
        self.log = log

    def write(self, data):
        self.log.append(("write", bytes(data)))

    def get_write_buffer_size(self):
        return 0


class Server(Relay):
    def __init__(self, log):
        self.log = log

    def on_statements_discarded(self):
        self.log.append(("discarded",))

    def on_ready(self, status):
        self.log.append(("ready", status))


def server_relay(watch=True):
    log = []
    relay = Server(log)
    relay.set_actions(SERVER_ACTIONS)
    relay.link_output(Peer(log))
    relay.watch_discard = watch
    return relay, log


def forwarded(log):
    return b"".join(event[1] for event in log if event[0] == "write")


def discards(log):
    return sum(event == ("discarded",) for event in log)


@pytest.mark.parametrize("tag", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_discard_tags_are_reported_after_forwarding_before_ready(tag):
    relay, log = server_relay()
    stream = command_complete(tag) + ready_for_query("I")
    feed(relay, stream)
    assert forwarded(log) == stream
    assert [e for e in log if e[0] != "write"] == [("discarded",), ("ready", ord("I"))]


@pytest.mark.parametrize("tag", ["DEALLOCATE", "DISCARD PLANS", "SELECT 1", "DISCARD TEMP",
                                 "DEALLOCATE AL", "DISCARD ALX"])
def test_other_tags_are_not_reported(tag):
    relay, log = server_relay()
    stream = command_complete(tag) + ready_for_query("I")
    feed(relay, stream)
    assert forwarded(log) == stream
    assert discards(log) == 0


def test_without_the_flag_nothing_is_reported():
    relay, log = server_relay(watch=False)
    feed(relay, command_complete("DISCARD ALL") + ready_for_query("I"))
    assert discards(log) == 0


# A multi-statement simple query: SELECT, DEALLOCATE ALL, SELECT, then ReadyForQuery.
STREAM = (command_complete("SELECT 1") + command_complete("DEALLOCATE ALL")
          + command_complete("SELECT 2") + ready_for_query("I"))


def test_multi_statement_reply_at_every_two_chunk_split():
    for cut in range(1, len(STREAM)):
        relay, log = server_relay()
        feed(relay, STREAM, [cut])
        assert forwarded(log) == STREAM, cut
        assert discards(log) == 1, cut
        assert log[-1] == ("ready", ord("I"))
        assert relay.buffered == 0


def test_multi_statement_reply_one_byte_at_a_time():
    relay, log = server_relay()
    feed(relay, STREAM, range(1, len(STREAM)))
    assert forwarded(log) == STREAM
    assert discards(log) == 1


def test_two_discards_in_one_read_are_reported_once():
    relay, log = server_relay()
    feed(relay, command_complete("DEALLOCATE ALL") + command_complete("DISCARD ALL")
         + ready_for_query("I"))
    assert discards(log) == 1
