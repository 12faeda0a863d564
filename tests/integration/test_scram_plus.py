"""SCRAM-SHA-256-PLUS (tls-server-end-point channel binding) between clients and pgmulti."""

from __future__ import annotations

import psycopg
import pytest

from pgmulti.certs import CertificateAuthority


@pytest.fixture
def tls_proxy(pgmulti, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    cert = ca.issue("server", "localhost", ("localhost", "127.0.0.1"))
    proxy = pgmulti({"auth_type": "scram-sha-256", "client_tls_sslmode": "prefer",
                     "client_tls_cert_file": cert.cert_file,
                     "client_tls_key_file": cert.key_file})
    return proxy


def dsn(proxy, **options) -> str:
    parts = {"host": "127.0.0.1", "port": proxy.port, "user": "scramuser",
             "password": "scrampass", "dbname": "testdb", "connect_timeout": 5, **options}
    return " ".join(f"{key}={value}" for key, value in parts.items())


def test_channel_binding_required_over_tls(tls_proxy):
    with psycopg.connect(dsn(tls_proxy, sslmode="require", channel_binding="require")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scramuser",)
        assert conn.pgconn.ssl_in_use


def test_plain_scram_still_works_without_tls(tls_proxy):
    with psycopg.connect(dsn(tls_proxy, sslmode="disable")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_channel_binding_cannot_be_required_without_tls(tls_proxy):
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(dsn(tls_proxy, sslmode="disable", channel_binding="require"))


def test_wrong_password_with_channel_binding_fails(tls_proxy):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(tls_proxy, sslmode="require", channel_binding="require",
                            password="wrong"))
