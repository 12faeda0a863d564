"""The TLS objects pgmulti's contexts make: SSLObject's read/write/pending without the Python
wrappers, with the same results and errors (uvloop calls them once per record)."""

from __future__ import annotations

import ssl
import textwrap

import pytest

from pgmulti import tls
from pgmulti.certs import CertificateAuthority
from pgmulti.loader import parse_config_text


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"))
    issued = ca.issue("server", "localhost", ("localhost", "127.0.0.1"))
    cfg = parse_config_text(textwrap.dedent(f"""\
        [pgbouncer]
        client_tls_sslmode = require
        client_tls_cert_file = {issued.cert_file}
        client_tls_key_file = {issued.key_file}
        server_tls_sslmode = verify-ca
        server_tls_ca_file = {ca.cert_file}
        """), "tls.ini").pgbouncer
    return tls.client_context(cfg), tls.server_context(cfg)


def _pump(source: ssl.MemoryBIO, sink: ssl.MemoryBIO) -> None:
    data = source.read()
    if data:
        sink.write(data)


def _connected_pair(contexts):
    """pgmulti as TLS server towards a client, and as TLS client towards a server, joined."""
    as_server, as_client = contexts
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = as_server.wrap_bio(s_in, s_out, server_side=True)
    client = as_client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
        if done == 2:
            break
    else:
        pytest.fail("TLS handshake did not finish")
    return (server, s_in, s_out), (client, c_in, c_out)


def test_both_contexts_make_objects_calling_the_c_methods_directly(contexts):
    (server, *_), (client, *_) = _connected_pair(contexts)
    for obj in (server, client):
        assert isinstance(obj, ssl.SSLObject)
        assert obj.read.__self__ is obj._sslobj
        assert obj.write.__self__ is obj._sslobj
        assert obj.pending.__self__ is obj._sslobj
        assert obj.version() in ("TLSv1.2", "TLSv1.3")
        assert obj.selected_alpn_protocol() == tls.ALPN_POSTGRESQL


def test_records_read_into_a_buffer_or_as_bytes_as_ssl_object_does(contexts):
    (server, s_in, s_out), (client, c_in, c_out) = _connected_pair(contexts)
    with pytest.raises(ssl.SSLWantReadError):
        server.read(100)
    assert client.write(b"Q" * 300) == 300
    _pump(c_out, s_in)
    buffer = bytearray(1000)
    view = memoryview(buffer)
    assert server.read(100, view) == 100
    assert server.pending() == 200
    assert server.read(1000, view[100:]) == 200
    assert bytes(buffer[:300]) == b"Q" * 300
    with pytest.raises(ssl.SSLWantReadError):
        server.read(100, view)

    server.write(memoryview(b"reply"))
    _pump(s_out, c_in)
    assert client.read(1024) == b"reply"


def test_clients_get_no_session_tickets_as_from_postgresql(contexts):
    """libpq never resumes a TLS session; tickets would only cost handshake time."""
    (server, s_in, s_out), (client, c_in, c_out) = _connected_pair(contexts)
    server.write(b"after the handshake")
    _pump(s_out, c_in)
    assert client.read(1024) == b"after the handshake"  # reads any ticket sent before it
    assert client.version() == "TLSv1.3"
    assert client.session is None or not client.session.has_ticket
