"""Protocol analyzer: relay sessions to a PostgreSQL server and print every message decoded.

`pgmulti analyze --listen HOST:PORT --target HOST:PORT [--json] [--output FILE]
[--tls-cert FILE --tls-key FILE [--target-ca FILE] [--target-sslmode MODE]]`

Bytes are forwarded unchanged the moment they are read; decoding works on a copy. Each
direction has a small incremental framer that keeps at most PREFIX_MAX bytes of a message
(the rest is only counted), so a 50 MB DataRow streams through with bounded memory and is
reported with its full length and a decoded prefix.

The only bytes the analyzer writes itself are the answers to the client's SSLRequest and
GSSENCRequest: 'N' (or 'S' when it terminates TLS with --tls-cert), so that the session goes on
in a form that can be read. Both are recorded with `origin: analyzer`.

One message can be rewritten, and the output says so (a `Rewrite` event per session): when
the analyzer terminates TLS and its server leg is TLS with another certificate than the
analyzer's, SCRAM-SHA-256-PLUS is removed from the AuthenticationSASL mechanisms the client
receives. Channel binding ties SCRAM to the server's certificate, which the client does not
see through a TLS-terminating relay, so PLUS can never succeed there; without it the client
picks SCRAM-SHA-256. A client that supports binding then sends the gs2 flag 'y' ("I could
bind, you did not offer it"), which PostgreSQL refuses on a TLS connection because it did
offer PLUS: the flag cannot be changed either, as it is inside the signed SCRAM exchange.
So through a TLS server leg only clients with channel_binding=disable log in with SCRAM
(require fails at the client: no binding offered). Two ways keep binding working unchanged:
give the analyzer the server's own certificate and key (--tls-cert/--tls-key; the binding
then matches and nothing is rewritten), or use a plain server leg (--target-sslmode disable:
PostgreSQL offers no PLUS without TLS and accepts 'y').

The decoders are pure functions (`decode(direction, msg_type, body)`); secrets are never
shown: password messages, SASL/SCRAM attribute values, the MD5 salt and cancel keys are
replaced by their size.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import signal
import ssl
import sys
import time
from typing import Any, BinaryIO

import msgspec

from . import protocol

# --- limits -------------------------------------------------------------------------------

PREFIX_MAX = 64 * 1024      # bytes of one message kept for decoding; the rest is only counted
VALUE_MAX = 64              # characters of a Bind/DataRow/notification value shown
HEX_MAX = 32                # bytes of a binary value shown as hex
QUERY_MAX = 8192            # characters of SQL text kept in a record
TEXT_VALUE_MAX = 160        # text output: characters of any one string
TEXT_FIELDS_MAX = 600       # text output: characters of the fields part of a line
STARTUP_MAX = 10000         # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
PENDING_MAX = 256 * 1024    # client bytes buffered while the server connection opens
CONNECT_TIMEOUT_S = 10.0
AUTH_SCAN_MAX = 8192        # login messages held whole while looking for AuthenticationSASL
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
TLS_HANDSHAKE_TIMEOUT_S = 10.0

CLIENT = "client"
SERVER = "server"
ANALYZER = "analyzer"
ARROWS = {CLIENT: "C→S", SERVER: "S→C", ANALYZER: "---"}

REDACTED = "<redacted>"

# --- type OIDs (pg_type.dat: fixed OIDs of built-in types) ---------------------------------

TYPE_NAMES: dict[int, str] = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 22: "int2vector",
    23: "int4", 24: "regproc", 25: "text", 26: "oid", 27: "tid", 28: "xid", 29: "cid",
    30: "oidvector", 114: "json", 142: "xml", 143: "_xml", 194: "pg_node_tree", 199: "_json",
    600: "point", 601: "lseg", 602: "path", 603: "box", 604: "polygon", 628: "line",
    650: "cidr", 700: "float4", 701: "float8", 705: "unknown", 718: "circle", 774: "macaddr8",
    790: "money", 829: "macaddr", 869: "inet", 1000: "_bool", 1001: "_bytea", 1002: "_char",
    1003: "_name", 1005: "_int2", 1007: "_int4", 1009: "_text", 1014: "_bpchar",
    1015: "_varchar", 1016: "_int8", 1021: "_float4", 1022: "_float8", 1028: "_oid",
    1033: "aclitem", 1034: "_aclitem", 1041: "_inet", 1042: "bpchar", 1043: "varchar",
    1082: "date", 1083: "time", 1114: "timestamp", 1115: "_timestamp", 1182: "_date",
    1183: "_time", 1184: "timestamptz", 1185: "_timestamptz", 1186: "interval",
    1187: "_interval", 1231: "_numeric", 1266: "timetz", 1270: "_timetz", 1560: "bit",
    1562: "varbit", 1700: "numeric", 1790: "refcursor", 2202: "regprocedure", 2203: "regoper",
    2204: "regoperator", 2205: "regclass", 2206: "regtype", 2249: "record", 2275: "cstring",
    2276: "any", 2277: "anyarray", 2278: "void", 2279: "trigger", 2283: "anyelement",
    2287: "_record", 2950: "uuid", 2951: "_uuid", 2970: "txid_snapshot", 3220: "pg_lsn",
    3614: "tsvector", 3615: "tsquery", 3734: "regconfig", 3769: "regdictionary",
    3802: "jsonb", 3807: "_jsonb", 3904: "int4range", 3906: "numrange", 3908: "tsrange",
    3910: "tstzrange", 3912: "daterange", 3926: "int8range", 4072: "jsonpath",
    4089: "regnamespace", 4096: "regrole", 5038: "pg_snapshot", 5069: "xid8",
}


def type_name(oid: int) -> str:
    """Name of a built-in type OID; other OIDs (user types) as the number."""
    return TYPE_NAMES.get(oid, str(oid))


# --- message names ------------------------------------------------------------------------

FRONTEND_NAMES = {
    "B": "Bind", "C": "Close", "d": "CopyData", "c": "CopyDone", "f": "CopyFail",
    "D": "Describe", "E": "Execute", "H": "Flush", "F": "FunctionCall", "P": "Parse",
    "p": "PasswordMessage", "Q": "Query", "S": "Sync", "X": "Terminate",
}
BACKEND_NAMES = {
    "R": "Authentication", "K": "BackendKeyData", "2": "BindComplete", "3": "CloseComplete",
    "C": "CommandComplete", "d": "CopyData", "c": "CopyDone", "G": "CopyInResponse",
    "H": "CopyOutResponse", "W": "CopyBothResponse", "D": "DataRow", "I": "EmptyQueryResponse",
    "E": "ErrorResponse", "V": "FunctionCallResponse", "v": "NegotiateProtocolVersion",
    "n": "NoData", "N": "NoticeResponse", "A": "NotificationResponse",
    "t": "ParameterDescription", "S": "ParameterStatus", "1": "ParseComplete",
    "s": "PortalSuspended", "Z": "ReadyForQuery", "T": "RowDescription",
}
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_NAMES = {
    0: "AuthenticationOk", 2: "AuthenticationKerberosV5", 3: "AuthenticationCleartextPassword",
    5: "AuthenticationMD5Password", 6: "AuthenticationSCMCredential", 7: "AuthenticationGSS",
    8: "AuthenticationGSSContinue", 9: "AuthenticationSSPI", 10: "AuthenticationSASL",
    11: "AuthenticationSASLContinue", 12: "AuthenticationSASLFinal",
}
STARTUP_NAMES = {
    protocol.SSL_REQUEST_CODE: "SSLRequest",
    protocol.GSSENC_REQUEST_CODE: "GSSENCRequest",
    protocol.CANCEL_REQUEST_CODE: "CancelRequest",
}
READY_STATUS = {"I": "idle", "T": "in transaction", "E": "failed"}
# ErrorResponse / NoticeResponse field codes (protocol-error-fields.html).
ERROR_FIELDS = {
    "S": "severity", "V": "severity_nonlocalized", "C": "code", "M": "message", "D": "detail",
    "H": "hint", "P": "position", "p": "internal_position", "q": "internal_query",
    "W": "where", "s": "schema", "t": "table", "c": "column", "d": "data_type",
    "n": "constraint", "F": "file", "L": "line", "R": "routine",
}
FORMATS = {0: "text", 1: "binary"}


class DecodeContext(msgspec.Struct):
    """What a decoder needs to know from earlier messages of the same session.

    auth_code: the last Authentication request (tells a SASLInitialResponse from a
    PasswordMessage, both 'p'); row_formats: the result formats DataRows are in, from the last
    RowDescription or BindComplete. Updated by `observe`, read by `decode`.
    """

    auth_code: int | None = None
    row_formats: list[int] = []  # per column; DataRow values past its end: format unknown
    pending_bind_formats: list[list[int]] = []

    def observe(self, direction: str, decoded: dict[str, Any]) -> None:
        """Update from a message just decoded ({"type": ..., "fields": ...})."""
        name = decoded["type"]
        fields = decoded["fields"]
        if direction == SERVER:
            if name in _AUTH_CODES:
                self.auth_code = _AUTH_CODES[name]
            elif name == "RowDescription" and "columns" in fields:
                self.row_formats = [_format_code(c["format"]) for c in fields["columns"]]
            elif name == "BindComplete" and self.pending_bind_formats:
                # Bind's result formats are what DataRows come in, even when the RowDescription
                # came from a statement Describe (which always says text).
                self.row_formats = self.pending_bind_formats.pop(0)
            elif name == "ReadyForQuery":
                self.pending_bind_formats.clear()
        elif name == "Bind" and "result_formats" in fields:
            if len(self.pending_bind_formats) < 1000:
                self.pending_bind_formats.append(
                    [_format_code(code) for code in fields["result_formats"]])


def _format_code(name: str) -> int:
    return _FORMAT_CODES.get(name, 0)


_AUTH_CODES = {name: code for code, name in AUTH_NAMES.items()}
_FORMAT_CODES = {name: code for code, name in FORMATS.items()}


# --- decoding -----------------------------------------------------------------------------


class _Short(Exception):
    """The decoded prefix ends here: the message is longer than what was kept."""


class _Reader:
    """Cursor over a message body, or over the prefix of one (`total` is the full size)."""

    __slots__ = ("buf", "pos", "total", "partial")

    def __init__(self, body: bytes, total: int | None = None):
        self.buf = body
        self.pos = 0
        self.total = len(body) if total is None else max(total, len(body))
        self.partial = self.total > len(body)

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            if self.partial:
                raise _Short
            raise protocol.DecodeError("message ends early")

    def int16(self, signed: bool = False) -> int:
        self._need(2)
        value = int.from_bytes(self.buf[self.pos:self.pos + 2], "big", signed=signed)
        self.pos += 2
        return value

    def int32(self, signed: bool = False) -> int:
        self._need(4)
        value = int.from_bytes(self.buf[self.pos:self.pos + 4], "big", signed=signed)
        self.pos += 4
        return value

    def byte(self) -> str:
        self._need(1)
        value = chr(self.buf[self.pos])
        self.pos += 1
        return value

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            if self.partial:
                raise _Short
            raise protocol.DecodeError("missing string terminator")
        value = self.buf[self.pos:end].decode("utf-8", "backslashreplace")
        self.pos = end + 1
        return value

    def value(self, size: int) -> tuple[bytes, int]:
        """`size` bytes, or the part of them that was kept; returns (bytes, size)."""
        if size > len(self.buf) - self.pos and not self.partial:
            raise protocol.DecodeError("value longer than the message")
        data = self.buf[self.pos:self.pos + size]
        self.pos += len(data)
        if len(data) < size:
            self.pos = len(self.buf)
        return data, size

    def rest(self) -> bytes:
        data = self.buf[self.pos:]
        self.pos = len(self.buf)
        return data

    @property
    def remaining(self) -> int:
        """Bytes of the whole message still to read (including those not kept)."""
        return self.total - self.pos


_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 127: "\\x7f"})


def clip(text: str, limit: int, size: int | None = None) -> str:
    """text cut to `limit` characters; a cut shows '…' and the full size in bytes if known."""
    if len(text) <= limit and size is None:
        return text
    cut = text[:limit]
    if size is not None:
        return f"{cut}… [{size} bytes]"
    return cut + "…"


def _looks_text(text: str) -> bool:
    return text.isprintable() or text.translate(_WHITESPACE).isprintable()


_WHITESPACE = {ord("\n"): None, ord("\r"): None, ord("\t"): None}


def render_value(data: bytes, size: int, binary: bool | None) -> str:
    """A parameter/column value: text (truncated) or, for binary data, a hex prefix.

    size: the value's full size (data may be a prefix of it). binary None: the format is not
    known; shown as text if it is valid UTF-8 without control characters, else as hex.
    """
    if not binary:
        window = VALUE_MAX * 4  # enough bytes for VALUE_MAX characters of any UTF-8 text
        head = data[:window]
        cut = size > len(head)
        text: str | None
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # A cut inside a multibyte character still leaves text before it.
            text = head[:exc.start].decode("utf-8") if cut and exc.start >= len(head) - 3 else None
        if text is None and binary is False:
            text = head.decode("utf-8", "backslashreplace")
        if text is not None and (binary is False or _looks_text(text)):
            if cut or len(text) > VALUE_MAX:
                return clip(text, VALUE_MAX, size)
            return text
    hexed = "\\x" + data[:HEX_MAX].hex()
    if size > HEX_MAX:
        return f"{hexed}… [{size} bytes]"
    return hexed


def _formats_for(codes: list[int], count: int) -> list[int]:
    """Format codes as sent (none: all text; one: all the same; else one each) per value."""
    if not codes:
        return [0] * count
    if len(codes) == 1:
        return codes * count
    return codes


def _format_name(code: int) -> str:
    return FORMATS.get(code, str(code))


def _sql(reader: _Reader) -> str:
    start = reader.pos
    try:
        text = reader.cstring()
    except _Short:
        raw = reader.rest()
        return clip(raw.decode("utf-8", "replace"), QUERY_MAX, reader.total - start - 1)
    if len(text) > QUERY_MAX:
        return clip(text, QUERY_MAX, reader.pos - start - 1)
    return text


def _scram_attributes(data: bytes, client_first: bool = False) -> dict[str, Any]:
    """Attribute names of a SCRAM message (values are secrets or nonces: never shown)."""
    parts = data.decode("utf-8", "replace").split(",")
    out: dict[str, Any] = {}
    if client_first and len(parts) >= 2:
        flag = parts[0]
        # gs2 header: 'n', 'y' or 'p=<channel binding type>' (a name, not a secret).
        out["channel_binding"] = flag if flag in ("n", "y") or flag.startswith("p=") else "?"
        out["authzid"] = "present" if parts[1] else "none"
        parts = parts[2:]
    # Names are single letters ("r", "s", "i", "c", "p", "v", "e"); anything else is not SCRAM
    # and may be a secret sent by mistake, so it is not shown either.
    out["attributes"] = [_scram_name(part) for part in parts if part]
    return out


def _scram_name(part: str) -> str:
    name, sep, _ = part.partition("=")
    return name if sep and len(name) == 1 and name.isascii() and name.isalpha() else "?"


def _redacted(size: int) -> str:
    return f"{REDACTED} ({size} bytes)"


# Each decoder fills `fields` as it goes, so a prefix keeps what could be read. Where the
# message name depends on the body, the decoder sets fields[_NAME] as soon as it knows it.
_NAME = "__type"


def _startup(r: _Reader, f: dict, ctx: DecodeContext | None) -> None:
    code = r.int32()
    if code == protocol.CANCEL_REQUEST_CODE:
        f[_NAME] = "CancelRequest"
        f["pid"] = r.int32()
        f["key"] = _redacted(r.remaining)
        r.rest()
        return
    if code in STARTUP_NAMES:
        f[_NAME] = STARTUP_NAMES[code]
        return
    f[_NAME] = "StartupMessage"
    major, minor = code >> 16, code & 0xFFFF
    f["protocol"] = f"{major}.{minor}"
    if major != 3:
        f["hex"] = _hex(r.rest(), r.total - r.pos)
        return
    params: dict[str, str] = {}
    f["params"] = params
    while True:
        name = r.cstring()
        if not name:
            break
        params[name] = r.cstring()


def _password(r: _Reader, f: dict, ctx: DecodeContext | None) -> None:
    size = r.remaining
    code = ctx.auth_code if ctx is not None else None
    if code == protocol.AUTH_SASL:
        f[_NAME] = "SASLInitialResponse"
        f["mechanism"] = r.cstring()
        length = r.int32(signed=True)
        data, size = r.value(max(length, 0))
        f.update(_scram_attributes(data, client_first=True))
        f["data"] = _redacted(size)
    elif code == protocol.AUTH_SASL_CONTINUE:
        f[_NAME] = "SASLResponse"
        f.update(_scram_attributes(r.rest()))
        f["data"] = _redacted(size)
    elif code in (AUTH_GSS, AUTH_GSS_CONTINUE, AUTH_SSPI):
        f[_NAME] = "GSSResponse"
        r.rest()
        f["data"] = _redacted(size)
    else:
        r.rest()
        f["password"] = _redacted(size)


def _query(r: _Reader, f: dict, ctx) -> None:
    f["query"] = _sql(r)


def _parse(r: _Reader, f: dict, ctx) -> None:
    f["statement"] = r.cstring()
    f["query"] = _sql(r)
    count = r.int16()
    types: list[str] = []
    f["param_types"] = types
    for _ in range(count):
        types.append(_param_type(r.int32()))


def _param_type(oid: int) -> str:
    return "unspecified" if oid == 0 else type_name(oid)


def _values(r: _Reader, format_codes: list[int]) -> list[str | None]:
    """A count and that many length-prefixed values (Bind parameters, FunctionCall arguments)."""
    count = r.int16()
    formats = _formats_for(format_codes, count)
    values: list[str | None] = []
    for i in range(count):
        size = r.int32(signed=True)
        if size < 0:
            values.append(None)
            continue
        data, size = r.value(size)
        values.append(render_value(data, size, formats[i] == 1 if i < len(formats) else None))
    return values


def _bind(r: _Reader, f: dict, ctx) -> None:
    f["portal"] = r.cstring()
    f["statement"] = r.cstring()
    codes = [r.int16() for _ in range(r.int16())]
    f["param_formats"] = [_format_name(code) for code in codes]
    f["params"] = _values(r, codes)
    results = [r.int16() for _ in range(r.int16())]
    f["result_formats"] = [_format_name(code) for code in results]


def _describe(r: _Reader, f: dict, ctx) -> None:
    kind = r.byte()
    f["kind"] = {"S": "statement", "P": "portal"}.get(kind, kind)
    f["name"] = r.cstring()


def _execute(r: _Reader, f: dict, ctx) -> None:
    f["portal"] = r.cstring()
    f["max_rows"] = r.int32()


def _copy_data(r: _Reader, f: dict, ctx) -> None:
    f["size"] = r.remaining
    r.rest()


def _copy_fail(r: _Reader, f: dict, ctx) -> None:
    f["message"] = clip(r.cstring(), TEXT_VALUE_MAX)


def _function_call(r: _Reader, f: dict, ctx) -> None:
    f["function_oid"] = r.int32()
    codes = [r.int16() for _ in range(r.int16())]
    f["arg_formats"] = [_format_name(code) for code in codes]
    f["args"] = _values(r, codes)
    f["result_format"] = _format_name(r.int16())


def _nothing(r: _Reader, f: dict, ctx) -> None:
    if r.remaining:
        f["unexpected_bytes"] = r.remaining
        r.rest()


def _authentication(r: _Reader, f: dict, ctx) -> None:
    code = r.int32()
    f[_NAME] = AUTH_NAMES.get(code, "Authentication")
    if code == protocol.AUTH_MD5:
        f["salt"] = _redacted(r.remaining)  # present, but not shown
        r.rest()
    elif code == protocol.AUTH_SASL:
        mechanisms: list[str] = []
        f["mechanisms"] = mechanisms
        while True:
            mechanism = r.cstring()
            if not mechanism:
                break
            mechanisms.append(mechanism)
    elif code in (protocol.AUTH_SASL_CONTINUE, protocol.AUTH_SASL_FINAL):
        size = r.remaining
        f.update(_scram_attributes(r.rest()))
        f["data"] = _redacted(size)
    elif code == AUTH_GSS_CONTINUE:
        f["data"] = _redacted(r.remaining)
        r.rest()
    elif code not in AUTH_NAMES:
        f["code"] = code
        f["data"] = _redacted(r.remaining)
        r.rest()


def _backend_key_data(r: _Reader, f: dict, ctx) -> None:
    f["pid"] = r.int32()
    f["key"] = _redacted(r.remaining)
    r.rest()


def _parameter_status(r: _Reader, f: dict, ctx) -> None:
    f["name"] = r.cstring()
    f["value"] = r.cstring()


def _ready_for_query(r: _Reader, f: dict, ctx) -> None:
    status = r.byte()
    f["status"] = READY_STATUS.get(status, status)


def _row_description(r: _Reader, f: dict, ctx) -> None:
    count = r.int16()
    columns: list[dict[str, Any]] = []
    f["columns"] = columns
    for _ in range(count):
        name = r.cstring()
        table_oid = r.int32()
        column = r.int16(signed=True)
        oid = r.int32()
        size = r.int16(signed=True)
        typmod = r.int32(signed=True)
        fmt = r.int16()
        columns.append({"name": name, "type": type_name(oid), "type_oid": oid,
                        "table_oid": table_oid, "column": column, "size": size,
                        "typmod": typmod, "format": _format_name(fmt)})


def _data_row(r: _Reader, f: dict, ctx: DecodeContext | None) -> None:
    count = r.int16()
    formats = ctx.row_formats if ctx is not None else []
    values: list[str | None] = []
    f["values"] = values
    for i in range(count):
        size = r.int32(signed=True)
        if size < 0:
            values.append(None)
            continue
        data, size = r.value(size)
        binary = (formats[i] == 1) if i < len(formats) else None
        values.append(render_value(data, size, binary))


def _command_complete(r: _Reader, f: dict, ctx) -> None:
    f["tag"] = r.cstring()


def _error_fields(r: _Reader, f: dict, ctx) -> None:
    while True:
        code = r.byte()
        if code == "\0":
            break
        text = r.cstring()
        name = ERROR_FIELDS.get(code, f"field_{code}")
        if name in ("position", "internal_position", "line"):
            f[name] = int(text) if text.isdigit() else text
        else:
            f[name] = clip(text, QUERY_MAX)


def _notification(r: _Reader, f: dict, ctx) -> None:
    f["pid"] = r.int32()
    f["channel"] = r.cstring()
    start = r.pos
    try:
        payload = r.cstring().encode()
    except _Short:
        payload = r.rest()
    f["payload"] = render_value(payload, r.total - start - 1, False)


def _copy_response(r: _Reader, f: dict, ctx) -> None:
    f["format"] = _format_name(ord(r.byte()))
    f["column_formats"] = [_format_name(r.int16()) for _ in range(r.int16())]


def _negotiate(r: _Reader, f: dict, ctx) -> None:
    f["newest_minor"] = r.int32()
    f["unsupported"] = [r.cstring() for _ in range(r.int32())]


def _parameter_description(r: _Reader, f: dict, ctx) -> None:
    types: list[str] = []
    f["param_types"] = types
    for _ in range(r.int16()):
        types.append(type_name(r.int32()))


def _function_result(r: _Reader, f: dict, ctx) -> None:
    size = r.int32(signed=True)
    if size < 0:
        f["value"] = None
    else:
        data, size = r.value(size)
        f["value"] = render_value(data, size, None)


FRONTEND_DECODERS = {
    "B": _bind, "C": _describe, "d": _copy_data, "c": _nothing, "f": _copy_fail,
    "D": _describe, "E": _execute, "H": _nothing, "F": _function_call, "P": _parse,
    "p": _password, "Q": _query, "S": _nothing, "X": _nothing,
}
BACKEND_DECODERS = {
    "R": _authentication, "K": _backend_key_data, "2": _nothing, "3": _nothing,
    "C": _command_complete, "d": _copy_data, "c": _nothing, "G": _copy_response,
    "H": _copy_response, "W": _copy_response, "D": _data_row, "I": _nothing,
    "E": _error_fields, "V": _function_result, "v": _negotiate, "n": _nothing,
    "N": _error_fields, "A": _notification, "t": _parameter_description,
    "S": _parameter_status, "1": _nothing, "s": _nothing, "Z": _ready_for_query,
    "T": _row_description,
}
# Messages whose bytes may hold secrets: never dumped as hex, even when malformed.
_SECRET = {(CLIENT, "p"), (SERVER, "R"), (CLIENT, ""), (SERVER, "")}
# Messages reported by size only: their bodies are not kept (Framer) nor wanted.
_SIZE_ONLY = {"d"}


def _hex(data: bytes, size: int) -> str:
    text = data[:HEX_MAX].hex()
    return f"{text}… [{size} bytes]" if size > HEX_MAX else text


def _type_char(msg_type: int | str) -> str:
    if isinstance(msg_type, str):
        return msg_type
    return chr(msg_type) if msg_type else ""


def decode(direction: str, msg_type: int | str, body: bytes, *, total: int | None = None,
           context: DecodeContext | None = None) -> dict[str, Any]:
    """Decode one message: {"type": name, "fields": {...}}.

    direction: "client" (frontend message) or "server" (backend message). msg_type: the type
    byte (int or one-character str); 0 or "" for an untyped startup packet, whose body starts
    at the request code. body: the bytes after the length field, or a prefix of them when the
    message is longer than what was kept (`total` is then the full body size, and the result
    has "truncated": true if decoding reached the cut). context: session state for the
    messages whose meaning depends on earlier ones ('p', DataRow formats).
    """
    t = _type_char(msg_type)
    body = bytes(body)
    reader = _Reader(body, total)
    fields: dict[str, Any] = {}
    if t == "":
        decoder = _startup
        name = "StartupPacket"
    elif direction == CLIENT:
        decoder = FRONTEND_DECODERS.get(t)
        name = FRONTEND_NAMES.get(t, "")
    else:
        decoder = BACKEND_DECODERS.get(t)
        name = BACKEND_NAMES.get(t, "")
    if decoder is None:
        fields["byte"] = t if t.isprintable() else f"0x{ord(t):02x}"
        fields["hex"] = _hex(body, reader.total)
        return {"type": "Unknown", "fields": fields}
    try:
        decoder(reader, fields, context)
    except _Short:
        fields["truncated"] = True
    except protocol.DecodeError as exc:
        fields["malformed"] = str(exc)
        if (direction, t) not in _SECRET:
            fields["hex"] = _hex(body, reader.total)
    else:
        if reader.partial and t not in _SIZE_ONLY:
            fields["truncated"] = True
    name = fields.pop(_NAME, name)
    return {"type": name, "fields": fields}


# --- framing ------------------------------------------------------------------------------

COPY_DATA = protocol.COPY_DATA


class Framer:
    """Incremental message framer for one direction, on a copy of the relayed bytes.

    feed(data) calls on_message(msg_type, length, body) for every whole message, where
    `length` is the protocol's length field (itself included) and `body` the first
    PREFIX_MAX bytes of the body (none for CopyData: only its size is reported). Only that
    prefix is ever held, whatever the message size. `typed=False` frames untyped startup
    packets (msg_type 0). A length field below 4 cannot be framed: on_error(msg_type, length)
    is called once and the rest of the stream is ignored.
    """

    __slots__ = ("typed", "on_message", "on_error", "_head", "_type", "_length", "_body",
                 "_want", "_skip", "_in_body", "broken", "prefix_max")

    def __init__(self, on_message, on_error=None, *, typed: bool = True,
                 prefix_max: int = PREFIX_MAX):
        self.typed = typed
        self.on_message = on_message
        self.on_error = on_error
        self.prefix_max = prefix_max
        self._head = bytearray()
        self._body = bytearray()
        self._type = 0
        self._length = 0
        self._want = 0
        self._skip = 0
        self._in_body = False
        self.broken = False

    def _limit(self, msg_type: int) -> int:
        return 0 if msg_type == COPY_DATA else self.prefix_max

    def feed(self, data) -> None:
        if self.broken:
            return
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        header = 5 if self.typed else 4
        emit = self.on_message
        while pos < n:
            if not self._in_body:
                if not self._head and n - pos >= header:
                    # Fast path: the header is whole in this chunk.
                    if self.typed:
                        msg_type = mv[pos]
                        length = int.from_bytes(mv[pos + 1:pos + 5], "big")
                    else:
                        msg_type = 0
                        length = int.from_bytes(mv[pos:pos + 4], "big")
                    pos += header
                else:
                    take = min(header - len(self._head), n - pos)
                    self._head += mv[pos:pos + take]
                    pos += take
                    if len(self._head) < header:
                        return
                    if self.typed:
                        msg_type = self._head[0]
                        length = int.from_bytes(self._head[1:5], "big")
                    else:
                        msg_type = 0
                        length = int.from_bytes(self._head[0:4], "big")
                    self._head.clear()
                if length < 4 or (not self.typed and length < 8):
                    self.broken = True
                    if self.on_error is not None:
                        self.on_error(msg_type, length)
                    return
                size = length - 4
                keep = min(size, self._limit(msg_type))
                if not self._body and n - pos >= size and keep == size:
                    emit(msg_type, length, bytes(mv[pos:pos + size]))
                    pos += size
                    continue
                self._type = msg_type
                self._length = length
                self._want = keep
                self._skip = size - keep
                self._in_body = True
            if self._want:
                take = min(self._want, n - pos)
                self._body += mv[pos:pos + take]
                pos += take
                self._want -= take
            if not self._want and self._skip:
                take = min(self._skip, n - pos)
                pos += take
                self._skip -= take
            if not self._want and not self._skip:
                body = bytes(self._body)
                self._body.clear()
                self._in_body = False
                emit(self._type, self._length, body)


# --- records and output ---------------------------------------------------------------------


class Record(msgspec.Struct, kw_only=True):
    """One line of output: a message (or an analyzer event) of one session."""

    time: str                   # ISO 8601, UTC, microseconds
    session: int                # 1, 2, ... per accepted client connection
    direction: str              # "client" (C→S), "server" (S→C) or "analyzer" (an event)
    type: str                   # message name, e.g. "RowDescription"
    length: int | None = None   # the message's length field (itself included); None for events
    fields: dict[str, Any] = {}


_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-:/+")


def _text_str(value: str, bare_ok: bool) -> str:
    value = clip(value, TEXT_VALUE_MAX) if len(value) > TEXT_VALUE_MAX else value
    if bare_ok and value and value[0].isalpha() and all(ch in _IDENT_CHARS for ch in value):
        return value
    # Quoted as Python would (no backslash doubling, to keep \x hex and paths readable).
    value = value.translate(_ESCAPES)
    if "'" in value and '"' not in value:
        return '"' + value + '"'
    return "'" + value.replace("'", "\\'") + "'"


def _text_value(value: Any, bare_ok: bool = True) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _text_str(value, bare_ok)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text_value(item, False) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + " ".join(f"{key}={_text_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def _text_columns(columns: list[dict[str, Any]]) -> str:
    parts = []
    for column in columns:
        part = f"{_text_str(column['name'], True)}:{column['type']}"
        if column.get("format") != "text":
            part += f"({column.get('format')})"
        parts.append(part)
    return "[" + ", ".join(parts) + "]"


def format_text(record: Record) -> str:
    """One aligned line: time, session, direction, type, length, fields."""
    stamp = record.time[11:26]  # HH:MM:SS.ffffff of the UTC ISO time
    length = "" if record.length is None else f"len={record.length}"
    parts = []
    for key, value in record.fields.items():
        if key == "columns" and isinstance(value, list):
            parts.append(f"columns={_text_columns(value)}")
        else:
            parts.append(f"{key}={_text_value(value)}")
    text = " ".join(parts)
    if len(text) > TEXT_FIELDS_MAX:
        text = text[:TEXT_FIELDS_MAX] + "…"
    arrow = ARROWS.get(record.direction, record.direction)
    line = f"{stamp}  #{record.session:<4d} {arrow}  {record.type:<27s} {length:<11s} {text}"
    return line.rstrip()


class Output:
    """Writes records as text lines or JSON lines; flushed once per loop iteration."""

    def __init__(self, stream: BinaryIO, json_lines: bool):
        self.stream = stream
        self.json_lines = json_lines
        self._encoder = msgspec.json.Encoder()
        self._flush_handle: asyncio.Handle | None = None
        self.failed = False

    def write(self, record: Record) -> None:
        if self.failed:
            return
        if self.json_lines:
            data = self._encoder.encode(record) + b"\n"
        else:
            data = (format_text(record) + "\n").encode("utf-8", "backslashreplace")
        try:
            self.stream.write(data)
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return
        if self._flush_handle is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_handle = None
        if self.failed:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        # A closed pipe (e.g. `| head`) stops the output, not the relaying.
        self.failed = True
        print(f"pgmulti analyze: output stopped: {exc}", file=sys.stderr)


_stamp_cache: tuple[float, str] = (0.0, "")


def iso_time(ts: float) -> str:
    global _stamp_cache
    if _stamp_cache[0] == ts:
        return _stamp_cache[1]
    text = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")
    _stamp_cache = (ts, text)
    return text


# --- sessions -----------------------------------------------------------------------------

SSL_REQUEST = (8).to_bytes(4, "big") + protocol.SSL_REQUEST_CODE.to_bytes(4, "big")
TLS_RECORD_HANDSHAKE = 0x16  # first byte of a TLS ClientHello: direct TLS (PostgreSQL 17+)


class Settings(msgspec.Struct, frozen=True):
    listen_host: str | None
    listen_port: int
    target_host: str
    target_port: int            # 0: target_host is a Unix socket path
    json_lines: bool = False
    output: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    target_ca: str | None = None
    target_sslmode: str = "prefer"  # server leg when the client's is TLS: disable/prefer/require


def make_tls_contexts(settings: Settings) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """TLS contexts for --tls-cert: the client leg (we are the server) and the server leg.

    Raises OSError / ssl.SSLError if the files cannot be loaded.
    """
    if not settings.tls_cert:
        return None
    client_leg = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_leg.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    client_leg.set_alpn_protocols(["postgresql"])
    server_leg = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    server_leg.check_hostname = False
    if settings.target_ca:
        # verify-ca: the chain must lead to the given CA; the host name is not checked.
        server_leg.load_verify_locations(settings.target_ca)
        server_leg.verify_mode = ssl.CERT_REQUIRED
    else:
        server_leg.verify_mode = ssl.CERT_NONE
    server_leg.set_alpn_protocols(["postgresql"])
    return client_leg, server_leg


def leaf_certificate_der(cert_file: str | None) -> bytes | None:
    """The first certificate of a PEM file as DER (what a TLS peer of ours receives)."""
    if not cert_file:
        return None
    try:
        with open(cert_file) as handle:
            pem = handle.read()
        end = pem.find(PEM_END)
        return ssl.PEM_cert_to_DER_cert(pem[:end + len(PEM_END)] if end >= 0 else pem)
    except (OSError, ValueError):
        return None


PEM_END = "-----END CERTIFICATE-----"


class Analyzer:
    """Accepts clients, opens a server connection per session, owns the output."""

    def __init__(self, settings: Settings, output: Output,
                 tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None):
        self.settings = settings
        self.output = output
        self.sessions: set[Session] = set()
        self._ids = itertools.count(1)
        # (context for the client leg, context for the server leg), or None: TLS refused.
        self.client_tls, self.server_tls = tls if tls is not None else (None, None)
        # Channel binding (tls-server-end-point) hashes the server certificate the client
        # sees: it survives the relay only if that is the server's own certificate.
        self.own_certificate = leaf_certificate_der(settings.tls_cert)

    def new_client(self) -> ClientSide:
        session = Session(self, next(self._ids))
        self.sessions.add(session)
        return session.client

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.close("analyzer stopped")


class Session:
    """One client connection and its server connection; records both directions."""

    def __init__(self, analyzer: Analyzer, session_id: int):
        self.analyzer = analyzer
        self.id = session_id
        self.client = ClientSide(self)
        self.server: ServerSide | None = None
        self.context = DecodeContext()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.client_tls = False
        self.opening: asyncio.Task | None = None
        self.ended = False
        self.bytes = {CLIENT: 0, SERVER: 0}
        self._now = 0.0
        self.strip_scram_plus = False   # see the module docstring: the one rewrite
        self.scram_plus_stripped: list[str] | None = None  # the mechanisms the client got
        self.copy_data = {CLIENT: [0, 0], SERVER: [0, 0]}  # CopyData messages, bytes

    # -- recording --

    def event(self, direction: str, name: str, fields: dict[str, Any], length: int | None = None,
              ts: float | None = None) -> None:
        record = Record(time=iso_time(ts if ts is not None else time.time()), session=self.id,
                        direction=direction, type=name, length=length, fields=fields)
        self.analyzer.output.write(record)

    def message(self, direction: str, msg_type: int, length: int, body: bytes,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            decoded = decode(direction, msg_type, body, total=length - 4, context=self.context)
            self.context.observe(direction, decoded)
        except Exception as exc:  # noqa: BLE001  (a decoder bug must not touch the relaying)
            names = FRONTEND_NAMES if direction == CLIENT else BACKEND_NAMES
            decoded = {"type": names.get(_type_char(msg_type), "Unknown"),
                       "fields": {"decode_error": f"{type(exc).__name__}: {exc}"}}
        fields = decoded["fields"]
        if extra:
            fields.update(extra)
        self._copy_totals(direction, decoded["type"], fields)
        self.event(direction, decoded["type"], fields, length, self._now)
        if decoded["type"] == "AuthenticationSASL" and self.scram_plus_stripped is not None:
            # ServerSide removed PLUS from these very bytes before the framer saw them.
            self.event(ANALYZER, "Rewrite", {
                "message": "AuthenticationSASL", "removed": SCRAM_PLUS,
                "sent_to_client": self.scram_plus_stripped,
                "reason": "channel binding cannot pass a TLS-terminating relay whose "
                          "certificate differs from the server's"}, ts=self._now)
        elif (decoded["type"] == "SASLInitialResponse" and self.scram_plus_stripped is not None
                and fields.get("channel_binding") == "y"):
            self.event(ANALYZER, "Note", {
                "note": "the client supports channel binding (gs2 flag 'y') and PostgreSQL, "
                        "which offered SCRAM-SHA-256-PLUS over its TLS connection, will "
                        "refuse that; use channel_binding=disable, the server's own "
                        "certificate for --tls-cert, or --target-sslmode disable"},
                ts=self._now)
        return decoded

    def _copy_totals(self, direction: str, name: str, fields: dict[str, Any]) -> None:
        """CopyData sizes add up per direction; CopyDone and CopyFail show the totals."""
        if name == "CopyData":
            totals = self.copy_data[direction]
            totals[0] += 1
            totals[1] += fields.get("size", 0)
        elif name in ("CopyDone", "CopyFail"):
            count, size = self.copy_data[direction]
            fields["data_messages"] = count
            fields["data_bytes"] = size
            self.copy_data[direction] = [0, 0]
        elif name in ("CopyInResponse", "CopyOutResponse", "CopyBothResponse"):
            self.copy_data = {CLIENT: [0, 0], SERVER: [0, 0]}

    def client_message(self, msg_type: int, length: int, body: bytes) -> None:
        self.message(CLIENT, msg_type, length, body)

    def server_message(self, msg_type: int, length: int, body: bytes) -> None:
        self.message(SERVER, msg_type, length, body)

    def framing_error(self, direction: str, msg_type: int, length: int) -> None:
        self.event(ANALYZER, "FramingError", {
            "direction": direction, "byte": f"0x{msg_type:02x}", "length": length,
            "note": "invalid length: bytes are still relayed, no longer decoded"}, ts=self._now)

    # -- relaying --

    def to_server(self, data: bytes) -> None:
        server = self.server
        if server is not None and server.ready:
            if not server.closed:
                server.transport.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_MAX:
            self.client.pause("pending")
        if self.opening is None and not self.ended:
            self.opening = asyncio.get_running_loop().create_task(self._open_server())

    async def _open_server(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.analyzer.settings
        target = (settings.target_host if not settings.target_port
                  else f"{settings.target_host}:{settings.target_port}")
        server = ServerSide(self)
        self.server = server
        try:
            if settings.target_port:
                connect = loop.create_connection(lambda: server, settings.target_host,
                                                 settings.target_port)
            else:
                connect = loop.create_unix_connection(lambda: server, settings.target_host)
            await asyncio.wait_for(connect, CONNECT_TIMEOUT_S)
            if self.client_tls and settings.target_sslmode != "disable":
                await self._server_tls(server)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure ends the session, reported)
            reason = str(exc) or type(exc).__name__
            self.event(ANALYZER, "ServerConnectFailed", {"target": target, "error": reason})
            if not self.ended:
                self._refuse_client(f"pgmulti analyze could not connect to {target}: {reason}")
            return
        if self.ended:
            server.close()
            return
        self.event(ANALYZER, "ServerConnected", {"target": target, "tls": server.tls})
        server.ready = True
        pending, self.pending, self.pending_size = self.pending, [], 0
        for data in pending:
            server.transport.write(data)
        self.client.resume("pending")
        early, server.early = server.early, []
        for data in early:
            server.relay(data)

    async def _server_tls(self, server: ServerSide) -> None:
        """Our own SSLRequest to the server: TLS if it says 'S', plain if 'N'."""
        loop = asyncio.get_running_loop()
        server.answer = loop.create_future()
        server.transport.write(SSL_REQUEST)
        self.event(CLIENT, "SSLRequest", {"origin": ANALYZER}, 8)
        answer = await asyncio.wait_for(server.answer, CONNECT_TIMEOUT_S)
        self.event(SERVER, "SSLResponse", {"answer": answer}, None)
        if answer == "N":
            if self.analyzer.settings.target_sslmode == "require":
                raise ConnectionError("the target has no TLS (--target-sslmode require)")
            return  # the server has no TLS: this leg stays plain (recorded above)
        if answer != "S":
            raise ConnectionError(f"unexpected answer to SSLRequest: {answer!r}")
        transport = await loop.start_tls(
            server.transport, server, self.analyzer.server_tls, server_side=False,
            server_hostname=None, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        server.transport = transport
        server.tls = True
        self.event(ANALYZER, "TLSHandshake", _tls_fields(SERVER, transport))
        ssl_object = transport.get_extra_info("ssl_object")
        server_certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self.strip_scram_plus = server_certificate != self.analyzer.own_certificate
        if self.strip_scram_plus:
            server.auth_scan = bytearray()

    def _refuse_client(self, text: str) -> None:
        """The target cannot be reached: tell a client waiting for its login, then close."""
        error = protocol.error_response("FATAL", "08006", text)
        if self.client.mode == ClientSide.RELAY:
            self.client.transport.write(error)
            self.event(SERVER, "ErrorResponse",
                       {"severity": "FATAL", "code": "08006", "message": text, "origin": ANALYZER},
                       len(error) - 1)
        self.close("server connection failed")

    def close(self, reason: str, closed_by: str = ANALYZER) -> None:
        if not self.ended:
            self.ended = True
            self.event(ANALYZER, "SessionEnd", {
                "closed_by": closed_by, "reason": reason,
                "bytes_from_client": self.bytes[CLIENT], "bytes_from_server": self.bytes[SERVER]})
        self.analyzer.sessions.discard(self)
        self.client.mode = ClientSide.CLOSED
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        self.client.close()
        if self.server is not None:
            self.server.close()


def _tls_fields(side: str, transport) -> dict[str, Any]:
    obj = transport.get_extra_info("ssl_object")
    fields: dict[str, Any] = {"side": side}
    if obj is not None:
        fields["version"] = obj.version()
        cipher = obj.cipher()
        if cipher:
            fields["cipher"] = cipher[0]
    return fields


class _Side(asyncio.Protocol):
    """Common part of the two connections: pausing for back-pressure, closing."""

    def __init__(self, session: Session):
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._pauses: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and self.transport is not None and not self.closed:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()  # sends what is buffered first


class ClientSide(_Side):
    """The client's connection: startup packets handled here, then relay + framing."""

    STARTUP = "startup"
    TLS = "tls"
    RELAY = "relay"
    OPAQUE = "opaque"
    CLOSED = "closed"

    def __init__(self, session: Session):
        super().__init__(session)
        self.mode = self.STARTUP
        self.buf = bytearray()
        self.framer = Framer(session.client_message, self._framing_error)
        self.first = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            peer_text = f"{peer[0]}:{peer[1]}"
        else:
            peer_text = str(peer or "unix")
        self.session.event(ANALYZER, "SessionStart", {"client": peer_text})

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.session.close(str(exc) if exc else "client closed the connection", CLIENT)

    def pause_writing(self) -> None:
        if self.session.server is not None:
            self.session.server.pause("backpressure")

    def resume_writing(self) -> None:
        if self.session.server is not None:
            self.session.server.resume("backpressure")

    def _framing_error(self, msg_type: int, length: int) -> None:
        self.session.framing_error(CLIENT, msg_type, length)

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.bytes[CLIENT] += len(data)
        session._now = time.time()
        if self.mode == self.RELAY:
            session.to_server(data)
            self.framer.feed(data)
        elif self.mode == self.OPAQUE:
            session.to_server(data)
        elif self.mode == self.CLOSED:
            return
        else:
            # Startup packets, or (mode TLS) bytes decrypted before start_tls returned.
            self.buf += data
            if self.mode == self.STARTUP:
                self._startup()

    def _startup(self) -> None:
        session = self.session
        buf = self.buf
        while self.mode == self.STARTUP and len(buf) >= 4:
            if self.first and buf[0] == TLS_RECORD_HANDSHAKE:
                session.event(ANALYZER, "DirectTLS", {
                    "note": "the client starts TLS without SSLRequest: relayed, not decoded"})
                self._opaque()
                return
            length = int.from_bytes(buf[:4], "big")
            if length < 8 or length > STARTUP_MAX:
                session.event(ANALYZER, "FramingError", {
                    "direction": CLIENT, "length": length,
                    "note": "invalid startup packet: relayed, not decoded"})
                self._opaque()
                return
            if len(buf) < length:
                return
            self.first = False
            packet = bytes(buf[:length])
            del buf[:length]
            code = int.from_bytes(packet[4:8], "big")
            if code == protocol.SSL_REQUEST_CODE:
                self._ssl_request(length)
            elif code == protocol.GSSENC_REQUEST_CODE:
                session.message(CLIENT, 0, length, packet[4:], {"forwarded": False})
                self.transport.write(b"N")
                session.event(SERVER, "GSSENCResponse", {"answer": "N", "origin": ANALYZER})
            elif code == protocol.CANCEL_REQUEST_CODE:
                session.message(CLIENT, 0, length, packet[4:])
                session.to_server(packet)
                self._opaque()
            else:
                session.message(CLIENT, 0, length, packet[4:])
                session.to_server(packet)
                if code >> 16 != 3:
                    self._opaque()  # not protocol 3: relayed, the server will answer
                    return
                self.mode = self.RELAY
                rest = bytes(buf)
                buf.clear()
                if rest:
                    session.to_server(rest)
                    self.framer.feed(rest)

    def _opaque(self) -> None:
        self.mode = self.OPAQUE
        rest = bytes(self.buf)
        self.buf.clear()
        if rest:
            self.session.to_server(rest)

    def _ssl_request(self, length: int) -> None:
        session = self.session
        context = session.analyzer.client_tls
        if context is None:
            session.message(CLIENT, 0, length, SSL_REQUEST[4:], {"forwarded": False})
            self.transport.write(b"N")
            session.event(SERVER, "SSLResponse", {"answer": "N", "origin": ANALYZER})
            return
        session.message(CLIENT, 0, length, SSL_REQUEST[4:], {"forwarded": False})
        if self.buf:
            # Bytes after SSLRequest would be read as if they had come over TLS (CVE-2021-23214).
            session.event(ANALYZER, "ProtocolViolation", {
                "note": "unencrypted data after SSLRequest"})
            session.close("unencrypted data after SSLRequest")
            return
        self.mode = self.TLS
        self.transport.pause_reading()
        self.transport.write(b"S")
        session.event(SERVER, "SSLResponse", {"answer": "S", "origin": ANALYZER})
        session.client_tls = True
        asyncio.get_running_loop().create_task(self._start_tls(context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        session = self.session
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                             ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001  (the handshake failed: session over)
            if not session.ended:
                session.event(ANALYZER, "TLSHandshakeFailed",
                              {"side": CLIENT, "error": str(exc) or type(exc).__name__})
                session.close("TLS handshake with the client failed")
            return
        if self.closed or session.ended:
            transport.close()
            return
        self.transport = transport
        session.event(ANALYZER, "TLSHandshake", _tls_fields(CLIENT, transport))
        self.mode = self.STARTUP
        self._startup()


class ServerSide(_Side):
    """The server's connection: relay + framing, after an optional SSLRequest answer."""

    def __init__(self, session: Session):
        super().__init__(session)
        self.ready = False
        self.tls = False
        self.answer: asyncio.Future | None = None
        self.early: list[bytes] = []  # bytes the server sent before the session was set up
        self.framer = Framer(session.server_message, self._framing_error)
        # While not None: the login's messages are held until whole, to remove
        # SCRAM-SHA-256-PLUS from AuthenticationSASL (see Session.strip_scram_plus).
        self.auth_scan: bytearray | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("server closed the connection"))
        if self.ready:
            self.session.close(str(exc) if exc else "server closed the connection", SERVER)

    def pause_writing(self) -> None:
        self.session.client.pause("backpressure")

    def resume_writing(self) -> None:
        self.session.client.resume("backpressure")

    def _framing_error(self, msg_type: int, length: int) -> None:
        self.session.framing_error(SERVER, msg_type, length)

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.bytes[SERVER] += len(data)
        session._now = time.time()
        answer = self.answer
        if answer is not None and not answer.done():
            if len(data) != 1:
                # 'S'/'N' is one byte; anything else (ErrorResponse, stuffed bytes) ends it.
                answer.set_exception(ConnectionError(
                    f"unexpected answer to SSLRequest: {bytes(data[:16])!r}"))
            else:
                answer.set_result(chr(data[0]))
            return
        if not self.ready:
            if sum(map(len, self.early)) > PENDING_MAX:
                session.close("server sent too much before the session was set up", SERVER)
                return
            self.early.append(bytes(data))
            return
        self.relay(data)

    def relay(self, data: bytes) -> None:
        session = self.session
        client = session.client
        out = data if self.auth_scan is None else self._scan_login(data)
        if out and not client.closed:
            client.transport.write(out)
        self.framer.feed(data)  # the record shows what the server sent

    def _scan_login(self, data: bytes) -> bytes:
        """Whole login messages, AuthenticationSASL without PLUS; scanning ends at the
        first Authentication or ErrorResponse (or anything unexpected)."""
        buf = self.auth_scan
        buf += data
        out = bytearray()
        done = False
        while len(buf) >= 5:
            length = int.from_bytes(buf[1:5], "big")
            if length < 4 or length > AUTH_SCAN_MAX:
                done = True  # not a login message we can handle: pass it on untouched
                break
            if len(buf) < 1 + length:
                break
            message = bytes(buf[:1 + length])
            del buf[:1 + length]
            if message[0] == protocol.AUTHENTICATION:
                message = self._without_scram_plus(message)
                done = True
            elif message[0] != protocol.NEGOTIATE_PROTOCOL_VERSION:
                done = True
            out += message
            if done:
                break
        if done or len(buf) > AUTH_SCAN_MAX:
            out += buf
            self.auth_scan = None
        return bytes(out)

    def _without_scram_plus(self, message: bytes) -> bytes:
        code = int.from_bytes(message[5:9], "big") if len(message) >= 9 else -1
        if code != protocol.AUTH_SASL:
            return message
        mechanisms = [name for name in message[9:].split(b"\0") if name]
        kept = [name for name in mechanisms if name != SCRAM_PLUS.encode()]
        if len(kept) == len(mechanisms):
            return message
        sent = [name.decode("utf-8", "replace") for name in kept]
        self.session.scram_plus_stripped = sent
        return protocol.auth_sasl(sent)


# --- command line -------------------------------------------------------------------------


def parse_address(text: str, *, default_host: str | None = "127.0.0.1") -> tuple[str | None, int]:
    """HOST:PORT, [IPv6]:PORT or PORT; a host of '*' or '' means all interfaces (None)."""
    text = text.strip()
    if text.isdigit():
        host: str | None = default_host
        port_text = text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host in ("*", ""):
            host = None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid port in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgmulti analyze",
        description="Relay PostgreSQL sessions to a server and print every message of both "
                    "directions decoded (secrets redacted). Traffic is forwarded unchanged, "
                    "with one exception when TLS is terminated (see --tls-cert).")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to accept clients on ('*:PORT' for all interfaces)")
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the PostgreSQL server (HOST:PORT, or a Unix socket file path)")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines (one object per message) instead of aligned text")
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="terminate TLS: answer the client's SSLRequest with 'S' and use this "
                             "certificate (PEM); the server leg then asks the target for TLS. "
                             "If the target's certificate is another one, SCRAM channel "
                             "binding cannot work: SCRAM-SHA-256-PLUS is removed from the "
                             "mechanisms sent to the client (a Rewrite line says so) and "
                             "libpq clients need channel_binding=disable. With the server's "
                             "own certificate and key nothing is rewritten and binding works")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="private key for --tls-cert (default: in the certificate file)")
    parser.add_argument("--target-ca", metavar="FILE",
                        help="verify the target's certificate against this CA (verify-ca); "
                             "without it the target's certificate is not checked")
    parser.add_argument("--target-sslmode", choices=("disable", "prefer", "require"),
                        default="prefer",
                        help="server leg of a TLS client session: prefer (TLS if the target "
                             "has it, the default), require, or disable (plain: PostgreSQL "
                             "then offers no SCRAM-SHA-256-PLUS and clients keep their "
                             "default channel_binding=prefer)")
    return parser


def settings_from_args(argv: list[str]) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        listen_host, listen_port = parse_address(args.listen)
        if "/" in args.target:
            target_host, target_port = args.target, 0
        else:
            host, target_port = parse_address(args.target)
            target_host = host or "127.0.0.1"
    except ValueError as exc:
        parser.error(str(exc))
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    if args.target_ca and not args.tls_cert:
        parser.error("--target-ca needs --tls-cert (the server leg uses TLS when the client's does)")
    if args.target_sslmode != "prefer" and not args.tls_cert:
        parser.error("--target-sslmode needs --tls-cert (without it the server leg is plain)")
    return Settings(listen_host=listen_host, listen_port=listen_port, target_host=target_host,
                    target_port=target_port, json_lines=args.json, output=args.output,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, target_ca=args.target_ca,
                    target_sslmode=args.target_sslmode)


async def serve(settings: Settings, output: Output,
                tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> None:
    """Run until SIGINT/SIGTERM (or cancellation)."""
    loop = asyncio.get_running_loop()
    analyzer = Analyzer(settings, output, tls)
    server = await loop.create_server(analyzer.new_client, settings.listen_host,
                                      settings.listen_port, reuse_address=True)
    where = ", ".join(_sockname(sock) for sock in server.sockets)
    target = (settings.target_host if not settings.target_port
              else f"{settings.target_host}:{settings.target_port}")
    print(f"pgmulti analyze: listening on {where}, relaying to {target}", file=sys.stderr,
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await stop.wait()
    finally:
        server.close()
        analyzer.close_all()
        await asyncio.sleep(0)
        output.flush()


def _sockname(sock) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(name)


def main(argv: list[str]) -> int:
    settings = settings_from_args(argv)
    try:
        tls = make_tls_contexts(settings)
    except (OSError, ssl.SSLError) as exc:
        print(f"pgmulti analyze: cannot load TLS files: {exc}", file=sys.stderr)
        return 1
    if settings.output:
        try:
            stream: BinaryIO = open(settings.output, "wb")  # noqa: SIM115  (closed below)
        except OSError as exc:
            print(f"pgmulti analyze: cannot open {settings.output}: {exc}", file=sys.stderr)
            return 1
    else:
        stream = sys.stdout.buffer
    output = Output(stream, settings.json_lines)
    import uvloop

    try:
        uvloop.run(serve(settings, output, tls))
    except OSError as exc:
        print(f"pgmulti analyze: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        output.flush()
        if settings.output:
            stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
