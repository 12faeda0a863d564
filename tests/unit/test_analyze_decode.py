"""Unit tests for pgmulti.analyze: message decoders, redaction, truncation, framing, output."""

from __future__ import annotations

import io
import json
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmulti import protocol
from pgmulti.analyze import (
    CLIENT,
    PREFIX_MAX,
    SERVER,
    VALUE_MAX,
    Analyzer,
    DecodeContext,
    Framer,
    Output,
    Record,
    ServerSide,
    Session,
    Settings,
    decode,
    format_text,
    parse_address,
    settings_from_args,
    type_name,
)

SECRET = "s3cr3t-P4ss"


# --- builders for what pgmulti.protocol has no builder for ---------------------------------


def be16(value: int) -> bytes:
    return struct.pack("!h", value)


def be32(value: int) -> bytes:
    return struct.pack("!i", value)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def body(msg: bytes) -> bytes:
    """The body of a typed message built by pgmulti.protocol (after type and length)."""
    assert struct.unpack("!I", msg[1:5])[0] == len(msg) - 1
    return msg[5:]


def startup_body(packet: bytes) -> bytes:
    """An untyped startup packet's body: from the request code on."""
    return packet[4:]


def client(t: str, data: bytes, **kwargs) -> dict:
    return decode("client", t, data, **kwargs)


def server(t: str, data: bytes, **kwargs) -> dict:
    return decode("server", t, data, **kwargs)


def bind(portal="", statement="", formats=(), values=(), results=()) -> bytes:
    out = cstr(portal) + cstr(statement) + be16(len(formats))
    out += b"".join(be16(code) for code in formats)
    out += be16(len(values))
    for value in values:
        out += be32(-1) if value is None else be32(len(value)) + value
    out += be16(len(results)) + b"".join(be16(code) for code in results)
    return out


def row_description_body(columns) -> bytes:
    """[(name, type_oid, format)]"""
    out = be16(len(columns))
    for name, oid, fmt in columns:
        out += cstr(name) + be32(16384) + be16(1) + be32(oid) + be16(-1) + be32(-1) + be16(fmt)
    return out


def data_row_body(values) -> bytes:
    return body(protocol.data_row(list(values)))


def assert_no_secret(decoded: dict, *secrets: str) -> None:
    text = json.dumps(decoded)
    for secret in secrets:
        assert secret not in text


# --- startup packets ---------------------------------------------------------------------


def test_startup_message_version_and_parameters():
    packet = protocol.startup_message({"user": "alice", "database": "app",
                                       "application_name": "psql"})
    out = client(0, startup_body(packet))
    assert out == {"type": "StartupMessage", "fields": {
        "protocol": "3.0",
        "params": {"user": "alice", "database": "app", "application_name": "psql"}}}


def test_startup_message_newer_minor_version():
    packet = protocol.startup_message({"user": "u", "_pq_.x": "1"}, version=(3 << 16) | 2)
    fields = client("", startup_body(packet))["fields"]
    assert fields["protocol"] == "3.2"
    assert fields["params"] == {"user": "u", "_pq_.x": "1"}


def test_startup_message_old_protocol_shown_as_hex():
    out = client(0, be32(2 << 16) + b"anything")
    assert out["type"] == "StartupMessage"
    assert out["fields"]["protocol"] == "2.0"
    assert "hex" in out["fields"]


def test_ssl_and_gssenc_requests():
    assert client(0, be32(protocol.SSL_REQUEST_CODE)) == {"type": "SSLRequest", "fields": {}}
    assert client(0, be32(protocol.GSSENC_REQUEST_CODE)) == {"type": "GSSENCRequest",
                                                             "fields": {}}


def test_cancel_request_redacts_key():
    packet = protocol.cancel_request(4242, 0x12345678)
    out = client(0, startup_body(packet))
    assert out["type"] == "CancelRequest"
    assert out["fields"]["pid"] == 4242
    assert "redacted" in out["fields"]["key"]
    assert_no_secret(out, str(0x12345678), "12345678")


def test_startup_without_terminator_is_malformed_without_hex():
    out = client(0, be32(3 << 16) + cstr("user") + b"alice")
    assert out["type"] == "StartupMessage"
    assert "malformed" in out["fields"]
    assert "hex" not in out["fields"]


# --- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("code, name", [
    (0, "AuthenticationOk"), (2, "AuthenticationKerberosV5"),
    (3, "AuthenticationCleartextPassword"), (7, "AuthenticationGSS"), (9, "AuthenticationSSPI"),
])
def test_authentication_simple(code, name):
    out = server("R", body(protocol.authentication(code)))
    assert out == {"type": name, "fields": {}}


def test_authentication_md5_salt_present_not_shown():
    salt = b"\xab\xcd\xef\x01"
    out = server("R", body(protocol.authentication(protocol.AUTH_MD5, salt)))
    assert out["type"] == "AuthenticationMD5Password"
    assert out["fields"]["salt"] == "<redacted> (4 bytes)"
    assert_no_secret(out, "abcdef01")


def test_authentication_sasl_mechanisms():
    out = server("R", body(protocol.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])))
    assert out["type"] == "AuthenticationSASL"
    assert out["fields"]["mechanisms"] == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_authentication_sasl_continue_and_final_attribute_names_only():
    nonce = "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    salt = "QSXCR+Q6sek8bf92"
    first = f"r={nonce},s={salt},i=4096".encode()
    out = server("R", body(protocol.authentication(protocol.AUTH_SASL_CONTINUE, first)))
    assert out["type"] == "AuthenticationSASLContinue"
    assert out["fields"]["attributes"] == ["r", "s", "i"]
    assert out["fields"]["data"] == f"<redacted> ({len(first)} bytes)"
    assert_no_secret(out, nonce, salt, "4096")
    signature = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    out = server("R", body(protocol.authentication(protocol.AUTH_SASL_FINAL,
                                                   f"v={signature}".encode())))
    assert out["type"] == "AuthenticationSASLFinal"
    assert out["fields"]["attributes"] == ["v"]
    assert_no_secret(out, signature)


def test_authentication_gss_continue_and_unknown_code():
    out = server("R", body(protocol.authentication(8, b"token-bytes")))
    assert out["type"] == "AuthenticationGSSContinue"
    assert_no_secret(out, "token")
    out = server("R", body(protocol.authentication(99, b"whatever")))
    assert out["type"] == "Authentication"
    assert out["fields"]["code"] == 99
    assert_no_secret(out, "whatever")


def test_password_message_redacted_with_and_without_context():
    for ctx in (None, DecodeContext(auth_code=protocol.AUTH_CLEARTEXT),
                DecodeContext(auth_code=protocol.AUTH_MD5)):
        out = client("p", body(protocol.password_message(cstr(SECRET))), context=ctx)
        assert out["type"] == "PasswordMessage"
        assert out["fields"] == {"password": f"<redacted> ({len(SECRET) + 1} bytes)"}
        assert_no_secret(out, SECRET)


def test_sasl_initial_response_mechanism_and_attribute_names():
    nonce = "rOprNGfwEbeRWgbNEkqO"
    data = f"n,,n=,r={nonce}".encode()
    ctx = DecodeContext(auth_code=protocol.AUTH_SASL)
    out = client("p", body(protocol.sasl_initial_response("SCRAM-SHA-256", data)), context=ctx)
    assert out["type"] == "SASLInitialResponse"
    fields = out["fields"]
    assert fields["mechanism"] == "SCRAM-SHA-256"
    assert fields["channel_binding"] == "n"
    assert fields["attributes"] == ["n", "r"]
    assert fields["data"] == f"<redacted> ({len(data)} bytes)"
    assert_no_secret(out, nonce)


def test_sasl_initial_response_channel_binding_type_is_shown():
    data = b"p=tls-server-end-point,,n=,r=abc"
    ctx = DecodeContext(auth_code=protocol.AUTH_SASL)
    out = client("p", body(protocol.sasl_initial_response("SCRAM-SHA-256-PLUS", data)),
                 context=ctx)
    assert out["fields"]["channel_binding"] == "p=tls-server-end-point"


def test_sasl_response_attribute_names_only():
    proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    data = f"c=biws,r=nonce123,p={proof}".encode()
    ctx = DecodeContext(auth_code=protocol.AUTH_SASL_CONTINUE)
    out = client("p", body(protocol.password_message(data)), context=ctx)
    assert out["type"] == "SASLResponse"
    assert out["fields"]["attributes"] == ["c", "r", "p"]
    assert_no_secret(out, proof, "nonce123", "biws")


def test_gss_response_redacted():
    ctx = DecodeContext(auth_code=8)
    out = client("p", body(protocol.password_message(b"kerberos-token")), context=ctx)
    assert out["type"] == "GSSResponse"
    assert_no_secret(out, "kerberos")


def test_malformed_secret_messages_show_no_hex():
    ctx = DecodeContext(auth_code=protocol.AUTH_SASL)
    out = client("p", cstr("SCRAM-SHA-256") + be32(100) + SECRET.encode(), context=ctx)
    assert "malformed" in out["fields"]
    assert_no_secret(out, SECRET, SECRET.encode().hex())
    out = server("R", be32(protocol.AUTH_SASL) + b"SCRAM" + SECRET.encode())
    assert "malformed" in out["fields"]
    assert_no_secret(out, SECRET, SECRET.encode().hex())


# --- frontend messages -------------------------------------------------------------------


def test_query():
    out = client("Q", body(protocol.query("select 1 as one")))
    assert out == {"type": "Query", "fields": {"query": "select 1 as one"}}


def test_query_long_text_is_cut_with_size():
    sql = "select " + "x" * 20000
    out = client("Q", body(protocol.query(sql)))
    assert out["fields"]["query"].startswith("select xxx")
    assert out["fields"]["query"].endswith(f"… [{len(sql)} bytes]")
    assert len(out["fields"]["query"]) < 9000


def test_parse_statement_query_and_parameter_types():
    data = cstr("stmt1") + cstr("select $1, $2, $3") + be16(3) + be32(23) + be32(0) + be32(999999)
    out = client("P", data)
    assert out == {"type": "Parse", "fields": {
        "statement": "stmt1", "query": "select $1, $2, $3",
        "param_types": ["int4", "unspecified", "999999"]}}


def test_bind_formats_values_and_result_formats():
    data = bind("p1", "s1", formats=(0, 1, 0), values=(b"hello", b"\x00\x00\x00\x2a", None),
                results=(1,))
    out = client("B", data)
    assert out["type"] == "Bind"
    assert out["fields"] == {
        "portal": "p1", "statement": "s1", "param_formats": ["text", "binary", "text"],
        "params": ["hello", "\\x0000002a", None], "result_formats": ["binary"]}


def test_bind_single_format_applies_to_all_and_no_format_means_text():
    out = client("B", bind(formats=(1,), values=(b"\x01", b"\x02")))
    assert out["fields"]["params"] == ["\\x01", "\\x02"]
    out = client("B", bind(values=(b"\x01abc", b"plain")))
    # Declared text: shown as text (escaped), never hex.
    assert out["fields"]["params"][1] == "plain"
    assert out["fields"]["param_formats"] == []


def test_bind_values_truncated():
    value = "v" * 1000
    out = client("B", bind(values=(value.encode(),)))
    shown = out["fields"]["params"][0]
    assert shown.startswith("v" * VALUE_MAX + "…")
    assert shown.endswith("[1000 bytes]")
    blob = bytes(range(256)) * 4
    out = client("B", bind(formats=(1,), values=(blob,)))
    shown = out["fields"]["params"][0]
    assert shown.startswith("\\x000102")
    assert shown.endswith("… [1024 bytes]")
    assert len(shown) < 100


def test_describe_execute_close():
    assert client("D", b"S" + cstr("stmt")) == {
        "type": "Describe", "fields": {"kind": "statement", "name": "stmt"}}
    assert client("D", b"P" + cstr("")) == {
        "type": "Describe", "fields": {"kind": "portal", "name": ""}}
    assert client("E", cstr("portal") + be32(100)) == {
        "type": "Execute", "fields": {"portal": "portal", "max_rows": 100}}
    assert client("C", b"S" + cstr("stmt")) == {
        "type": "Close", "fields": {"kind": "statement", "name": "stmt"}}


@pytest.mark.parametrize("t, name", [("S", "Sync"), ("H", "Flush"), ("X", "Terminate"),
                                     ("c", "CopyDone")])
def test_frontend_messages_without_fields(t, name):
    assert client(t, b"") == {"type": name, "fields": {}}


def test_copy_data_size_only_both_directions():
    assert client("d", b"1\tone\n") == {"type": "CopyData", "fields": {"size": 6}}
    # The framer keeps no CopyData bytes: only the size is known, and that is not a cut.
    assert server("d", b"", total=5_000_000) == {"type": "CopyData",
                                                 "fields": {"size": 5_000_000}}


def test_copy_fail():
    assert client("f", cstr("client gave up")) == {
        "type": "CopyFail", "fields": {"message": "client gave up"}}


def test_function_call():
    data = be32(1598) + be16(1) + be16(0) + be16(2) + be32(3) + b"abc" + be32(-1) + be16(1)
    assert client("F", data) == {"type": "FunctionCall", "fields": {
        "function_oid": 1598, "arg_formats": ["text"], "args": ["abc", None],
        "result_format": "binary"}}


# --- backend messages --------------------------------------------------------------------


def test_parameter_status_and_backend_key_data():
    assert server("S", body(protocol.parameter_status("client_encoding", "UTF8"))) == {
        "type": "ParameterStatus", "fields": {"name": "client_encoding", "value": "UTF8"}}
    out = server("K", body(protocol.backend_key_data(31337, 0x7EADBEEF)))
    assert out["type"] == "BackendKeyData"
    assert out["fields"]["pid"] == 31337
    assert out["fields"]["key"] == "<redacted> (4 bytes)"
    assert_no_secret(out, str(0x7EADBEEF))


def test_backend_key_data_long_key_protocol_3_2():
    out = server("K", be32(7) + bytes(32))
    assert out["fields"] == {"pid": 7, "key": "<redacted> (32 bytes)"}


@pytest.mark.parametrize("status, text", [("I", "idle"), ("T", "in transaction"),
                                          ("E", "failed")])
def test_ready_for_query(status, text):
    assert server("Z", body(protocol.ready_for_query(status))) == {
        "type": "ReadyForQuery", "fields": {"status": text}}


def test_row_description_type_names():
    columns = [("b", 16, 0), ("i2", 21, 0), ("i4", 23, 0), ("i8", 20, 0), ("t", 25, 0),
               ("v", 1043, 0), ("f4", 700, 0), ("f8", 701, 0), ("n", 1700, 0),
               ("ts", 1114, 0), ("tz", 1184, 0), ("d", 1082, 0), ("u", 2950, 0),
               ("j", 114, 0), ("jb", 3802, 0), ("by", 17, 1), ("o", 26, 0), ("nm", 19, 0),
               ("c", 18, 0), ("mine", 424242, 0)]
    out = server("T", row_description_body(columns))
    assert out["type"] == "RowDescription"
    got = [(c["name"], c["type"], c["format"]) for c in out["fields"]["columns"]]
    assert got == [
        ("b", "bool", "text"), ("i2", "int2", "text"), ("i4", "int4", "text"),
        ("i8", "int8", "text"), ("t", "text", "text"), ("v", "varchar", "text"),
        ("f4", "float4", "text"), ("f8", "float8", "text"), ("n", "numeric", "text"),
        ("ts", "timestamp", "text"), ("tz", "timestamptz", "text"), ("d", "date", "text"),
        ("u", "uuid", "text"), ("j", "json", "text"), ("jb", "jsonb", "text"),
        ("by", "bytea", "binary"), ("o", "oid", "text"), ("nm", "name", "text"),
        ("c", "char", "text"), ("mine", "424242", "text")]
    first = out["fields"]["columns"][0]
    assert first == {"name": "b", "type": "bool", "type_oid": 16, "table_oid": 16384,
                     "column": 1, "size": -1, "typmod": -1, "format": "text"}


def test_row_description_from_protocol_builder():
    out = server("T", body(protocol.row_description([("one", protocol.INT4_OID)])))
    assert [(c["name"], c["type"]) for c in out["fields"]["columns"]] == [("one", "int4")]


def test_type_name_table():
    assert type_name(23) == "int4"
    assert type_name(1184) == "timestamptz"
    assert type_name(123456) == "123456"


def test_data_row_text_and_null():
    out = server("D", data_row_body(["1", None, "héllo"]))
    assert out == {"type": "DataRow", "fields": {"values": ["1", None, "héllo"]}}


def test_data_row_values_truncated():
    out = server("D", data_row_body(["y" * 500]))
    value = out["fields"]["values"][0]
    assert value == "y" * VALUE_MAX + "… [500 bytes]"


def test_data_row_binary_formats_from_context():
    ctx = DecodeContext(row_formats=[1, 0])
    out = server("D", data_row_body([b"\x00\x00\x00\x01", b"text"]), context=ctx)
    assert out["fields"]["values"] == ["\\x00000001", "text"]


def test_data_row_unknown_format_guesses():
    # No RowDescription seen: printable UTF-8 is text, anything else hex.
    out = server("D", data_row_body([b"\x00\x01\xff", b"line one\nline two"]))
    assert out["fields"]["values"] == ["\\x0001ff", "line one\nline two"]


def test_data_row_prefix_of_a_huge_value():
    size = 50 * 1024 * 1024
    full_body = be16(1) + be32(size)
    prefix = full_body + b"z" * (PREFIX_MAX - len(full_body))
    out = server("D", prefix, total=len(full_body) + size)
    assert out["fields"]["values"] == ["z" * VALUE_MAX + f"… [{size} bytes]"]
    assert out["fields"]["truncated"] is True


def test_data_row_prefix_cut_between_values():
    full = data_row_body(["a" * 100, "b" * 100, "c"])
    out = server("D", full[:150], total=len(full))
    values = out["fields"]["values"]
    assert values[0].startswith("aaa")
    assert len(values) == 2 and values[1].startswith("bbb") and values[1].endswith("[100 bytes]")
    assert out["fields"]["truncated"] is True


def test_command_complete():
    assert server("C", body(protocol.command_complete("SELECT 1"))) == {
        "type": "CommandComplete", "fields": {"tag": "SELECT 1"}}


def test_error_response_fields_by_name():
    msg = (b"SERROR\0VERROR\0C22012\0Mdivision by zero\0Dsome detail\0Hsome hint\0P8\0"
           b"Wsome context\0sschema\0ttable\0ccolumn\0dtype\0nconstraint\0Fint.c\0L821\0"
           b"Rint4div\0Zodd\0\0")
    out = server("E", msg)
    assert out["type"] == "ErrorResponse"
    assert out["fields"] == {
        "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "22012",
        "message": "division by zero", "detail": "some detail", "hint": "some hint",
        "position": 8, "where": "some context", "schema": "schema", "table": "table",
        "column": "column", "data_type": "type", "constraint": "constraint", "file": "int.c",
        "line": 821, "routine": "int4div", "field_Z": "odd"}


def test_error_and_notice_from_protocol_builder():
    out = server("E", body(protocol.error_response("FATAL", "28P01", "auth failed", hint="h")))
    assert out["fields"]["code"] == "28P01"
    assert out["fields"]["hint"] == "h"
    out = server("N", body(protocol.error_response("NOTICE", "00000", "hi", notice=True)))
    assert out["type"] == "NoticeResponse"
    assert out["fields"]["severity"] == "NOTICE"
    assert out["fields"]["message"] == "hi"


def test_notification_response():
    out = server("A", be32(77) + cstr("chan") + cstr("payload"))
    assert out == {"type": "NotificationResponse",
                   "fields": {"pid": 77, "channel": "chan", "payload": "payload"}}
    out = server("A", be32(77) + cstr("chan") + cstr("p" * 200))
    assert out["fields"]["payload"].endswith("… [200 bytes]")


@pytest.mark.parametrize("t, name", [("G", "CopyInResponse"), ("H", "CopyOutResponse"),
                                     ("W", "CopyBothResponse")])
def test_copy_responses(t, name):
    out = server(t, b"\0" + be16(2) + be16(0) + be16(0))
    assert out == {"type": name, "fields": {"format": "text", "column_formats": ["text", "text"]}}
    out = server(t, b"\1" + be16(1) + be16(1))
    assert out["fields"] == {"format": "binary", "column_formats": ["binary"]}


def test_copy_done_server():
    assert server("c", b"") == {"type": "CopyDone", "fields": {}}


def test_negotiate_protocol_version():
    msg = protocol.negotiate_protocol_version(0, ["_pq_.foo", "_pq_.bar"])
    assert server("v", body(msg)) == {"type": "NegotiateProtocolVersion", "fields": {
        "newest_minor": 0, "unsupported": ["_pq_.foo", "_pq_.bar"]}}


@pytest.mark.parametrize("t, name", [
    ("I", "EmptyQueryResponse"), ("n", "NoData"), ("s", "PortalSuspended"),
    ("1", "ParseComplete"), ("2", "BindComplete"), ("3", "CloseComplete"),
])
def test_backend_messages_without_fields(t, name):
    assert server(t, b"") == {"type": name, "fields": {}}


def test_empty_query_response_from_builder():
    assert server("I", body(protocol.empty_query_response()))["type"] == "EmptyQueryResponse"


def test_parameter_description():
    assert server("t", be16(3) + be32(23) + be32(25) + be32(55555)) == {
        "type": "ParameterDescription", "fields": {"param_types": ["int4", "text", "55555"]}}


def test_function_call_response():
    assert server("V", be32(2) + b"42") == {
        "type": "FunctionCallResponse", "fields": {"value": "42"}}
    assert server("V", be32(-1)) == {"type": "FunctionCallResponse", "fields": {"value": None}}


# --- unknown and malformed ---------------------------------------------------------------


def test_unknown_types_shown_as_hex():
    assert client("?", b"\x01\x02\xff") == {"type": "Unknown",
                                             "fields": {"byte": "?", "hex": "0102ff"}}
    out = server(0x01, b"x" * 100)
    assert out["type"] == "Unknown"
    assert out["fields"]["byte"] == "0x01"
    assert out["fields"]["hex"].endswith("… [100 bytes]")


def test_malformed_message_shows_reason_and_hex():
    out = server("Z", b"")
    assert out["fields"]["malformed"] == "message ends early"
    assert out["fields"]["hex"] == ""
    out = client("Q", b"no terminator")
    assert out["fields"]["malformed"] == "missing string terminator"


def test_bytes_like_bodies_accepted():
    data = body(protocol.query("select 1"))
    assert client(ord("Q"), memoryview(data))["fields"]["query"] == "select 1"
    assert client("Q", bytearray(data))["fields"]["query"] == "select 1"


# --- context -------------------------------------------------------------------------------


def observe(ctx: DecodeContext, direction: str, msg: bytes) -> dict:
    out = decode(direction, msg[0], msg[5:], context=ctx)
    ctx.observe(direction, out)
    return out


def test_context_tells_password_kinds_apart():
    ctx = DecodeContext()
    observe(ctx, "server", protocol.auth_sasl(["SCRAM-SHA-256"]))
    msg = protocol.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert observe(ctx, "client", msg)["type"] == "SASLInitialResponse"
    observe(ctx, "server", protocol.authentication(protocol.AUTH_SASL_CONTINUE, b"r=abcdef,s=c2FsdA==,i=4096"))
    assert observe(ctx, "client", protocol.password_message(b"c=biws,r=abcdef,p=cHJvb2Y="))["type"] == "SASLResponse"


def test_context_result_formats_from_bind_override_statement_describe():
    ctx = DecodeContext()
    # Statement Describe: RowDescription says text; the Bind then asks for binary results.
    observe(ctx, "server", b"T" + be32(4 + len(row_description_body([("n", 23, 0)])))
            + row_description_body([("n", 23, 0)]))
    bind_body = bind(results=(1,))
    observe(ctx, "client", b"B" + be32(4 + len(bind_body)) + bind_body)
    observe(ctx, "server", b"2" + be32(4))
    out = observe(ctx, "server", protocol.data_row([b"\x00\x00\x00\x07"]))
    assert out["fields"]["values"] == ["\\x00000007"]
    # A simple query's RowDescription is exact again.
    observe(ctx, "server", protocol.row_description([("t", 25)]))
    assert observe(ctx, "server", protocol.data_row(["abc"]))["fields"]["values"] == ["abc"]


# --- framer ----------------------------------------------------------------------------------


def frame_all(stream: bytes, chunks, *, typed=True, prefix_max=PREFIX_MAX):
    got = []
    framer = Framer(lambda t, n, b: got.append((t, n, b)), typed=typed, prefix_max=prefix_max)
    pos = 0
    for size in chunks:
        framer.feed(stream[pos:pos + size])
        pos += size
    framer.feed(stream[pos:])
    return got


STREAM = (protocol.authentication(0) + protocol.parameter_status("a", "b")
          + protocol.ready_for_query("I") + protocol.row_description([("one", 23)])
          + protocol.data_row(["1"]) + protocol.command_complete("SELECT 1")
          + b"d" + be32(4 + 3) + b"xyz" + b"I" + be32(4))
EXPECTED = [(ord("R"), 8, be32(0)), (ord("S"), 8, b"a\0b\0"), (ord("Z"), 5, b"I"),
            (ord("T"), len(protocol.row_description([("one", 23)])) - 1,
             body(protocol.row_description([("one", 23)]))),
            (ord("D"), 11, body(protocol.data_row(["1"]))),
            (ord("C"), 13, b"SELECT 1\0"), (ord("d"), 7, b""), (ord("I"), 4, b"")]


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_framer_split_at_every_byte(split):
    assert frame_all(STREAM, [split]) == EXPECTED


def test_framer_byte_by_byte():
    assert frame_all(STREAM, [1] * len(STREAM)) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.tuples(st.sampled_from(b"DTZCQdEN"), st.binary(max_size=300)),
                    max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
    prefix_max=st.integers(min_value=0, max_value=64),
)
def test_framer_any_fragmentation(bodies, cuts, prefix_max):
    stream = b"".join(bytes([t]) + be32(len(b) + 4) + b for t, b in bodies)
    expected = [(t, len(b) + 4, b"" if t == ord("d") else b[:prefix_max]) for t, b in bodies]
    got = []
    framer = Framer(lambda *m: got.append(m), prefix_max=prefix_max)
    pos = 0
    for cut in sorted(set(cuts)):
        framer.feed(stream[pos:cut])
        pos = max(pos, cut)
    framer.feed(stream[pos:])
    assert got == expected


def test_framer_keeps_only_a_prefix_of_big_messages():
    size = 5 * 1024 * 1024
    msg = b"D" + be32(4 + 6 + size) + be16(1) + be32(size) + b"q" * size
    got = frame_all(msg + protocol.ready_for_query("I"), [1000, 70000] + [65536] * 100)
    assert len(got) == 2
    msg_type, length, kept = got[0]
    assert (msg_type, length) == (ord("D"), 4 + 6 + size)
    assert len(kept) == PREFIX_MAX
    assert got[1] == (ord("Z"), 5, b"I")


def test_framer_small_prefix_limit():
    got = frame_all(protocol.query("select 123456"), [3], prefix_max=4)
    assert got == [(ord("Q"), 4 + 14, b"sele")]
    out = decode("client", got[0][0], got[0][2], total=got[0][1] - 4)
    assert out["fields"]["query"] == "sele… [13 bytes]"


def test_framer_startup_packets():
    stream = (protocol.startup_message({"user": "u"}) + protocol.cancel_request(1, 2))
    got = frame_all(stream, [5], typed=False)
    assert [(t, n) for t, n, _ in got] == [(0, len(protocol.startup_message({"user": "u"}))),
                                           (0, 16)]


def test_framer_invalid_length_stops_decoding():
    errors = []
    got = []
    framer = Framer(lambda *m: got.append(m), lambda t, n: errors.append((t, n)))
    framer.feed(protocol.ready_for_query("I") + b"Q" + be32(2) + protocol.query("x"))
    assert got == [(ord("Z"), 5, b"I")]
    assert errors == [(ord("Q"), 2)]
    framer.feed(protocol.query("later"))
    assert len(got) == 1 and framer.broken


# --- output ----------------------------------------------------------------------------------


def record(**kwargs) -> Record:
    base = dict(time="2024-05-01T12:34:56.123456Z", session=3, direction="client",
                type="Query", length=20, fields={"query": "select 1 as one"})
    base.update(kwargs)
    return Record(**base)


def test_text_lines_are_aligned():
    lines = [
        format_text(record()),
        format_text(record(direction="server", type="ReadyForQuery", length=5,
                           fields={"status": "in transaction"})),
        format_text(record(session=12, direction="server", type="RowDescription", length=28,
                           fields={"columns": [{"name": "one", "type": "int4",
                                                "format": "text"}]})),
        format_text(record(direction="analyzer", type="SessionStart", length=None,
                           fields={"client": "127.0.0.1:5000"})),
    ]
    assert lines[0] == ("12:34:56.123456  #3    C→S  Query                       len=20      "
                        "query='select 1 as one'")
    assert lines[1].endswith("status='in transaction'")
    assert "S→C  ReadyForQuery" in lines[1]
    assert "#12" in lines[2] and lines[2].endswith("columns=[one:int4]")
    assert "---  SessionStart" in lines[3]
    starts = {line.index("len=") for line in lines[:3]}
    assert len(starts) == 1
    assert lines[3][lines[0].index("len="):].lstrip().startswith("client=")


def test_text_escapes_and_truncates():
    line = format_text(record(fields={"query": "select 'a'\nfrom t" + " " * 1000 + "x"}))
    assert "\n" not in line
    assert "\"select 'a'\\nfrom t" in line
    assert line.endswith('…"')
    assert len(line) < 1000
    line = format_text(record(type="DataRow", fields={"values": ["1", None, "NULL"]}))
    assert line.endswith("values=['1', NULL, 'NULL']")


def test_record_json_encoding():
    data = msgspec.json.encode(record(fields={"params": ["x", None], "n": 1}))
    assert json.loads(data) == {
        "time": "2024-05-01T12:34:56.123456Z", "session": 3, "direction": "client",
        "type": "Query", "length": 20, "fields": {"params": ["x", None], "n": 1}}


# --- command line ----------------------------------------------------------------------------


def test_parse_address():
    assert parse_address("127.0.0.1:6543") == ("127.0.0.1", 6543)
    assert parse_address("[::1]:5432") == ("::1", 5432)
    assert parse_address("*:5432") == (None, 5432)
    assert parse_address("5432") == ("127.0.0.1", 5432)
    for bad in ("localhost", "host:0", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_settings_from_args():
    s = settings_from_args(["--listen", "127.0.0.1:7000", "--target", "db:5432", "--json",
                            "--output", "out.jsonl"])
    assert (s.listen_host, s.listen_port, s.target_host, s.target_port) == (
        "127.0.0.1", 7000, "db", 5432)
    assert s.json_lines and s.output == "out.jsonl" and s.tls_cert is None
    s = settings_from_args(["--listen", "7000", "--target", "/run/pg/.s.PGSQL.5432"])
    assert (s.target_host, s.target_port) == ("/run/pg/.s.PGSQL.5432", 0)
    assert s.target_sslmode == "prefer"
    s = settings_from_args(["--listen", "7000", "--target", "h:1", "--tls-cert", "c.pem",
                            "--target-sslmode", "disable"])
    assert (s.tls_cert, s.target_sslmode) == ("c.pem", "disable")


@pytest.mark.parametrize("argv", [
    [], ["--listen", "1:2"], ["--listen", "nope", "--target", "h:1"],
    ["--listen", "1", "--target", "h:1", "--tls-key", "k"],
    ["--listen", "1", "--target", "h:1", "--target-ca", "ca"],
    ["--listen", "1", "--target", "h:1", "--target-sslmode", "disable"],
    ["--listen", "1", "--target", "h:1", "--tls-cert", "c", "--target-sslmode", "allow"],
])
def test_settings_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        settings_from_args(argv)
    assert exc.value.code == 2


# --- a scripted session, decoded end to end ---------------------------------------------------


class _Transport:
    def __init__(self):
        self.written = bytearray()

    def write(self, data) -> None:
        self.written += data


def new_session() -> tuple[Session, io.BytesIO]:
    stream = io.BytesIO()
    analyzer = Analyzer(Settings(listen_host=None, listen_port=1, target_host="h",
                                 target_port=2, json_lines=True), Output(stream, True))
    session = Session(analyzer, 7)
    session.client.transport = _Transport()
    return session, stream


def recorded(stream: io.BytesIO) -> list[tuple[str, str, int | None, dict]]:
    return [(r["direction"], r["type"], r["length"], r["fields"])
            for r in map(json.loads, stream.getvalue().decode().splitlines())]


def typed(t: str, payload: bytes) -> bytes:
    return t.encode() + be32(4 + len(payload)) + payload


def startup_packet(params: dict[str, str]) -> bytes:
    payload = be32(3 << 16) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return be32(4 + len(payload)) + payload


def test_scripted_session_decodes_to_the_expected_messages():
    """Both directions of a whole session, fed in awkward pieces, read back as records."""
    session, stream = new_session()
    client_stream = [
        startup_packet({"user": "alice", "database": "shop", "application_name": "script"}),
        protocol.sasl_initial_response("SCRAM-SHA-256", f"n,,n=,r=nonce{SECRET}".encode()),
        protocol.password_message(f"c=biws,r=nonce{SECRET}xyz,p=proof{SECRET}".encode()),
        protocol.query("select id, name from items"),
        typed("P", cstr("s1") + cstr("select $1::int4, $2::bytea") + be16(2) + be32(23)
              + be32(17)),
        typed("B", bind("", "s1", (0, 1), (b"42", b"\x00\x01" * 40), (1, 0))),
        typed("E", cstr("") + be32(0)),
        typed("S", b""),
        protocol.query("copy items from stdin"),
        typed("d", b"1\tone\n"), typed("d", b"2\ttwo\n3\tthree\n"), typed("c", b""),
        typed("X", b""),
    ]
    server_stream = [
        protocol.auth_sasl(["SCRAM-SHA-256"]),
        protocol.authentication(protocol.AUTH_SASL_CONTINUE,
                                f"r=nonce{SECRET}xyz,s=c2FsdA==,i=4096".encode()),
        protocol.authentication(protocol.AUTH_SASL_FINAL, f"v=sig{SECRET}".encode()),
        protocol.authentication(protocol.AUTH_OK),
        protocol.parameter_status("server_version", "15.8"),
        protocol.backend_key_data(4242, 99),
        protocol.ready_for_query("I"),
        protocol.row_description([("id", 23), ("name", 25)]),
        protocol.data_row(["1", None]),
        protocol.command_complete("SELECT 1"),
        protocol.ready_for_query("I"),
        typed("1", b""), typed("2", b""),
        protocol.data_row([b"\x00\x00\x00\x2a", b"x" * 100]),
        protocol.command_complete("SELECT 1"),
        protocol.ready_for_query("T"),
        typed("G", b"\x00" + be16(2) + be16(0) + be16(0)),
        protocol.error_response("ERROR", "22P02", "invalid input syntax for type integer",
                                "detail here", "hint here"),
        protocol.ready_for_query("E"),
    ]
    client_framer = Framer(session.client_message)
    server_framer = Framer(session.server_message)
    # The startup packet as ClientSide hands it over, then the rest in 3-byte pieces.
    first = client_stream[0]
    session.message(CLIENT, 0, len(first), first[4:])
    order = [(SERVER, 0, 1), (CLIENT, 1, 2), (SERVER, 1, 2), (CLIENT, 2, 3), (SERVER, 2, 7),
             (CLIENT, 3, 4), (SERVER, 7, 11), (CLIENT, 4, 8), (SERVER, 11, 16), (CLIENT, 8, 9),
             (SERVER, 16, 17), (CLIENT, 9, 12), (SERVER, 17, 19), (CLIENT, 12, 13)]
    for direction, start, end in order:
        data = b"".join((client_stream if direction == CLIENT else server_stream)[start:end])
        framer = client_framer if direction == CLIENT else server_framer
        for pos in range(0, len(data), 3):
            framer.feed(data[pos:pos + 3])
    got = recorded(stream)
    assert SECRET not in stream.getvalue().decode()
    expected = [
        ("client", "StartupMessage", 58, {"protocol": "3.0", "params": {
            "user": "alice", "database": "shop", "application_name": "script"}}),
        ("server", "AuthenticationSASL", 23, {"mechanisms": ["SCRAM-SHA-256"]}),
        ("client", "SASLInitialResponse", 46, {
            "mechanism": "SCRAM-SHA-256", "channel_binding": "n", "authzid": "none",
            "attributes": ["n", "r"], "data": "<redacted> (24 bytes)"}),
        ("server", "AuthenticationSASLContinue", 47, {
            "attributes": ["r", "s", "i"], "data": "<redacted> (39 bytes)"}),
        ("client", "SASLResponse", 51, {"attributes": ["c", "r", "p"],
                                        "data": "<redacted> (47 bytes)"}),
        ("server", "AuthenticationSASLFinal", 24, {"attributes": ["v"],
                                                   "data": "<redacted> (16 bytes)"}),
        ("server", "AuthenticationOk", 8, {}),
        ("server", "ParameterStatus", 24, {"name": "server_version", "value": "15.8"}),
        ("server", "BackendKeyData", 12, {"pid": 4242, "key": "<redacted> (4 bytes)"}),
        ("server", "ReadyForQuery", 5, {"status": "idle"}),
        ("client", "Query", 31, {"query": "select id, name from items"}),
        ("server", "RowDescription", 50, {"columns": [
            {"name": "id", "type": "int4", "type_oid": 23, "table_oid": 0, "column": 0,
             "size": -1, "typmod": -1, "format": "text"},
            {"name": "name", "type": "text", "type_oid": 25, "table_oid": 0, "column": 0,
             "size": -1, "typmod": -1, "format": "text"}]}),
        ("server", "DataRow", 15, {"values": ["1", None]}),
        ("server", "CommandComplete", 13, {"tag": "SELECT 1"}),
        ("server", "ReadyForQuery", 5, {"status": "idle"}),
        ("client", "Parse", 44, {"statement": "s1", "query": "select $1::int4, $2::bytea",
                                 "param_types": ["int4", "bytea"]}),
        ("client", "Bind", 112, {"portal": "", "statement": "s1",
                                 "param_formats": ["text", "binary"],
                                 "params": ["42", "\\x" + "0001" * 16 + "… [80 bytes]"],
                                 "result_formats": ["binary", "text"]}),
        ("client", "Execute", 9, {"portal": "", "max_rows": 0}),
        ("client", "Sync", 4, {}),
        ("server", "ParseComplete", 4, {}),
        ("server", "BindComplete", 4, {}),
        # Bind asked for a binary first column: shown as hex, the text one as text.
        ("server", "DataRow", 118, {"values": ["\\x0000002a", "x" * 64 + "… [100 bytes]"]}),
        ("server", "CommandComplete", 13, {"tag": "SELECT 1"}),
        ("server", "ReadyForQuery", 5, {"status": "in transaction"}),
        ("client", "Query", 26, {"query": "copy items from stdin"}),
        ("server", "CopyInResponse", 11, {"format": "text", "column_formats": ["text", "text"]}),
        ("client", "CopyData", 10, {"size": 6}),
        ("client", "CopyData", 18, {"size": 14}),
        ("client", "CopyDone", 4, {"data_messages": 2, "data_bytes": 20}),
        ("server", "ErrorResponse", 89, {
            "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "22P02",
            "message": "invalid input syntax for type integer", "detail": "detail here",
            "hint": "hint here"}),
        ("server", "ReadyForQuery", 5, {"status": "failed"}),
        ("client", "Terminate", 4, {}),
    ]
    assert got == expected


def _strip_session(split: int | None):
    session, stream = new_session()
    session.strip_scram_plus = True
    server = ServerSide(session)
    server.auth_scan = bytearray()
    login = (typed("v", be32(0) + be32(0))
             + protocol.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
             + protocol.authentication(protocol.AUTH_SASL_CONTINUE, b"r=x,s=c2FsdA==,i=1")
             + protocol.ready_for_query("I"))
    pieces = [login] if split is None else [login[:split], login[split:]]
    for piece in pieces:
        server.relay(piece)
    return session, server, stream, login


@pytest.mark.parametrize("split", range(0, 72, 1))
def test_scram_plus_removed_from_what_the_client_receives(split):
    session, server, stream, login = _strip_session(split)
    plus = protocol.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert bytes(session.client.transport.written) == login.replace(
        plus, protocol.auth_sasl(["SCRAM-SHA-256"]))
    assert server.auth_scan is None  # the rest of the session passes untouched
    got = recorded(stream)
    assert [t for _, t, _, _ in got] == [
        "NegotiateProtocolVersion", "AuthenticationSASL", "Rewrite",
        "AuthenticationSASLContinue", "ReadyForQuery"][:len(got)]
    assert got[1][3] == {"mechanisms": ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]}
    assert got[2][3]["removed"] == "SCRAM-SHA-256-PLUS"
    assert got[2][3]["sent_to_client"] == ["SCRAM-SHA-256"]


def test_login_without_scram_plus_is_passed_unchanged():
    session, stream = new_session()
    server = ServerSide(session)
    server.auth_scan = bytearray()
    login = protocol.authentication(protocol.AUTH_MD5, b"salt") + protocol.ready_for_query("I")
    server.relay(login)
    assert bytes(session.client.transport.written) == login
    assert server.auth_scan is None
    assert "Rewrite" not in [t for _, t, _, _ in recorded(stream)]


def test_oversized_login_message_stops_the_scan_and_passes_through():
    session, stream = new_session()
    server = ServerSide(session)
    server.auth_scan = bytearray()
    big = typed("N", b"x" * 10000)
    server.relay(big[:100])
    server.relay(big[100:])
    assert bytes(session.client.transport.written) == big
    assert server.auth_scan is None
