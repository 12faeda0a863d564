"""Tests for pgmulti.auth: auth file parsing, md5 and SCRAM-SHA-256(-PLUS)."""

import base64
import datetime
import hashlib
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from pgmulti.auth import (
    AuthError,
    AuthFileError,
    ScramClient,
    ScramSecret,
    ScramServer,
    build_scram_secret,
    check_md5_response,
    check_plain,
    constant_time_equals,
    load_userlist,
    md5_response,
    md5_secret,
    parse_scram_secret,
    parse_userlist,
    secret_kind,
    tls_server_end_point,
)

# RFC 7677 section 3 test vector.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def expected_scram_secret(password_bytes: bytes, salt: bytes, iterations: int) -> str:
    """Independent RFC 5802 computation of a PostgreSQL SCRAM secret."""
    salted = hashlib.pbkdf2_hmac("sha256", password_bytes, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def run_exchange(client: ScramClient, server: ScramServer) -> None:
    """Drive a full SCRAM exchange; raises AuthError if any side rejects."""
    server_first = server.first(client.first())
    server_final = server.final(client.final(server_first))
    client.verify(server_final)


def rfc_server() -> ScramServer:
    secret = build_scram_secret(RFC_PASSWORD, salt=RFC_SALT, iterations=4096)
    return ScramServer(secret, nonce_factory=lambda: RFC_SERVER_NONCE)


def challenged_server(stored: str = "secret") -> tuple[ScramServer, bytes]:
    """A server that has answered a client-first-message, and that answer."""
    server = ScramServer(stored, nonce_factory=lambda: "servernonce")
    return server, server.first(b"n,,n=,r=clientnonce")


# ---------------------------------------------------------------------------
# Auth file
# ---------------------------------------------------------------------------


class TestParseUserlist:
    def test_basic_lines_and_extra_fields(self):
        text = '"alice" "secret"\n"bob" "md5abc" extra "fields" ignored\n'
        assert parse_userlist(text) == {"alice": "secret", "bob": "md5abc"}

    def test_doubled_quotes_are_unescaped(self):
        text = '"a""b" "pa""ss""word"\n"c" """"\n'
        assert parse_userlist(text) == {'a"b': 'pa"ss"word', "c": '"'}

    def test_comments_blank_lines_and_whitespace(self):
        text = (
            "; semicolon comment\n"
            "# hash comment\n"
            "\n"
            "   \t\n"
            '  "alice"\t  "pw with spaces"  \r\n'
            '   ; indented comment "x" "y"\n'
        )
        assert parse_userlist(text) == {"alice": "pw with spaces"}

    def test_empty_password_and_special_characters(self):
        text = '"u1" ""\n"u2" "a;b#c d\u2028e"\n'
        assert parse_userlist(text) == {"u1": "", "u2": "a;b#c d\u2028e"}

    def test_later_line_wins(self):
        assert parse_userlist('"u" "one"\n"u" "two"\n') == {"u": "two"}

    def test_empty_text(self):
        assert parse_userlist("") == {}

    @pytest.mark.parametrize(
        ("text", "line", "problem"),
        [
            ('"ok" "pw"\nalice "pw"\n', 2, "user name"),
            ('"ok" "pw"\n\n"alice\n', 3, "unterminated"),
            ('"alice"\n', 1, "password"),
            ('"alice" secret\n', 1, "password"),
            ('"alice" "secret\n', 1, "unterminated"),
            ('"alice" "pw""\n', 1, "unterminated"),
            ('"" "pw"\n', 1, "empty user name"),
        ],
    )
    def test_malformed_lines_report_path_and_line(self, text, line, problem):
        with pytest.raises(AuthFileError) as excinfo:
            parse_userlist(text, "/etc/userlist.txt")
        message = str(excinfo.value)
        assert message.startswith(f"/etc/userlist.txt:{line}: ")
        assert problem in message
        assert excinfo.value.line == line

    def test_default_path_in_message(self):
        with pytest.raises(AuthFileError, match=r"^<auth_file>:1: "):
            parse_userlist("garbage")

    def test_load_userlist_reads_file(self, tmp_path):
        path = tmp_path / "userlist.txt"
        path.write_bytes(b'"alice" "secret"\n"bob" "caf\xc3\xa9"\n')
        assert load_userlist(str(path)) == {"alice": "secret", "bob": "caf\u00e9"}

    def test_load_userlist_keeps_non_utf8_bytes(self, tmp_path):
        path = tmp_path / "userlist.txt"
        path.write_bytes(b'"alice" "pw\xff"\n')
        password = load_userlist(str(path))["alice"]
        # SCRAM then hashes the original bytes, as PostgreSQL does.
        secret = build_scram_secret(password, salt=b"salt", iterations=1)
        assert secret == expected_scram_secret(b"pw\xff", b"salt", 1)

    def test_load_userlist_error_names_the_file(self, tmp_path):
        path = tmp_path / "userlist.txt"
        path.write_text('"alice" "pw"\nbroken\n')
        with pytest.raises(AuthFileError, match=rf"^{path}:2: "):
            load_userlist(str(path))


# ---------------------------------------------------------------------------
# Secret kinds, md5 and plain checks
# ---------------------------------------------------------------------------


def md5hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class TestSecretKind:
    def test_kinds(self):
        assert secret_kind("md5" + "0" * 32) == "md5"
        assert secret_kind(md5_secret("pw", "user")) == "md5"
        assert secret_kind(build_scram_secret("pw")) == "scram"
        assert secret_kind("plain password") == "plain"
        assert secret_kind("") == "plain"

    @pytest.mark.parametrize(
        "secret",
        [
            "md5" + "A" * 32,  # uppercase hex is not an md5 secret
            "md5" + "0" * 31,
            "md5" + "0" * 33,
            "SCRAM-SHA-256$4096:c2FsdA==$short:keys",
            "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$abc:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        ],
    )
    def test_near_misses_are_plain(self, secret):
        assert secret_kind(secret) == "plain"


class TestMd5:
    def test_md5_secret_matches_postgresql_formula(self):
        assert md5_secret("foo", "bar") == "md5" + md5hex(b"foobar")
        assert md5_secret("foo", "bar") == "md53858f62230ac3c915f300c664312c63f"

    def test_md5_response_from_plain_and_from_secret(self):
        salt = b"\x01\x02\x03\x04"
        expected = "md5" + md5hex(md5hex(b"foobar").encode() + salt)
        assert md5_response("foo", "bar", salt) == expected
        assert md5_response(md5_secret("foo", "bar"), "bar", salt) == expected

    def test_check_md5_response(self):
        salt = b"abcd"
        response = md5_response("foo", "bar", salt)
        assert check_md5_response("foo", "bar", salt, response)
        assert check_md5_response(md5_secret("foo", "bar"), "bar", salt, response)
        assert not check_md5_response("other", "bar", salt, response)
        assert not check_md5_response("foo", "baz", salt, response)
        assert not check_md5_response("foo", "bar", b"dcba", response)
        assert not check_md5_response("foo", "bar", salt, "garbage")

    def test_scram_secret_cannot_check_md5(self):
        salt = b"abcd"
        response = md5_response("foo", "bar", salt)
        assert not check_md5_response(build_scram_secret("foo"), "bar", salt, response)

    def test_empty_stored_password_never_authenticates(self):
        salt = b"abcd"
        assert not check_md5_response("", "bar", salt, md5_response("", "bar", salt))


class TestCheckPlain:
    @pytest.mark.parametrize("kind", ["plain", "md5", "scram"])
    def test_each_secret_kind(self, kind):
        stored = {
            "plain": "s3cret",
            "md5": md5_secret("s3cret", "alice"),
            "scram": build_scram_secret("s3cret"),
        }[kind]
        assert secret_kind(stored) == kind
        assert check_plain(stored, "alice", "s3cret")
        assert not check_plain(stored, "alice", "wrong")

    def test_md5_secret_is_bound_to_the_user(self):
        assert not check_plain(md5_secret("s3cret", "alice"), "bob", "s3cret")

    def test_empty_password_is_rejected(self):
        assert not check_plain("", "alice", "")


def test_constant_time_equals():
    assert constant_time_equals("abc", "abc")
    assert constant_time_equals(b"abc", b"abc")
    assert constant_time_equals("caf\u00e9", "caf\u00e9".encode())
    assert not constant_time_equals("abc", "abd")
    assert not constant_time_equals(b"abc", b"ab")


# ---------------------------------------------------------------------------
# SCRAM secrets and SASLprep
# ---------------------------------------------------------------------------


class TestScramSecret:
    def test_build_matches_independent_computation(self):
        salt = bytes(range(16))
        secret = build_scram_secret("secret", salt=salt, iterations=4096)
        assert secret == expected_scram_secret(b"secret", salt, 4096)

    def test_build_rfc_vector_secret(self):
        secret = build_scram_secret(RFC_PASSWORD, salt=RFC_SALT)
        assert secret == expected_scram_secret(b"pencil", RFC_SALT, 4096)

    def test_parse_round_trip(self):
        salt = b"0123456789abcdef"
        secret = build_scram_secret("pw", salt=salt, iterations=10)
        parsed = parse_scram_secret(secret)
        assert isinstance(parsed, ScramSecret)
        assert parsed.iterations == 10
        assert parsed.salt == salt
        assert len(parsed.stored_key) == len(parsed.server_key) == 32
        assert str(parsed) == secret

    def test_repr_hides_keys(self):
        parsed = parse_scram_secret(build_scram_secret("pw"))
        assert "stored_key" not in repr(parsed)
        assert "server_key" not in repr(parsed)

    def test_random_salt_by_default(self):
        first, second = build_scram_secret("pw"), build_scram_secret("pw")
        assert first != second
        assert parse_scram_secret(first).iterations == 4096
        assert len(parse_scram_secret(first).salt) == 16

    @pytest.mark.parametrize(
        "secret", ["", "plain", "md5" + "0" * 32, "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA"]
    )
    def test_parse_rejects_malformed(self, secret):
        with pytest.raises(ValueError):
            parse_scram_secret(secret)

    def test_build_rejects_bad_parameters(self):
        with pytest.raises(ValueError):
            build_scram_secret("pw", salt=b"", iterations=4096)
        with pytest.raises(ValueError):
            build_scram_secret("pw", salt=b"salt", iterations=0)


class TestSaslprep:
    SALT = b"fixed-salt"

    def secret(self, password: str) -> str:
        return build_scram_secret(password, salt=self.SALT, iterations=1)

    @pytest.mark.parametrize(
        ("password", "prepared"),
        [
            ("pass\u00a0word", "pass word"),  # C.1.2 non-ASCII space -> SPACE
            ("pass\u2003word", "pass word"),  # EM SPACE is C.1.2 too
            ("pass\u00adword", "password"),  # B.1 SOFT HYPHEN -> nothing
            ("\u2168", "IX"),  # NFKC: ROMAN NUMERAL NINE (RFC 4013 example)
            ("\u00aa", "a"),  # NFKC: FEMININE ORDINAL INDICATOR (RFC 4013 example)
            ("cafe\u0301", "caf\u00e9"),  # NFKC composes combining accents
        ],
    )
    def test_prepared_password_gives_same_secret(self, password, prepared):
        assert self.secret(password) == self.secret(prepared)
        assert self.secret(password) == expected_scram_secret(prepared.encode(), self.SALT, 1)

    @pytest.mark.parametrize(
        "password",
        [
            "caf\u00e9\u0007",  # C.2.1 ASCII control in a non-ASCII string
            "caf\u00e9\u200e",  # C.8 LEFT-TO-RIGHT MARK
            "\u0627a\u0628",  # RandALCat mixed with LCat
            "\u0627\u0031",  # RandALCat string must also end with RandALCat
            "\u00ad",  # maps to nothing: empty result
            "\u0221x\u00e9",  # U+0221 is unassigned in Unicode 3.2 (A.1)
        ],
    )
    def test_prohibited_passwords_use_raw_bytes(self, password):
        # PostgreSQL does not reject these: it hashes the password as given.
        assert self.secret(password) == expected_scram_secret(password.encode(), self.SALT, 1)

    def test_valid_bidi_string_is_prepared(self):
        password = "\u0627\u0031\u0628"  # RandALCat first and last
        assert self.secret(password) == expected_scram_secret(password.encode(), self.SALT, 1)

    def test_ascii_is_not_prepared(self):
        # PostgreSQL skips SASLprep for pure ASCII, control characters included.
        password = "pass\u0007word"
        assert self.secret(password) == expected_scram_secret(password.encode(), self.SALT, 1)

    def test_check_plain_applies_saslprep(self):
        stored = build_scram_secret("pass word")
        assert check_plain(stored, "alice", "pass\u00a0word")

    def test_scram_exchange_applies_saslprep(self):
        server = ScramServer(build_scram_secret("pass word"))
        run_exchange(ScramClient("pass\u00a0word"), server)


# ---------------------------------------------------------------------------
# SCRAM exchange
# ---------------------------------------------------------------------------


class TestRfc7677Vector:
    def test_client(self):
        client = ScramClient(RFC_PASSWORD, username="user", nonce_factory=lambda: RFC_CLIENT_NONCE)
        assert client.first() == RFC_CLIENT_FIRST
        assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
        client.verify(RFC_SERVER_FINAL)

    def test_server(self):
        server = rfc_server()
        assert server.mechanisms() == ["SCRAM-SHA-256"]
        assert server.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
        assert server.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL

    def test_server_recovers_client_key(self):
        server = rfc_server()
        server.first(RFC_CLIENT_FIRST)
        server.final(RFC_CLIENT_FINAL)
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
        assert server.client_key == hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        assert server.server_key == hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def test_client_with_keys_matches_vector(self):
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
        client = ScramClient(
            client_key=hmac.new(salted, b"Client Key", hashlib.sha256).digest(),
            server_key=hmac.new(salted, b"Server Key", hashlib.sha256).digest(),
            username="user",
            nonce_factory=lambda: RFC_CLIENT_NONCE,
        )
        client.first()
        assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
        client.verify(RFC_SERVER_FINAL)

    def test_client_rejects_wrong_server_signature(self):
        client = ScramClient(RFC_PASSWORD, username="user", nonce_factory=lambda: RFC_CLIENT_NONCE)
        client.first()
        client.final(RFC_SERVER_FIRST)
        with pytest.raises(AuthError, match="signature"):
            client.verify(b"v=" + base64.b64encode(b"\0" * 32))


class TestRoundTrip:
    def test_default_client_first_message(self):
        first = ScramClient("pw").first()
        assert first.startswith(b"n,,n=,r=")
        nonce = first[len(b"n,,n=,r=") :]
        assert len(base64.b64decode(nonce, validate=True)) == 18

    def test_plain_stored_password(self):
        server = ScramServer("s3cret")
        run_exchange(ScramClient("s3cret"), server)
        assert len(server.client_key) == len(server.server_key) == 32

    def test_stored_secret(self):
        run_exchange(ScramClient("s3cret"), ScramServer(build_scram_secret("s3cret")))

    @pytest.mark.parametrize("stored", ["s3cret", build_scram_secret("s3cret")])
    def test_wrong_password_fails(self, stored):
        server = ScramServer(stored)
        client = ScramClient("wrong")
        server_first = server.first(client.first())
        client_final = client.final(server_first)
        with pytest.raises(AuthError, match="authentication failed"):
            server.final(client_final)
        assert server.client_key is None

    def test_failed_proof_cannot_be_retried(self):
        server = ScramServer("s3cret")
        client = ScramClient("wrong")
        client_final = client.final(server.first(client.first()))
        with pytest.raises(AuthError):
            server.final(client_final)
        with pytest.raises(AuthError, match="out of order"):
            server.final(client_final)

    def test_client_accepts_y_flag_server(self):
        server = ScramServer("pw", nonce_factory=lambda: "snonce")
        server_first = server.first(b"y,,n=,r=cnonce")
        assert server_first.startswith(b"r=cnoncesnonce,")
        # A client that sent "y" binds "y,," (base64 "eSws"); proof check is then reached.
        with pytest.raises(AuthError, match="authentication failed"):
            server.final(b"c=eSws,r=cnoncesnonce,p=" + base64.b64encode(b"\0" * 32))

    def test_username_in_client_first_is_ignored(self):
        stored = build_scram_secret("pw")
        run_exchange(ScramClient("pw", username="some=odd,name"), ScramServer(stored))

    def test_md5_secret_cannot_do_scram(self):
        with pytest.raises(AuthError, match="md5"):
            ScramServer(md5_secret("pw", "alice"))

    def test_empty_plain_password_cannot_do_scram(self):
        with pytest.raises(AuthError):
            ScramServer("")

    def test_client_needs_password_or_both_keys(self):
        with pytest.raises(ValueError):
            ScramClient()
        with pytest.raises(ValueError):
            ScramClient("pw", client_key=b"\0" * 32, server_key=b"\0" * 32)
        with pytest.raises(ValueError):
            ScramClient(client_key=b"\0" * 32)
        with pytest.raises(ValueError):
            ScramClient(client_key=b"\0" * 31, server_key=b"\0" * 32)


class TestPassThrough:
    def authenticated_keys(self, secret: str) -> tuple[bytes, bytes]:
        """Keys a ScramServer recovers from a client that knows the password."""
        front = ScramServer(secret)
        run_exchange(ScramClient("s3cret"), front)
        return front.client_key, front.server_key

    def test_recovered_keys_log_in_to_server_with_same_secret(self):
        secret = build_scram_secret("s3cret")
        client_key, server_key = self.authenticated_keys(secret)
        backend = ScramServer(secret)
        run_exchange(ScramClient(client_key=client_key, server_key=server_key), backend)
        assert backend.client_key == client_key

    def test_recovered_keys_fail_against_a_different_salt(self):
        client_key, server_key = self.authenticated_keys(build_scram_secret("s3cret"))
        backend = ScramServer(build_scram_secret("s3cret"))  # same password, new salt
        client = ScramClient(client_key=client_key, server_key=server_key)
        with pytest.raises(AuthError):
            backend.final(client.final(backend.first(client.first())))


# ---------------------------------------------------------------------------
# Malformed SCRAM messages
# ---------------------------------------------------------------------------


class TestMalformedClientFirst:
    @pytest.mark.parametrize(
        ("message", "match"),
        [
            (b"", "GS2 header"),
            (b"x,,n=,r=abc", "GS2 header"),
            (b"n", "GS2 header"),
            (b"n,", "GS2 header"),
            (b"n,,", "nonce"),
            (b"n,,n=", "nonce"),
            (b"n,,r=abc", "nonce"),
            (b"n,,n=,x=abc", "'r'"),
            (b"n,,x=,r=abc", "'n'"),
            (b"n,,n=,r=", "invalid nonce"),
            (b"n,,n=,r=a\x7fb", "invalid nonce"),
            (b"n,,m=ext,n=,r=abc", "mandatory extension"),
            (b"n,a=admin,n=,r=abc", "authorization identity"),
            (b"n,junk,n=,r=abc", "GS2 header"),
            (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        ],
    )
    def test_rejected(self, message, match):
        with pytest.raises(AuthError, match=match):
            ScramServer("pw").first(message)

    def test_extensions_after_nonce_are_ignored(self):
        assert ScramServer("pw").first(b"n,,n=,r=abc,x=ext").startswith(b"r=abc")


class TestMalformedClientFinal:
    @pytest.mark.parametrize(
        ("message", "match"),
        [
            (b"", "missing proof"),
            (b"c=biws,r=clientnonceservernonce", "missing proof"),
            (b"p=AAAA", "missing proof"),
            (b"c=biws,p=AAAA", "missing nonce"),
            (b"x=biws,r=clientnonceservernonce,p=AAAA", "'c'"),
            (b"c=!!!!,r=clientnonceservernonce,p=AAAA", "base64"),
            (b"c=eSws,r=clientnonceservernonce,p=AAAA", "channel binding"),
            (b"c=biws,x=clientnonceservernonce,p=AAAA", "'r'"),
            (b"c=biws,r=clientnonceOTHER,p=AAAA", "nonce does not match"),
            (b"c=biws,r=clientnonceservernonce,p=AAA", "base64"),
            (b"c=biws,r=clientnonceservernonce,p=AAAA", "wrong length"),
            (b"c=biws,r=clientnonceservernonce,p=AAAA,x=y", "base64"),
        ],
    )
    def test_rejected(self, message, match):
        server, _ = challenged_server()
        with pytest.raises(AuthError, match=match):
            server.final(message)

    def test_final_before_first(self):
        with pytest.raises(AuthError, match="out of order"):
            ScramServer("pw").final(b"c=biws,r=abc,p=AAAA")

    def test_first_twice(self):
        server, _ = challenged_server()
        with pytest.raises(AuthError, match="out of order"):
            server.first(b"n,,n=,r=clientnonce")

    def test_error_messages_do_not_leak_secrets(self):
        secret = build_scram_secret("s3cret")
        parsed = parse_scram_secret(secret)
        server, _ = challenged_server(secret)
        proof = base64.b64encode(b"\1" * 32)
        with pytest.raises(AuthError) as excinfo:
            server.final(b"c=biws,r=clientnonceservernonce,p=" + proof)
        message = str(excinfo.value)
        for sensitive in (proof.decode(), "s3cret", base64.b64encode(parsed.stored_key).decode()):
            assert sensitive not in message


class TestMalformedServerMessages:
    def client(self) -> ScramClient:
        client = ScramClient("pw", nonce_factory=lambda: "cnonce")
        client.first()
        return client

    @pytest.mark.parametrize(
        ("message", "match"),
        [
            (b"", "missing attributes"),
            (b"r=cnonceX,s=c2FsdA==", "missing attributes"),
            (b"m=ext,r=cnonceX,s=c2FsdA==,i=1", "mandatory extension"),
            (b"x=cnonceX,s=c2FsdA==,i=1", "'r'"),
            (b"r=cnonceX,x=c2FsdA==,i=1", "'s'"),
            (b"r=cnonceX,s=c2FsdA==,x=1", "'i'"),
            (b"r=cnonce,s=c2FsdA==,i=1", "does not extend"),
            (b"r=othernonce,s=c2FsdA==,i=1", "does not extend"),
            (b"r=cnonceX,s=!!,i=1", "base64"),
            (b"r=cnonceX,s=,i=1", "empty salt"),
            (b"r=cnonceX,s=c2FsdA==,i=0", "iteration count"),
            (b"r=cnonceX,s=c2FsdA==,i=-1", "iteration count"),
            (b"r=cnonceX,s=c2FsdA==,i=abc", "iteration count"),
            (b"r=cnonceX,s=c2FsdA==,i=99999999999", "iteration count"),
        ],
    )
    def test_bad_server_first(self, message, match):
        with pytest.raises(AuthError, match=match):
            self.client().final(message)

    def test_server_error_attribute(self):
        client = self.client()
        client.final(b"r=cnonceX,s=c2FsdA==,i=1")
        with pytest.raises(AuthError, match="invalid-proof"):
            client.verify(b"e=invalid-proof")

    @pytest.mark.parametrize("message", [b"", b"x=abc", b"v=!!!"])
    def test_bad_server_final(self, message):
        client = self.client()
        client.final(b"r=cnonceX,s=c2FsdA==,i=1")
        with pytest.raises(AuthError):
            client.verify(message)

    def test_out_of_order_calls(self):
        client = ScramClient("pw")
        with pytest.raises(AuthError, match="out of order"):
            client.final(b"r=x,s=c2FsdA==,i=1")
        with pytest.raises(AuthError, match="out of order"):
            ScramClient("pw").verify(b"v=AAAA")
        client = ScramClient("pw")
        client.first()
        with pytest.raises(AuthError, match="out of order"):
            client.first()

    def test_injected_nonce_must_be_printable(self):
        with pytest.raises(ValueError):
            ScramClient("pw", nonce_factory=lambda: "a,b").first()


# ---------------------------------------------------------------------------
# Channel binding: tls-server-end-point and SCRAM-SHA-256-PLUS
# ---------------------------------------------------------------------------

CB_HEADER = b"p=tls-server-end-point,,"
CBIND = hashlib.sha256(b"the proxy's certificate").digest()
OTHER_CBIND = hashlib.sha256(b"a man in the middle's certificate").digest()

# AlgorithmIdentifier DER of sha256WithRSAEncryption and sha1WithRSAEncryption (NULL params).
_SHA256_RSA_ALGID = bytes.fromhex("300d06092a864886f70d01010b0500")
_SHA1_RSA_ALGID = bytes.fromhex("300d06092a864886f70d0101050500")


def self_signed(key, algorithm, **sign_kwargs) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgmulti-test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
    )
    return builder.sign(key, algorithm, **sign_kwargs)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def sha1_rsa_certificate(key: rsa.RSAPrivateKey) -> bytes:
    """DER of a SHA-1/RSA signed certificate (cryptography no longer signs with SHA-1).

    Sign with SHA-256, swap the algorithm OID (same encoded length) in the TBS part and
    the outer AlgorithmIdentifier, and replace the signature with a SHA-1 one.
    """
    certificate = self_signed(key, hashes.SHA256())
    original = der(certificate)
    assert original.count(_SHA256_RSA_ALGID) == 2
    tbs = certificate.tbs_certificate_bytes.replace(_SHA256_RSA_ALGID, _SHA1_RSA_ALGID)
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    assert len(signature) == len(certificate.signature) and original.endswith(certificate.signature)
    patched = original.replace(certificate.tbs_certificate_bytes, tbs)
    patched = patched.replace(_SHA256_RSA_ALGID, _SHA1_RSA_ALGID)
    return patched[: -len(signature)] + signature


def run_plus_exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.first(client.first(), client.mechanism)
    client.verify(server.final(client.final(server_first)))


def manual_client_final(
    password: str, client_first_bare: bytes, server_first: bytes, cbind_attr: bytes
) -> bytes:
    """An honest client's proof over an arbitrary c= attribute (independent of ScramClient)."""
    attributes = dict(part.split(b"=", 1) for part in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attributes[b"s"]), int(attributes[b"i"])
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = b"c=" + cbind_attr + b",r=" + attributes[b"r"]
    auth_message = b",".join((client_first_bare, server_first, without_proof))
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return without_proof + b",p=" + base64.b64encode(proof)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class TestTlsServerEndPoint:
    @pytest.mark.parametrize(
        ("algorithm", "expected"),
        [
            (hashes.SHA256(), hashlib.sha256),
            (hashes.SHA384(), hashlib.sha384),
            (hashes.SHA512(), hashlib.sha512),
        ],
    )
    def test_ec_certificate_uses_signature_hash(self, algorithm, expected):
        cert_der = der(self_signed(ec.generate_private_key(ec.SECP256R1()), algorithm))
        assert tls_server_end_point(cert_der) == expected(cert_der).digest()

    def test_sha1_signed_rsa_certificate_uses_sha256(self, rsa_key):
        cert_der = sha1_rsa_certificate(rsa_key)
        certificate = x509.load_der_x509_certificate(cert_der)
        assert isinstance(certificate.signature_hash_algorithm, hashes.SHA1)
        rsa_key.public_key().verify(
            certificate.signature,
            certificate.tbs_certificate_bytes,
            padding.PKCS1v15(),
            hashes.SHA1(),
        )
        assert tls_server_end_point(cert_der) == hashlib.sha256(cert_der).digest()

    def test_rsa_sha256_certificate(self, rsa_key):
        cert_der = der(self_signed(rsa_key, hashes.SHA256()))
        assert tls_server_end_point(cert_der) == hashlib.sha256(cert_der).digest()

    def test_rsa_pss_certificate_uses_pss_hash(self, rsa_key):
        # Like PostgreSQL with X509_get_signature_info(): the hash from the PSS parameters.
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.DIGEST_LENGTH)
        cert_der = der(self_signed(rsa_key, hashes.SHA384(), rsa_padding=pss))
        assert tls_server_end_point(cert_der) == hashlib.sha384(cert_der).digest()

    def test_ed25519_certificate_is_refused(self):
        cert_der = der(self_signed(ed25519.Ed25519PrivateKey.generate(), None))
        with pytest.raises(AuthError, match="channel binding"):
            tls_server_end_point(cert_der)

    @pytest.mark.parametrize("data", [b"", b"not a certificate", b"\x30\x03\x02\x01\x01"])
    def test_invalid_der_is_refused(self, data):
        with pytest.raises(AuthError, match="invalid DER certificate"):
            tls_server_end_point(data)

    def test_binding_from_certificate_round_trip(self):
        cert_der = der(self_signed(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()))
        binding = tls_server_end_point(cert_der)
        server = ScramServer("pw", channel_binding=binding)
        run_plus_exchange(ScramClient("pw", channel_binding=binding), server)
        assert server.client_key is not None


class TestScramPlus:
    def test_mechanisms(self):
        assert ScramServer("pw").mechanisms() == ["SCRAM-SHA-256"]
        assert ScramServer("pw", channel_binding=CBIND).mechanisms() == [
            "SCRAM-SHA-256-PLUS",
            "SCRAM-SHA-256",
        ]

    def test_client_mechanism(self):
        assert ScramClient("pw").mechanism == "SCRAM-SHA-256"
        assert ScramClient("pw", channel_binding=CBIND).mechanism == "SCRAM-SHA-256-PLUS"

    def test_client_messages_carry_binding(self):
        client = ScramClient("pw", channel_binding=CBIND, nonce_factory=lambda: "cnonce")
        assert client.first() == CB_HEADER + b"n=,r=cnonce"
        client_final = client.final(b"r=cnonceX,s=c2FsdA==,i=1")
        expected_c = b"c=" + base64.b64encode(CB_HEADER + CBIND)
        assert client_final.startswith(expected_c + b",r=cnonceX,p=")

    @pytest.mark.parametrize("stored", ["s3cret", build_scram_secret("s3cret")])
    def test_round_trip(self, stored):
        server = ScramServer(stored, channel_binding=CBIND)
        run_plus_exchange(ScramClient("s3cret", channel_binding=CBIND), server)
        assert len(server.client_key) == len(server.server_key) == 32

    def test_wrong_password_still_fails(self):
        server = ScramServer("s3cret", channel_binding=CBIND)
        with pytest.raises(AuthError, match="authentication failed"):
            run_plus_exchange(ScramClient("wrong", channel_binding=CBIND), server)

    def test_wrong_binding_data_rejected(self):
        # E.g. a man in the middle terminating TLS with another certificate.
        server = ScramServer("s3cret", channel_binding=CBIND)
        client = ScramClient("s3cret", channel_binding=OTHER_CBIND)
        with pytest.raises(AuthError, match="SCRAM channel binding check failed"):
            run_plus_exchange(client, server)
        assert server.client_key is None and server.server_key is None

    @pytest.mark.parametrize(
        "cbind_input",
        [
            b"n,,",
            b"y,,",
            CB_HEADER,
            CB_HEADER + CBIND[:-1],
            CB_HEADER + CBIND + b"\0",
            b"p=tls-unique,," + CBIND,
        ],
    )
    def test_c_attribute_must_be_exact(self, cbind_input):
        server = ScramServer("pw", nonce_factory=lambda: "snonce", channel_binding=CBIND)
        server_first = server.first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256-PLUS")
        client_final = manual_client_final(
            "pw", b"n=,r=cnonce", server_first, base64.b64encode(cbind_input)
        )
        with pytest.raises(AuthError, match="SCRAM channel binding check failed"):
            server.final(client_final)

    def test_non_canonical_base64_rejected(self):
        canonical = base64.b64encode(CB_HEADER + CBIND)
        assert canonical.endswith(b"=")  # 56 bytes: the last character has 2 unused bits
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = canonical[-2]
        tweaked = canonical[:-2] + bytes([alphabet[alphabet.index(last) | 1]]) + b"="
        assert tweaked != canonical
        assert base64.b64decode(tweaked) == CB_HEADER + CBIND  # same bytes, other text
        server = ScramServer("pw", nonce_factory=lambda: "snonce", channel_binding=CBIND)
        server_first = server.first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256-PLUS")
        with pytest.raises(AuthError, match="SCRAM channel binding check failed"):
            server.final(manual_client_final("pw", b"n=,r=cnonce", server_first, tweaked))

    def test_manual_client_final_is_accepted(self):
        # Checks the helper above, so the rejections are due to the binding alone.
        server = ScramServer("pw", nonce_factory=lambda: "snonce", channel_binding=CBIND)
        server_first = server.first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256-PLUS")
        cbind_attr = base64.b64encode(CB_HEADER + CBIND)
        assert server.final(manual_client_final("pw", b"n=,r=cnonce", server_first, cbind_attr))

    @pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])
    def test_y_refused_when_binding_available(self, mechanism):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="channel binding negotiation error"):
            server.first(b"y,,n=,r=cnonce", mechanism)

    def test_y_accepted_without_binding(self):
        server = ScramServer("pw", nonce_factory=lambda: "snonce")
        server_first = server.first(b"y,,n=,r=cnonce", "SCRAM-SHA-256")
        cbind_attr = base64.b64encode(b"y,,")
        assert cbind_attr == b"eSws"
        server.final(manual_client_final("pw", b"n=,r=cnonce", server_first, cbind_attr))
        assert server.client_key is not None

    def test_plain_scram_still_works_when_binding_available(self):
        # A client with channel_binding=disable (or without TLS support) picks SCRAM-SHA-256.
        server = ScramServer("s3cret", channel_binding=CBIND)
        run_exchange(ScramClient("s3cret"), server)
        assert server.client_key is not None

    def test_plus_needs_binding_data_in_header(self):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="no channel binding"):
            server.first(b"n,,n=,r=cnonce", "SCRAM-SHA-256-PLUS")

    def test_p_rejected_without_binding(self):
        with pytest.raises(AuthError, match="channel binding"):
            ScramServer("pw").first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256")
        with pytest.raises(AuthError, match="channel binding is not available"):
            ScramServer("pw").first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256-PLUS")

    def test_p_rejected_with_plain_mechanism(self):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="includes channel binding data"):
            server.first(CB_HEADER + b"n=,r=cnonce", "SCRAM-SHA-256")

    @pytest.mark.parametrize("name", [b"tls-unique", b"tls-exporter", b"TLS-SERVER-END-POINT"])
    def test_unsupported_cb_name_rejected(self, name):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="unsupported channel binding type"):
            server.first(b"p=" + name + b",,n=,r=cnonce", "SCRAM-SHA-256-PLUS")

    @pytest.mark.parametrize(
        "message", [b"p=,,n=,r=cnonce", b"p=tls server,,n=,r=cnonce", b"p=tls-server-end-point"]
    )
    def test_malformed_cb_header_rejected(self, message):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="malformed"):
            server.first(message, "SCRAM-SHA-256-PLUS")

    def test_authzid_with_binding_rejected(self):
        server = ScramServer("pw", channel_binding=CBIND)
        with pytest.raises(AuthError, match="authorization identity"):
            server.first(b"p=tls-server-end-point,a=admin,n=,r=cnonce", "SCRAM-SHA-256-PLUS")

    @pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "scram-sha-256-plus", ""])
    def test_unknown_mechanism_rejected(self, mechanism):
        with pytest.raises(AuthError, match="mechanism"):
            ScramServer("pw", channel_binding=CBIND).first(b"n,,n=,r=cnonce", mechanism)

    @pytest.mark.parametrize(
        ("binding", "error"), [(b"", ValueError), ("abc", TypeError), (bytearray(b"x"), TypeError)]
    )
    def test_invalid_binding_argument(self, binding, error):
        with pytest.raises(error):
            ScramServer("pw", channel_binding=binding)
        with pytest.raises(error):
            ScramClient("pw", channel_binding=binding)

    def test_pass_through_keys_after_plus(self):
        secret = build_scram_secret("s3cret")
        front = ScramServer(secret, channel_binding=CBIND)
        run_plus_exchange(ScramClient("s3cret", channel_binding=CBIND), front)
        # The backend connection (another TLS session: other binding data) can use PLUS too.
        backend = ScramServer(secret, channel_binding=OTHER_CBIND)
        client = ScramClient(
            client_key=front.client_key, server_key=front.server_key, channel_binding=OTHER_CBIND
        )
        run_plus_exchange(client, backend)
        assert backend.client_key == front.client_key
        # ... or plain SCRAM-SHA-256.
        backend = ScramServer(secret)
        run_exchange(ScramClient(client_key=front.client_key, server_key=front.server_key), backend)
