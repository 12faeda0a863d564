"""protocol.complete_requests (may a queued client's bytes be dropped as one cancelled
request?) and the cancel-key messages protocol.py builds."""

import struct

from pgmulti import protocol


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


QUERY = message(b"Q", b"SELECT 1\0")
EXTENDED = (message(b"P", b"\0SELECT $1\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
            + message(b"D", b"P\0") + message(b"E", b"\0\0\0\0\0") + message(b"S"))


def test_one_whole_request():
    assert protocol.complete_requests(QUERY) == 1
    assert protocol.complete_requests(EXTENDED) == 1
    assert protocol.complete_requests(message(b"F", b"\0\0\0\1")) == 1


def test_several_requests_are_counted():
    assert protocol.complete_requests(QUERY + EXTENDED) == 2


def test_a_request_cut_anywhere_is_not_whole():
    for data in (QUERY, EXTENDED):
        for cut in range(1, len(data)):
            assert protocol.complete_requests(data[:cut]) == -1, cut


def test_messages_after_the_last_request_are_not_whole():
    assert protocol.complete_requests(QUERY + message(b"P", b"\0x\0\0\0")) == -1
    assert protocol.complete_requests(b"") == 0


def test_a_bad_length_is_not_whole():
    assert protocol.complete_requests(b"Q\0\0\0\x02") == -1


def test_cancel_request_layout():
    msg = protocol.cancel_request(1234, 0xDEADBEEF)
    assert len(msg) == 16
    assert struct.unpack("!IIII", msg) == (16, protocol.CANCEL_REQUEST_CODE, 1234, 0xDEADBEEF)
    assert struct.unpack("!IIii", protocol.cancel_request(-1, -2))[2:] == (-1, -2)
    long_key = bytes(range(32))  # protocol 3.2
    assert protocol.cancel_request(7, long_key) == (
        struct.pack("!III", 44, protocol.CANCEL_REQUEST_CODE, 7) + long_key)


def test_backend_key_data_layout():
    assert protocol.backend_key_data(7, 0xFFFFFFFF) == b"K" + struct.pack("!III", 12, 7, 0xFFFFFFFF)
    assert protocol.backend_key_data(7, b"k" * 32) == (
        b"K" + struct.pack("!II", 40, 7) + b"k" * 32)
