"""Message-type names and cold-path decoders of the PostgreSQL v3 protocol."""

from ._codec import (  # noqa: F401  (builders live in the compiled codec)
    action_table, authentication, auth_sasl, command_complete,
    data_row, empty_query_response, error_response, message, parameter_status, password_message,
    query, ready_for_query, row_description, sasl_initial_response, startup_message, terminate,
    PASS, INSPECT, REJECT, STATEMENT_REQUEST, STATEMENT_REPLY, DISCONNECT,
    ERR_LENGTH, ERR_TOO_LONG, ERR_TYPE,
)

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2     # PostgreSQL 18: cancel keys longer than 4 bytes
PROTOCOL_LATEST = PROTOCOL_3_2   # the newest version pgmulti speaks, on both sides
MAX_CANCEL_KEY_LENGTH = 256      # protocol 3.2's limit for the key in BackendKeyData
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# Frontend message types.
BIND = ord("B")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
PASSWORD_MESSAGE = ord("p")
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")
FRONTEND_TYPES = "BCdcfDEHFPpQSX"

# Backend message types.
PARSE_COMPLETE = ord("1")
CLOSE_COMPLETE = ord("3")
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
COMMAND_COMPLETE = ord("C")
DATA_ROW = ord("D")
ERROR_RESPONSE = ord("E")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Type OIDs used by the admin console.
TEXT_OID = 25
INT4_OID = 23
INT8_OID = 20
NUMERIC_OID = 1700


class DecodeError(ValueError):
    """Bytes that do not form the message they claim to be."""


def cstring(buf, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string at pos; return it and the position after the NUL."""
    raw = bytes(buf)
    end = raw.find(b"\0", pos)
    if end < 0:
        raise DecodeError("missing string terminator")
    try:
        return raw[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid UTF-8 in string") from exc


def parse_startup(packet) -> tuple[int, bytes]:
    """Split an untyped startup packet into its request code and the rest."""
    raw = bytes(packet)
    return int.from_bytes(raw[4:8], "big"), raw[8:]


def parse_startup_params(rest: bytes) -> dict[str, str]:
    """StartupMessage parameters: name/value C strings ending with an empty name."""
    # Split at every NUL but the last: a well-formed packet leaves one empty string at the end.
    strings = rest[:-1].split(b"\0")
    if not rest.endswith(b"\0") or strings.pop():
        raise DecodeError("startup packet has no terminator")
    names, values = strings[0::2], strings[1::2]
    if len(names) != len(values) or not all(names):
        raise DecodeError("unexpected bytes after startup parameters")
    try:
        return {name.decode(): value.decode() for name, value in zip(names, values)}
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid UTF-8 in string") from exc


def complete_requests(data: bytes) -> int:
    """How many requests (Query, Sync, FunctionCall) `data` holds if it is a sequence of whole
    frontend messages ending with one; -1 if a message is cut short or something follows the
    last request (the answer would come after a part still to arrive)."""
    requests, pos = 0, 0
    last_request_end = 0
    while pos < len(data):
        if pos + 5 > len(data):
            return -1
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        if length < 4 or pos + 1 + length > len(data):
            return -1
        if data[pos] in (QUERY, SYNC, FUNCTION_CALL):
            requests += 1
            last_request_end = pos + 1 + length
        pos += 1 + length
    return requests if last_request_end == len(data) else -1


def parse_fields(body) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body (after the header) into {field code: text}."""
    raw = bytes(body)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        code = chr(raw[pos])
        text, pos = cstring(raw, pos + 1)
        fields[code] = text
    return fields


def parse_parameter_status(body) -> tuple[str, str]:
    name, pos = cstring(body, 0)
    value, _ = cstring(body, pos)
    return name, value


def parse_data_row(body) -> list[bytes | None]:
    raw = bytes(body)
    count = int.from_bytes(raw[0:2], "big")
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        size = int.from_bytes(raw[pos:pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(raw[pos:pos + size])
            pos += size
    return values


def ssl_request() -> bytes:
    return (8).to_bytes(4, "big") + SSL_REQUEST_CODE.to_bytes(4, "big")


def parse_negotiate_protocol_version(body) -> tuple[int, list[str]]:
    """NegotiateProtocolVersion body: the newest version the server speaks, options it refused."""
    raw = bytes(body)
    if len(raw) < 8:
        raise DecodeError("NegotiateProtocolVersion too short")
    version = int.from_bytes(raw[0:4], "big")
    count = int.from_bytes(raw[4:8], "big")
    options, pos = [], 8
    for _ in range(count):
        name, pos = cstring(raw, pos)
        options.append(name)
    return version, options


def cancel_key_bytes(key: bytes | int) -> bytes:
    """A cancel key as sent: bytes as they are; an int is protocol 3.0's 32-bit key."""
    return key if isinstance(key, bytes) else (key & 0xFFFFFFFF).to_bytes(4, "big")


def backend_key_data(pid: int, key: bytes | int) -> bytes:
    return message(BACKEND_KEY_DATA, (pid & 0xFFFFFFFF).to_bytes(4, "big") + cancel_key_bytes(key))


def cancel_request(pid: int, key: bytes | int) -> bytes:
    key = cancel_key_bytes(key)
    return ((12 + len(key)).to_bytes(4, "big") + CANCEL_REQUEST_CODE.to_bytes(4, "big")
            + (pid & 0xFFFFFFFF).to_bytes(4, "big") + key)


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = (newest_minor.to_bytes(4, "big") + len(unsupported).to_bytes(4, "big")
            + b"".join(name.encode() + b"\0" for name in unsupported))
    return message(NEGOTIATE_PROTOCOL_VERSION, body)
