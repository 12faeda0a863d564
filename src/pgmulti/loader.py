"""Read ``pgbouncer.ini`` files the way PgBouncer 1.25 does.

File syntax (PgBouncer's ``lib/usual/cfparser.c``):

* ``[section]`` headers; the sections are ``pgbouncer`` (required), ``databases``,
  ``users`` and ``peers``.  Section names and keys are case-sensitive.
* ``key = value`` lines.  The value is the rest of the line with surrounding
  whitespace removed; quotes in ``[pgbouncer]`` values are kept literally.
* A key is made of ``A-Z a-z 0-9 _ . - *``, or is quoted: ``'any name'`` as PgBouncer's
  parser accepts, or in double quotes with a doubled quote standing for one (SQL
  identifier quoting, as its docs describe).
* Lines whose first non-blank character is ``;`` or ``#`` are comments; those characters
  are not special later in a line.
* ``%include path`` reads another file in place; a relative path is taken relative to
  the current working directory (as PgBouncer documents), nesting is limited to 10.
* A repeated ``[pgbouncer]`` header resets the settings read so far to their defaults,
  as PgBouncer does; the loader warns when that discards a setting.

``[databases]``, ``[users]`` and ``[peers]`` values are connection strings:
``key=value`` pairs separated by spaces, where a value may be single-quoted with ``''``
standing for a quote.  As in PgBouncer, backslashes are ordinary characters and empty
values are rejected.

Values are converted like PgBouncer's ``cf_set_*`` functions: integers accept C
``strtol`` base-0 syntax (``0x1F``, ``0777``), times are non-negative decimal seconds,
enumerations are case-insensitive.  Switches also accept yes/no, on/off and true/false.
In connection strings numbers must be decimal (PgBouncer uses ``atoi`` there).
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Callable, Iterator, NamedTuple

import msgspec

from pgmulti.config import UNSUPPORTED_KEYS, Config, Database, Peer, Pgbouncer, User

__all__ = ["ConfigError", "load_config", "parse_config_text"]

MAX_INCLUDE_DEPTH = 10
"""How deep ``%include`` may nest (PgBouncer's MAX_INCLUDE)."""

RESERVED_DATABASE = "pgbouncer"
"""Database name reserved for the admin console."""

_SECTIONS = ("pgbouncer", "databases", "users", "peers")

# C isspace(): Python's str.strip() would also strip Unicode spaces.
_WS = " \t\n\v\f\r"
_BLANK = " \t"

_UNQUOTED_KEY = re.compile(r"[A-Za-z0-9_.*-]*")
_C_INT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_DECIMAL_INT = re.compile(r"[+-]?[0-9]+")
_SECONDS = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

_TRUE_WORDS = frozenset({"yes", "on", "true"})
_FALSE_WORDS = frozenset({"no", "off", "false"})

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_UNSIGNED_KEYS = frozenset({"max_packet_size"})

# Keys whose PgBouncer default is NULL: a repeated [pgbouncer] header keeps them.
_KEPT_BY_SECTION_RESET = frozenset(
    {
        "auth_dbname",
        "auth_file",
        "auth_ident_file",
        "auth_ldap_options",
        "auth_user",
        "client_tls13_ciphers",
        "conffile",
        "server_tls13_ciphers",
        "user",
        "verbose",
    }
)

# Keys that name the same setting; setting one sets all of them.
_ALIASES = {"service_name": ("service_name", "job_name"), "job_name": ("service_name", "job_name")}


class ConfigError(Exception):
    """A configuration file cannot be loaded; the message starts with ``file:line:``."""


class _Where(NamedTuple):
    """A position in a configuration file."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class _Section(NamedTuple):
    """A ``[name]`` header."""

    name: str
    where: _Where


class _Entry(NamedTuple):
    """A ``key = value`` line."""

    key: str
    value: str
    where: _Where


class _BadValue(Exception):
    """A value cannot be converted; the loader adds file, line and key."""


# --------------------------------------------------------------------------- public API


def load_config(path: str) -> Config:
    """Load the configuration file at ``path``.

    Raises :class:`ConfigError` when the file (or a file it includes) cannot be read
    or is invalid.
    """
    return parse_config_text(_read_text(path, where=None), path)


def parse_config_text(text: str, path: str = "<string>") -> Config:
    """Parse configuration ``text`` as if read from ``path``.

    ``path`` is used in messages and as the default ``conffile``; ``%include`` paths
    are still resolved against the current working directory.
    """
    builder = _Builder(path)
    for item in _scan(text, path, depth=0):
        builder.add(item)
    return builder.finish()


# --------------------------------------------------------------------------- INI scanning


def _read_text(path: str, where: _Where | None) -> str:
    """Read a UTF-8 file; ``where`` is the ``%include`` line that asked for it, if any."""
    prefix = f"{where}: %include: " if where else ""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{prefix}cannot read {path!r}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None


def _scan(text: str, file: str, depth: int) -> Iterator[_Section | _Entry]:
    """Yield the sections and entries of ``text``, expanding ``%include`` in place."""
    for number, line in enumerate(text.split("\n"), start=1):
        where = _Where(file, number)
        rest = line.lstrip(_WS)
        while rest:
            if rest.startswith("%include") and rest[8:9] in (" ", "\t"):
                yield from _include(rest[8:].strip(_WS), where, depth)
                break
            if rest[0] in "#;":
                break
            if rest[0] == "[":
                end = rest.find("]")
                if end < 0:
                    raise ConfigError(f"{where}: syntax error: missing ']' in section header")
                yield _Section(rest[1:end], where)
                # PgBouncer keeps reading after ']' (normally only a comment follows).
                rest = rest[end + 1 :].lstrip(_WS)
                continue
            yield _parse_entry(rest, where)
            break


def _include(target: str, where: _Where, depth: int) -> Iterator[_Section | _Entry]:
    """Yield the contents of an included file."""
    if depth + 1 > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{where}: %include: nesting deeper than {MAX_INCLUDE_DEPTH} levels")
    if not target:
        raise ConfigError(f"{where}: %include: missing file name")
    yield from _scan(_read_text(target, where), target, depth + 1)


def _parse_entry(text: str, where: _Where) -> _Entry:
    """Parse ``key = value`` (leading whitespace already removed)."""
    if text[0] == "'":
        end = text.find("'", 1)
        if end <= 1:
            raise ConfigError(f"{where}: syntax error: bad quoted name")
        key, rest = text[1:end], text[end + 1 :]
    elif text[0] == '"':
        key, rest = _parse_identifier(text, where)
    else:
        match = _UNQUOTED_KEY.match(text)
        assert match is not None  # the pattern matches the empty string
        key, rest = match.group(), text[match.end() :]
    rest = rest.lstrip(_BLANK)
    if not rest.startswith("="):
        # Name only: the rest of the line may hold a password.
        raise ConfigError(f"{where}: syntax error: expected 'name = value' after {key[:40]!r}")
    if not key:
        raise ConfigError(f"{where}: syntax error: missing name before '='")
    return _Entry(key, rest[1:].strip(_WS), where)


def _parse_identifier(text: str, where: _Where) -> tuple[str, str]:
    """Parse a double-quoted name (``""`` is a quote); return it and the text after it."""
    chars: list[str] = []
    i = 1
    while True:
        end = text.find('"', i)
        if end < 0:
            raise ConfigError(f"{where}: syntax error: unterminated quoted name")
        chars.append(text[i:end])
        if text.startswith('""', end):
            chars.append('"')
            i = end + 2
        else:
            key = "".join(chars)
            if not key:
                raise ConfigError(f"{where}: syntax error: empty quoted name")
            return key, text[end + 1 :]


# --------------------------------------------------------------------------- connection strings


def _split_connstr(text: str) -> list[tuple[str, str]]:
    """Split ``k1=v1 k2='v 2'`` into pairs like PgBouncer's ``cstr_get_pair``.

    Only spaces separate pairs; a quoted value ends at a single ``'`` (``''`` is a
    literal quote).  Raises :class:`_BadValue` on syntax errors and empty values.
    """
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and text[i] not in "= ":
            i += 1
        key = text[start:i]
        while i < n and text[i] == " ":
            i += 1
        if i >= n or text[i] != "=":
            raise _BadValue(f"syntax error in connection string: expected '=' after {key!r}")
        if not key:
            raise _BadValue("syntax error in connection string: missing name before '='")
        i += 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "'":
            value, i = _unquote_value(text, i + 1, key)
        else:
            start = i
            while i < n and text[i] != " ":
                i += 1
            value = text[start:i]
        if not value:
            raise _BadValue(f"syntax error in connection string: empty value for {key!r}")
        pairs.append((key, value))


def _unquote_value(text: str, i: int, key: str) -> tuple[str, int]:
    """Read a single-quoted value starting after the opening quote."""
    chars: list[str] = []
    while True:
        end = text.find("'", i)
        if end < 0:
            raise _BadValue(f"syntax error in connection string: unterminated quote in {key!r}")
        chars.append(text[i:end])
        if text.startswith("''", end):
            chars.append("'")
            i = end + 2
            continue
        i = end + 1
        if i < len(text) and text[i] != " ":
            raise _BadValue(
                f"syntax error in connection string: expected a space after the quoted {key!r}"
            )
        return "".join(chars), i


# --------------------------------------------------------------------------- value conversion


def _parse_c_int(text: str, bounds: tuple[int, int]) -> int:
    """An integer in C ``strtol(..., 0)`` syntax: decimal, ``0x`` hex or ``0`` octal."""
    body = text.lstrip(_WS)
    if not _C_INT.fullmatch(body):
        raise _BadValue(f"invalid integer {text!r}")
    sign = -1 if body[0] == "-" else 1
    digits = body.lstrip("+-")
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits[1:], 8)
    else:
        value = int(digits)
    return _check_bounds(sign * value, bounds, text)


def _parse_decimal_int(text: str, bounds: tuple[int, int] = _INT32) -> int:
    """A decimal integer (connection-string numbers)."""
    if not _DECIMAL_INT.fullmatch(text):
        raise _BadValue(f"invalid integer {text!r}")
    return _check_bounds(int(text), bounds, text)


def _check_bounds(value: int, bounds: tuple[int, int], text: str) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise _BadValue(f"integer {text!r} out of range {low}..{high}")
    return value


def _parse_bool(text: str) -> bool:
    """A switch: any integer (non-zero is on) or yes/no, on/off, true/false."""
    word = text.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    try:
        return _parse_c_int(text, (-(2**63), 2**63 - 1)) != 0
    except _BadValue:
        raise _BadValue(
            f"invalid boolean {text!r} (use 0/1, yes/no, on/off, true/false)"
        ) from None


def _parse_seconds(text: str) -> float:
    """A non-negative decimal number of seconds."""
    body = text.lstrip(_WS)
    if not _SECONDS.fullmatch(body):
        raise _BadValue(f"invalid time {text!r} (expected seconds)")
    value = float(body)
    if value < 0:
        raise _BadValue(f"invalid time {text!r} (must not be negative)")
    return value


def _lookup(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A converter for an enumeration: case-insensitive, returns the canonical spelling."""

    def convert(text: str) -> str:
        word = text.lower()
        if word in choices:
            return word
        raise _BadValue(f"invalid value {text!r}, expected one of: {', '.join(choices)}")

    return convert


def _identity(text: str) -> str:
    return text


def _converter(annotation: Any, *, c_syntax: bool, unsigned: bool = False) -> Callable[[str], Any]:
    """The string converter for a Struct field of type ``annotation``.

    ``c_syntax`` selects ``strtol`` base-0 integers ([pgbouncer]) over decimal ones
    (connection strings).
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # "X | None" -> X
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return _lookup(typing.get_args(annotation))
    bounds = _UINT32 if unsigned else _INT32
    if annotation is bool:
        return _parse_bool
    if annotation is int:
        if c_syntax:
            return lambda text: _parse_c_int(text, bounds)
        return lambda text: _parse_decimal_int(text, bounds)
    if annotation is float:
        return _parse_seconds
    if annotation is str:
        return _identity
    raise TypeError(f"no converter for {annotation!r}")  # a new field type needs one


def _converters(
    struct: type[msgspec.Struct], *, c_syntax: bool, skip: tuple[str, ...] = ()
) -> dict[str, Callable[[str], Any]]:
    """Field name -> converter for every field of ``struct`` except ``skip``."""
    return {
        field.name: _converter(
            field.type, c_syntax=c_syntax, unsigned=field.name in _UNSIGNED_KEYS
        )
        for field in msgspec.structs.fields(struct)
        if field.name not in skip
    }


_GLOBAL_CONVERTERS = _converters(Pgbouncer, c_syntax=True)
_DATABASE_CONVERTERS = _converters(Database, c_syntax=False, skip=("name",))
_DATABASE_ALIASES = {"reserve_pool": "reserve_pool_size"}  # the pre-1.24 name
_USER_CONVERTERS = _converters(User, c_syntax=False, skip=("name",))
_PEER_CONVERTERS = _converters(Peer, c_syntax=False, skip=("peer_id",))


def _convert_connstr(
    connstr: str,
    converters: dict[str, Callable[[str], Any]],
    what: str,
    aliases: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Parse a connection string into converted values by (canonical) parameter name."""
    values: dict[str, Any] = {}
    for key, raw in _split_connstr(connstr):
        name = aliases.get(key, key) if aliases else key
        convert = converters.get(name)
        if convert is None:
            raise _BadValue(f"unknown {what} parameter {key!r}")
        try:
            values[name] = convert(raw)
        except _BadValue as e:
            raise _BadValue(f"{key}: {e}") from None
    return values


# --------------------------------------------------------------------------- building a Config


class _Builder:
    """Collects sections and entries, in file order, into a :class:`Config`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.section: str | None = None
        self.seen_main = False
        self.settings: dict[str, tuple[Any, _Where]] = {}
        self.keys_used: set[str] = set()
        self.databases: dict[str, Database] = {}
        self.users: dict[str, User] = {}
        self.peers: dict[int, Peer] = {}
        self.defined_at: dict[tuple[str, Any], _Where] = {}
        self.warnings: list[str] = []

    # --- dispatch ---

    def add(self, item: _Section | _Entry) -> None:
        if isinstance(item, _Section):
            self._start_section(item)
            return
        if self.section is None:
            raise ConfigError(f"{item.where}: {item.key}: setting outside of any section")
        handler = getattr(self, f"_add_{self.section}")
        try:
            handler(item)
        except _BadValue as e:
            raise ConfigError(f"{item.where}: {item.key}: {e}") from None

    def _start_section(self, section: _Section) -> None:
        if section.name not in _SECTIONS:
            raise ConfigError(
                f"{section.where}: unknown section [{section.name}] "
                f"(expected one of: {', '.join(_SECTIONS)})"
            )
        self.section = section.name
        if section.name == "pgbouncer":
            if self.seen_main:
                self._reset_settings(section.where)
            self.seen_main = True

    def _reset_settings(self, where: _Where) -> None:
        """A repeated [pgbouncer] header: PgBouncer refills the defaults."""
        dropped = sorted(key for key in self.settings if key not in _KEPT_BY_SECTION_RESET)
        for key in dropped:
            del self.settings[key]
        if dropped:
            self.warnings.append(
                f"{where}: repeated [pgbouncer] section resets earlier settings to their "
                f"defaults (as PgBouncer does): {', '.join(dropped)}"
            )

    # --- sections ---

    def _add_pgbouncer(self, entry: _Entry) -> None:
        convert = _GLOBAL_CONVERTERS.get(entry.key)
        if convert is None:
            raise _BadValue("unknown parameter")
        value = convert(entry.value)
        if entry.key == "auth_dbname" and value == RESERVED_DATABASE:
            raise _BadValue(f"the reserved database {RESERVED_DATABASE!r} cannot be used")
        self.keys_used.add(entry.key)
        for key in _ALIASES.get(entry.key, (entry.key,)):
            self.settings[key] = (value, entry.where)

    def _add_databases(self, entry: _Entry) -> None:
        name = entry.key
        if name == RESERVED_DATABASE:
            raise _BadValue(f"database name {name!r} is reserved for the admin console")
        values = _convert_connstr(
            entry.value, _DATABASE_CONVERTERS, "connection", _DATABASE_ALIASES
        )
        if values.get("port") == 0:
            raise _BadValue("port: invalid port 0")
        self._store(self.databases, "database", name, entry.where, Database, name=name, **values)

    def _add_users(self, entry: _Entry) -> None:
        values = _convert_connstr(entry.value, _USER_CONVERTERS, "user")
        self._store(self.users, "user", entry.key, entry.where, User, name=entry.key, **values)

    def _add_peers(self, entry: _Entry) -> None:
        try:
            peer_id = _parse_decimal_int(entry.key, (1, 65535))
        except _BadValue:
            raise _BadValue("peer id must be a number from 1 to 65535") from None
        values = _convert_connstr(entry.value, _PEER_CONVERTERS, "peer")
        if "host" not in values:
            raise _BadValue("host is required")
        if values.get("port") == 0:
            raise _BadValue("port: invalid port 0")
        self._store(self.peers, "peer", peer_id, entry.where, Peer, peer_id=peer_id, **values)

    def _store(
        self,
        table: dict[Any, Any],
        what: str,
        key: Any,
        where: _Where,
        struct: type[msgspec.Struct],
        **values: Any,
    ) -> None:
        """Convert ``values`` into ``struct`` and store it; a later entry replaces an earlier."""
        if key in table:
            self.warnings.append(
                f"{where}: {key}: {what} already defined at {self.defined_at[what, key]}; "
                "this definition replaces it"
            )
        try:
            table[key] = msgspec.convert(values, struct)
        except msgspec.ValidationError as e:
            raise _BadValue(str(e)) from None
        self.defined_at[what, key] = where

    # --- result ---

    def finish(self) -> Config:
        if not self.seen_main:
            raise ConfigError(f"{self.path}: missing [pgbouncer] section")
        values = {key: value for key, (value, _) in self.settings.items()}
        values.setdefault("conffile", self.path)
        try:
            pgbouncer = msgspec.convert(values, Pgbouncer)
        except msgspec.ValidationError as e:  # the converters should have caught it already
            raise ConfigError(f"{self.path}: {e}") from None
        unsupported = self.keys_used & UNSUPPORTED_KEYS
        if self.peers:
            unsupported.add("[peers]")
        return Config(
            pgbouncer=pgbouncer,
            databases=self.databases,
            users=self.users,
            peers=self.peers,
            path=self.path,
            unsupported=tuple(sorted(unsupported)),
            warnings=tuple(self.warnings),
        )
