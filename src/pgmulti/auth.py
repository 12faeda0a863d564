"""Client and server authentication: PgBouncer auth files, md5 and SCRAM-SHA-256(-PLUS)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from ._codec import random_bytes  # cancel keys and salts, drawn a page at a time

__all__ = [
    "AuthError",
    "AuthFileError",
    "ScramClient",
    "ScramSecret",
    "ScramServer",
    "build_scram_secret",
    "check_md5_response",
    "check_plain",
    "constant_time_equals",
    "load_userlist",
    "md5_response",
    "md5_secret",
    "parse_scram_secret",
    "parse_userlist",
    "random_bytes",
    "secret_kind",
    "tls_server_end_point",
]

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_PLUS_MECHANISM = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"  # the only type PostgreSQL supports
_CBIND_GS2_HEADER = b"p=" + CHANNEL_BINDING_TYPE.encode("ascii") + b",,"
DEFAULT_SCRAM_ITERATIONS = 4096
SCRAM_SALT_LENGTH = 16  # PostgreSQL's default salt length
SCRAM_NONCE_BYTES = 18  # PostgreSQL's nonce length (before base64)
_KEY_LENGTH = hashlib.sha256().digest_size
_MAX_ITERATIONS = 2**31 - 1  # PostgreSQL stores the iteration count as a C int

_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")
_CB_NAME = re.compile(rb"[A-Za-z0-9.-]+")  # RFC 5802 cb-name
_SCRAM_SECRET = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]+):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored_key>[A-Za-z0-9+/=]+):(?P<server_key>[A-Za-z0-9+/=]+)"
)


class AuthError(Exception):
    """Authentication failed or a peer sent a malformed authentication message."""


class AuthFileError(Exception):
    """A line of the auth file cannot be parsed."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


# ---------------------------------------------------------------------------
# Auth file (userlist.txt)
# ---------------------------------------------------------------------------


def load_userlist(path: str) -> dict[str, str]:
    """Read and parse a PgBouncer auth file; OSError propagates to the caller."""
    with open(path, "rb") as f:
        data = f.read()
    # surrogateescape keeps non-UTF-8 passwords byte-exact (SCRAM then uses the raw bytes).
    return parse_userlist(data.decode("utf-8", "surrogateescape"), path)


def parse_userlist(text: str, path: str = "<auth_file>") -> dict[str, str]:
    """Parse lines of the form ``"user" "password-or-secret" ...`` into {user: secret}."""
    users: dict[str, str] = {}
    # Split on "\n" only: str.splitlines() would also break on characters such as
    # U+2028 that may legitimately appear inside a quoted password.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r").lstrip()
        if not line or line[0] in ";#":
            continue
        try:
            user, rest = _read_quoted(line, "user name")
            password, _rest_ignored = _read_quoted(rest.lstrip(), "password")
        except ValueError as exc:
            raise AuthFileError(path, number, str(exc)) from None
        if not user:
            raise AuthFileError(path, number, "empty user name")
        users[user] = password  # a later line for the same user wins, as in PgBouncer
    return users


def _read_quoted(text: str, what: str) -> tuple[str, str]:
    """Split a leading double-quoted field ("" escapes a quote) from the rest of text."""
    if not text.startswith('"'):
        raise ValueError(f"expected a double-quoted {what}")
    value: list[str] = []
    pos = 1
    while True:
        end = text.find('"', pos)
        if end < 0:
            raise ValueError(f"unterminated quoted {what}")
        value.append(text[pos:end])
        if text.startswith('""', end):
            value.append('"')
            pos = end + 2
        else:
            return "".join(value), text[end + 1 :]


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets without leaking where they differ through timing."""
    return hmac.compare_digest(_to_bytes(a), _to_bytes(b))


def _to_bytes(value: str | bytes) -> bytes:
    """Encode text as UTF-8, restoring the original bytes of surrogate-escaped input."""
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64decode(data: bytes | str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(f"malformed SCRAM message: {what} is not valid base64") from None


# ---------------------------------------------------------------------------
# Secret kinds, md5 and plain-text checks
# ---------------------------------------------------------------------------


def secret_kind(secret: str) -> str:
    """Classify a stored secret as "md5", "scram" or "plain" (like PostgreSQL does)."""
    if _MD5_SECRET.fullmatch(secret):
        return "md5"
    try:
        parse_scram_secret(secret)
    except ValueError:
        return "plain"  # PostgreSQL also treats a malformed SCRAM secret as a password
    return "scram"


def md5_secret(password: str, user: str) -> str:
    """The md5 secret PostgreSQL stores: "md5" + md5(password + user)."""
    return "md5" + _md5_hex(_to_bytes(password) + _to_bytes(user))


def md5_response(secret_or_password: str, user: str, salt: bytes) -> str:
    """What a client answers to an md5 challenge: "md5" + md5(md5hex(password + user) + salt)."""
    if secret_kind(secret_or_password) == "md5":
        inner = secret_or_password[3:]
    else:
        inner = md5_secret(secret_or_password, user)[3:]
    return "md5" + _md5_hex(inner.encode("ascii") + salt)


def check_md5_response(stored: str, user: str, salt: bytes, response: str) -> bool:
    """Verify a client's md5 response against a stored plain password or md5 secret."""
    kind = secret_kind(stored)
    if kind == "scram" or (kind == "plain" and not stored):
        # A SCRAM secret cannot produce md5 hashes; empty passwords never authenticate.
        return False
    return constant_time_equals(md5_response(stored, user, salt), response)


def check_plain(stored: str, user: str, password: str) -> bool:
    """Verify a clear-text password (from the client) against any kind of stored secret."""
    if not password:
        return False  # like PostgreSQL: empty passwords never authenticate
    kind = secret_kind(stored)
    if kind == "md5":
        return constant_time_equals(md5_secret(password, user), stored)
    if kind == "scram":
        expected = parse_scram_secret(stored)
        derived = _derive_scram_secret(password, expected.salt, expected.iterations)
        stored_ok = hmac.compare_digest(derived.stored_key, expected.stored_key)
        server_ok = hmac.compare_digest(derived.server_key, expected.server_key)
        return stored_ok and server_ok
    return constant_time_equals(stored, password)


# ---------------------------------------------------------------------------
# SASLprep (RFC 4013), the way PostgreSQL applies it to passwords
# ---------------------------------------------------------------------------


def _prepare_password(password: str | bytes) -> bytes:
    """Return SASLprep(password) as UTF-8, or the raw bytes when it cannot be prepared.

    PostgreSQL falls back to the raw bytes for non-UTF-8 or prohibited input rather
    than rejecting the password, so we must do the same to derive identical keys.
    """
    raw = _to_bytes(password)
    if raw.isascii():
        return raw  # PostgreSQL skips SASLprep entirely for pure ASCII
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    prepared = _saslprep(text)
    return raw if prepared is None else prepared.encode("utf-8")


def _saslprep(text: str) -> str | None:
    """RFC 4013 SASLprep for stored strings; None if the result would be prohibited."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in text
        if not stringprep.in_table_b1(ch)
    )
    if not mapped:
        return None  # PostgreSQL refuses a password that maps to nothing
    # PostgreSQL checks the prohibited and bidi rules on the mapped string (before
    # normalization); we follow it so that our secrets match the server's.
    if any(_is_prohibited(ch) for ch in mapped):
        return None
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return None
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return None
    return unicodedata.normalize("NFKC", mapped)


def _is_prohibited(ch: str) -> bool:
    """RFC 4013 section 2.3 prohibited output, plus unassigned code points (A.1)."""
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


# ---------------------------------------------------------------------------
# SCRAM secrets
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScramSecret:
    """A parsed ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` secret."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)  # keep keys out of logs and tracebacks
    server_key: bytes = field(repr=False)

    def __str__(self) -> str:
        return (
            f"{SCRAM_MECHANISM}${self.iterations}:{base64.b64encode(self.salt).decode()}"
            f"${base64.b64encode(self.stored_key).decode()}"
            f":{base64.b64encode(self.server_key).decode()}"
        )


def parse_scram_secret(secret: str) -> ScramSecret:
    """Parse a SCRAM-SHA-256 secret; raise ValueError (without the secret) if malformed."""
    match = _SCRAM_SECRET.fullmatch(secret)
    if match is None:
        raise ValueError("not a SCRAM-SHA-256 secret")
    try:
        salt = base64.b64decode(match["salt"], validate=True)
        stored_key = base64.b64decode(match["stored_key"], validate=True)
        server_key = base64.b64decode(match["server_key"], validate=True)
    except binascii.Error:
        raise ValueError("SCRAM secret contains invalid base64") from None
    iterations = int(match["iterations"])
    if not 1 <= iterations <= _MAX_ITERATIONS or not salt:
        raise ValueError("SCRAM secret has no salt or an invalid iteration count")
    if len(stored_key) != _KEY_LENGTH or len(server_key) != _KEY_LENGTH:
        raise ValueError("SCRAM secret keys have the wrong length")
    return ScramSecret(iterations, salt, stored_key, server_key)


def build_scram_secret(
    password: str, salt: bytes | None = None, iterations: int = DEFAULT_SCRAM_ITERATIONS
) -> str:
    """Build the SCRAM-SHA-256 secret PostgreSQL would store for password."""
    if salt is None:
        salt = secrets.token_bytes(SCRAM_SALT_LENGTH)
    if not salt or not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError("SCRAM needs a non-empty salt and an iteration count in 1..2**31-1")
    return str(_derive_scram_secret(password, salt, iterations))


def _derive_scram_secret(password: str | bytes, salt: bytes, iterations: int) -> ScramSecret:
    client_key, server_key = _derive_scram_keys(password, salt, iterations)
    return ScramSecret(iterations, salt, _sha256(client_key), server_key)


def _derive_scram_keys(password: str | bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) per RFC 5802 section 3."""
    salted = hashlib.pbkdf2_hmac("sha256", _prepare_password(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


# ---------------------------------------------------------------------------
# Channel binding (RFC 5929 tls-server-end-point)
# ---------------------------------------------------------------------------


def tls_server_end_point(cert_der: bytes) -> bytes:
    """Channel binding data of type tls-server-end-point for a DER server certificate.

    This is the hash of the certificate with the hash algorithm of its signature,
    except that MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 section 4.1), as
    PostgreSQL and libpq compute it. Certificates whose signature has no separate
    hash algorithm (Ed25519, Ed448) cannot be used for channel binding: AuthError.
    """
    try:
        certificate = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise AuthError("cannot compute channel binding: invalid DER certificate") from None
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None:
        raise AuthError(
            "cannot compute channel binding: the certificate's signature algorithm has no hash"
        )
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def _check_channel_binding(channel_binding: bytes | None) -> bytes | None:
    if channel_binding is None:
        return None
    if not isinstance(channel_binding, bytes):
        raise TypeError("channel_binding must be bytes (see tls_server_end_point)")
    if not channel_binding:
        raise ValueError("channel_binding must not be empty")
    return channel_binding


# ---------------------------------------------------------------------------
# SCRAM message helpers
# ---------------------------------------------------------------------------


def _default_nonce() -> str:
    return base64.b64encode(secrets.token_bytes(SCRAM_NONCE_BYTES)).decode("ascii")


def _make_nonce(nonce_factory: Callable[[], str]) -> bytes:
    nonce = nonce_factory().encode("ascii")
    if not _is_valid_nonce(nonce):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return nonce


def _is_valid_nonce(nonce: bytes) -> bool:
    # RFC 5802: printable = %x21-2B / %x2D-7E (printable ASCII except ',')
    return bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)


def _attribute(part: bytes, name: bytes, message: str) -> bytes:
    """Value of a "<name>=<value>" SCRAM attribute, or AuthError if it is another one."""
    if not part.startswith(name + b"="):
        raise AuthError(f"malformed SCRAM {message}: expected attribute '{name.decode()}'")
    return part[len(name) + 1 :]


def _reject_mandatory_extension(part: bytes, message: str) -> None:
    if part.startswith(b"m="):
        raise AuthError(f"unsupported SCRAM mandatory extension in {message}")


def _escape_saslname(name: str) -> bytes:
    return _to_bytes(name).replace(b"=", b"=3D").replace(b",", b"=2C")


class _State:
    START = "start"
    CHALLENGED = "challenged"
    DONE = "done"


# ---------------------------------------------------------------------------
# SCRAM server (pooler <- client)
# ---------------------------------------------------------------------------


class ScramServer:
    """The pooler's side of SCRAM-SHA-256(-PLUS) when a client logs in to it.

    ``channel_binding`` is the tls-server-end-point data of the pooler's own
    certificate (``tls_server_end_point(cert_der)``) when the client connection uses
    TLS; SCRAM-SHA-256-PLUS is then offered too. Without it only SCRAM-SHA-256 is.

    After a successful ``final()``, ``client_key`` and ``server_key`` hold the keys
    recovered from the exchange, so the pooler can log in to PostgreSQL with them
    (pass-through). They only match PostgreSQL when ``stored`` is the same secret
    PostgreSQL holds; with a plain password a fresh salt and ``iterations``
    (scram_iterations) are used instead.
    """

    def __init__(
        self,
        stored: str,
        nonce_factory: Callable[[], str] | None = None,
        *,
        channel_binding: bytes | None = None,
        iterations: int = DEFAULT_SCRAM_ITERATIONS,
    ) -> None:
        self._channel_binding = _check_channel_binding(channel_binding)
        kind = secret_kind(stored)
        if kind == "md5":
            raise AuthError("an md5 secret cannot be used for SCRAM authentication")
        if kind == "plain":
            if not stored:
                raise AuthError("empty passwords cannot be used for SCRAM authentication")
            # Derive a secret so verifying a password and a stored secret is one code path.
            salt = secrets.token_bytes(SCRAM_SALT_LENGTH)
            self._secret = _derive_scram_secret(stored, salt, iterations)
        else:
            self._secret = parse_scram_secret(stored)
        self._nonce_factory = nonce_factory or _default_nonce
        self._state = _State.START
        self._binding_used = False  # the client selected SCRAM-SHA-256-PLUS
        self._expected_cbind = b""  # the c= attribute the client must send, base64
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""
        self.client_key: bytes | None = None
        self.server_key: bytes | None = None

    def mechanisms(self) -> list[str]:
        """SASL mechanisms to offer in AuthenticationSASL (PLUS first, like PostgreSQL)."""
        if self._channel_binding is not None:
            return [SCRAM_PLUS_MECHANISM, SCRAM_MECHANISM]
        return [SCRAM_MECHANISM]

    def first(self, client_first: bytes, mechanism: str = SCRAM_MECHANISM) -> bytes:
        """Handle client-first-message for the mechanism the client selected.

        Return server-first-message or raise AuthError.
        """
        self._expect(_State.START)
        if mechanism == SCRAM_PLUS_MECHANISM:
            if self._channel_binding is None:
                raise AuthError(
                    "client selected SCRAM-SHA-256-PLUS, but channel binding is not available"
                )
        elif mechanism != SCRAM_MECHANISM:
            raise AuthError("client selected an invalid SASL authentication mechanism")
        flag, cb_name, gs2_header, self._client_first_bare = _split_gs2_header(client_first)
        if flag == b"p":
            if mechanism != SCRAM_PLUS_MECHANISM:
                raise AuthError(
                    "malformed SCRAM client-first-message: client selected SCRAM-SHA-256 "
                    "without channel binding, but the message includes channel binding data"
                )
            if cb_name != CHANNEL_BINDING_TYPE.encode("ascii"):
                raise AuthError(
                    f"unsupported channel binding type {cb_name.decode('ascii')!r}"
                    if len(cb_name) <= 64
                    else "unsupported channel binding type"
                )
            assert self._channel_binding is not None
            self._binding_used = True
            self._expected_cbind = _b64encode(gs2_header + self._channel_binding)
        else:
            if flag == b"y" and self._channel_binding is not None:
                # RFC 5802 section 6: the client believes we cannot bind, but we can, so
                # someone may have removed the PLUS mechanism from our offer (downgrade).
                raise AuthError(
                    "SCRAM channel binding negotiation error: the client supports channel "
                    "binding but thinks the server does not, although it does"
                )
            if mechanism == SCRAM_PLUS_MECHANISM:
                raise AuthError(
                    "malformed SCRAM client-first-message: client selected "
                    "SCRAM-SHA-256-PLUS, but the message has no channel binding"
                )
            self._expected_cbind = _b64encode(gs2_header)
        client_nonce = _parse_client_first_bare(self._client_first_bare)
        self._nonce = client_nonce + _make_nonce(self._nonce_factory)
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            _b64encode(self._secret.salt),
            self._secret.iterations,
        )
        self._state = _State.CHALLENGED
        return self._server_first

    def final(self, client_final: bytes) -> bytes:
        """Verify client-final-message; return server-final-message or raise AuthError."""
        self._expect(_State.CHALLENGED)
        without_proof, proof = self._parse_client_final(client_final)
        auth_message = b",".join((self._client_first_bare, self._server_first, without_proof))
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), self._secret.stored_key):
            raise AuthError("SCRAM authentication failed: wrong password")
        self.client_key = client_key
        self.server_key = self._secret.server_key
        return b"v=" + _b64encode(_hmac(self._secret.server_key, auth_message))

    def _expect(self, expected: str) -> None:
        # Any error ends the exchange: e.g. a failed proof cannot be retried on this object.
        if self._state != expected:
            raise AuthError("SCRAM messages received out of order")
        self._state = _State.DONE

    def _parse_client_final(self, message: bytes) -> tuple[bytes, bytes]:
        """Check channel binding and nonce; return (message-without-proof, proof)."""
        # The proof is always the last attribute and base64 never contains ','.
        without_proof, sep, proof_b64 = message.rpartition(b",p=")
        if not sep:
            raise AuthError("malformed SCRAM client-final-message: missing proof")
        parts = without_proof.split(b",")
        if len(parts) < 2:
            raise AuthError("malformed SCRAM client-final-message: missing nonce")
        binding = _attribute(parts[0], b"c", "client-final-message")
        _b64decode(binding, "channel binding")  # only to report malformed base64 as such
        # Compare the base64 text itself, like PostgreSQL: it must be exactly what an
        # honest client sends (gs2-header of client-first-message + binding data).
        if not hmac.compare_digest(binding, self._expected_cbind):
            if self._binding_used:
                raise AuthError("SCRAM channel binding check failed")
            raise AuthError("SCRAM channel binding does not match the client-first-message")
        nonce = _attribute(parts[1], b"r", "client-final-message")
        if not hmac.compare_digest(nonce, self._nonce):
            raise AuthError("SCRAM nonce does not match")
        proof = _b64decode(proof_b64, "client proof")
        if len(proof) != _KEY_LENGTH:
            raise AuthError("malformed SCRAM client-final-message: proof has the wrong length")
        return without_proof, proof


def _split_gs2_header(client_first: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Split client-first-message into (flag, cb-name, gs2-header, client-first-message-bare).

    flag is b"n", b"y" or b"p"; cb-name is the channel binding type for b"p", else b"".
    """
    cbind, sep, rest = client_first.partition(b",")
    if not sep:
        raise AuthError("malformed SCRAM client-first-message: invalid GS2 header")
    if cbind.startswith(b"p="):
        flag, cb_name = b"p", cbind[2:]
        if not _CB_NAME.fullmatch(cb_name):
            raise AuthError("malformed SCRAM client-first-message: invalid channel binding type")
    elif cbind in (b"n", b"y"):
        flag, cb_name = cbind, b""
    else:
        raise AuthError("malformed SCRAM client-first-message: invalid GS2 header")
    authzid, sep, bare = rest.partition(b",")
    if authzid.startswith(b"a="):
        raise AuthError("SCRAM authorization identity is not supported")
    if authzid or not sep:
        raise AuthError("malformed SCRAM client-first-message: invalid GS2 header")
    return flag, cb_name, cbind + b",,", bare


def _parse_client_first_bare(bare: bytes) -> bytes:
    """Return the client nonce from client-first-message-bare."""
    parts = bare.split(b",")
    _reject_mandatory_extension(parts[0], "client-first-message")
    if len(parts) < 2:
        raise AuthError("malformed SCRAM client-first-message: missing nonce")
    # The user name is ignored, as in PostgreSQL: the startup packet already named the user.
    _attribute(parts[0], b"n", "client-first-message")
    nonce = _attribute(parts[1], b"r", "client-first-message")
    if not _is_valid_nonce(nonce):
        raise AuthError("malformed SCRAM client-first-message: invalid nonce")
    return nonce  # any further (optional) extensions are ignored


# ---------------------------------------------------------------------------
# SCRAM client (pooler -> PostgreSQL)
# ---------------------------------------------------------------------------


class ScramClient:
    """The pooler's side of SCRAM-SHA-256(-PLUS) when it logs in to PostgreSQL.

    Give either the password, or the ``client_key``/``server_key`` recovered by a
    ScramServer (pass-through): the keys are used as they are, whatever salt and
    iteration count the server announces.

    With ``channel_binding`` (``tls_server_end_point()`` of the certificate the
    server presented over TLS) the client uses SCRAM-SHA-256-PLUS; send the
    initial response with ``mechanism``. Choosing it is the caller's business:
    only do so when the server offered SCRAM-SHA-256-PLUS.
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        username: str = "",
        nonce_factory: Callable[[], str] | None = None,
        channel_binding: bytes | None = None,
    ) -> None:
        has_keys = client_key is not None or server_key is not None
        if (password is None) == (not has_keys):
            raise ValueError("give either a password or client_key and server_key")
        if has_keys and (
            client_key is None
            or server_key is None
            or len(client_key) != _KEY_LENGTH
            or len(server_key) != _KEY_LENGTH
        ):
            raise ValueError(f"client_key and server_key must both be {_KEY_LENGTH} bytes")
        self._channel_binding = _check_channel_binding(channel_binding)
        self._gs2_header = b"n,," if channel_binding is None else _CBIND_GS2_HEADER
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        # PostgreSQL ignores the SCRAM user name, so libpq (and we) send it empty by default.
        self._username = username
        self._nonce_factory = nonce_factory or _default_nonce
        self._state = _State.START
        self._client_nonce = b""
        self._client_first_bare = b""
        self._expected_server_signature = b""

    @property
    def mechanism(self) -> str:
        """The SASL mechanism this client speaks (for SASLInitialResponse)."""
        return SCRAM_MECHANISM if self._channel_binding is None else SCRAM_PLUS_MECHANISM

    def first(self) -> bytes:
        """Return client-first-message."""
        self._expect(_State.START)
        self._client_nonce = _make_nonce(self._nonce_factory)
        username = _escape_saslname(self._username)
        self._client_first_bare = b"n=" + username + b",r=" + self._client_nonce
        self._state = _State.CHALLENGED
        return self._gs2_header + self._client_first_bare

    def final(self, server_first: bytes) -> bytes:
        """Handle server-first-message; return client-final-message with the proof."""
        self._expect(_State.CHALLENGED)
        nonce, salt, iterations = self._parse_server_first(server_first)
        if self._password is not None:
            client_key, server_key = _derive_scram_keys(self._password, salt, iterations)
        else:
            assert self._client_key is not None and self._server_key is not None
            client_key, server_key = self._client_key, self._server_key
        cbind_input = self._gs2_header + (self._channel_binding or b"")
        without_proof = b"c=" + _b64encode(cbind_input) + b",r=" + nonce
        auth_message = b",".join((self._client_first_bare, server_first, without_proof))
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._expected_server_signature = _hmac(server_key, auth_message)
        return without_proof + b",p=" + _b64encode(proof)

    def verify(self, server_final: bytes) -> None:
        """Check server-final-message proves the server knows the secret."""
        if not self._expected_server_signature:
            raise AuthError("SCRAM messages received out of order")
        attribute = server_final.split(b",", 1)[0]
        if attribute.startswith(b"e="):
            reason = attribute[2:].decode("ascii", "replace")
            raise AuthError(f"server rejected SCRAM authentication: {reason}")
        verifier = _attribute(attribute, b"v", "server-final-message")
        signature = _b64decode(verifier, "server signature")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise AuthError("SCRAM server signature does not match: server lacks the secret")

    def _expect(self, expected: str) -> None:
        if self._state != expected:
            raise AuthError("SCRAM messages received out of order")
        self._state = _State.DONE  # any error ends the exchange

    def _parse_server_first(self, message: bytes) -> tuple[bytes, bytes, int]:
        """Return (combined nonce, salt, iterations) from server-first-message."""
        parts = message.split(b",")
        _reject_mandatory_extension(parts[0], "server-first-message")
        if len(parts) < 3:
            raise AuthError("malformed SCRAM server-first-message: missing attributes")
        nonce = _attribute(parts[0], b"r", "server-first-message")
        salt = _b64decode(_attribute(parts[1], b"s", "server-first-message"), "salt")
        iterations = _attribute(parts[2], b"i", "server-first-message")
        # The server must extend our nonce; otherwise it may be replaying an old exchange.
        if (
            len(nonce) <= len(self._client_nonce)
            or not nonce.startswith(self._client_nonce)
            or not _is_valid_nonce(nonce)
        ):
            raise AuthError("SCRAM server nonce does not extend the client nonce")
        if not salt:
            raise AuthError("malformed SCRAM server-first-message: empty salt")
        if not iterations.isdigit() or not 1 <= int(iterations) <= _MAX_ITERATIONS:
            raise AuthError("malformed SCRAM server-first-message: invalid iteration count")
        return nonce, salt, int(iterations)
