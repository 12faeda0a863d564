"""Cancel keys and the random bytes they are made of (pgmulti._codec)."""

from __future__ import annotations

import os

import pytest

from pgmulti._codec import WORKER_SHIFT, new_cancel_key, random_bytes


@pytest.mark.parametrize("key_length", [4, 32, 256])
def test_a_cancel_key_names_its_worker_and_has_the_asked_length(key_length):
    for worker in (0, 1, 127):
        for _ in range(200):
            pid, key = new_cancel_key(worker, key_length)
            assert pid >> WORKER_SHIFT == worker
            assert pid & ((1 << WORKER_SHIFT) - 1) != 0  # never 0: 0 reads as "no key"
            assert 0 < pid < 2**31  # a positive int32, as PostgreSQL's process ids
            assert isinstance(key, bytes) and len(key) == key_length


def test_cancel_keys_do_not_repeat_across_many_draws_of_the_page():
    # 2,000 keys of 32 bytes go through the 4 KiB page many times over.
    keys = {new_cancel_key(0, 32)[1] for _ in range(2000)}
    assert len(keys) == 2000
    pids = {new_cancel_key(0, 4)[0] for _ in range(2000)}
    assert len(pids) > 1990  # 24 random bits: a few collisions are possible, not many


def test_bad_key_lengths_are_refused():
    for length in (0, 3, 257):
        with pytest.raises(ValueError):
            new_cancel_key(0, length)
    with pytest.raises(ValueError):
        random_bytes(4097)


def test_a_forked_worker_draws_other_bytes_than_its_parent():
    random_bytes(8)  # the parent holds a page drawn before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next bytes and leave at once
        try:
            os.write(write_end, random_bytes(64))
        finally:
            os._exit(0)
    os.close(write_end)
    child = b""
    while len(child) < 64:
        chunk = os.read(read_end, 64)
        if not chunk:
            break
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 64
    assert random_bytes(64) != child
