"""Feeding bytes to a codec Relay the way uvloop's BufferedProtocol does, split anywhere."""

SIZEHINT = 65536


def feed(relay, data, cuts=()):
    """Deliver data to the relay through get_buffer/buffer_updated, split at the offsets."""
    data = memoryview(data)
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        pos = a
        while pos < b:
            buffer = relay.get_buffer(SIZEHINT)
            n = min(len(buffer), b - pos)
            with memoryview(buffer) as target:
                target[:n] = data[pos:pos + n]
                relay.buffer_updated(n)
            pos += n


def single_splits(data):
    """No split, then a split at every byte boundary of data."""
    return [()] + [(cut,) for cut in range(1, len(data))]
