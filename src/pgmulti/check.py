"""``pgmulti --check CONFIG``: validate a configuration without starting the pooler.

Loads the file the way a start does (``%include`` files too), then what the start would
load next: the ``auth_file`` (only its user count is shown, never its contents) and the TLS
certificates and keys.  Problems go to stderr, one a line, located with ``file:line`` where
the file has one:

* ``error:`` a problem that stops pgmulti from starting (or leaves it unusable: an
  unreadable ``auth_file``).  The loader stops at the first error in the file itself, so
  only that one is reported; the other checks need a loaded file.
* ``warning:`` settings pgmulti accepts but ignores (``UNSUPPORTED_KEYS``), repeated
  entries, a ``syslog`` that cannot be reached, and the like.

On stdout: every ``[pgbouncer]`` setting whose effective value differs from its default, as
``key = value``, then the ``[databases]``, ``[users]`` and ``[peers]`` entries as
connection strings with ``password`` masked.  Exit status 0 when there was no error, else 1.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import msgspec

from . import auth, loader, logs
from .config import Config, Database, Peer, Pgbouncer, User

__all__ = ["run"]

MASK = "***"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.*-]+")
_PLAIN_VALUE = re.compile(r"[^\s']+")
_SECRET_DB_FIELDS = frozenset({"password"})
_LOCATED = re.compile(r"(.*?:\d+): (.*)", re.DOTALL)


class _Collector(logging.Handler):
    """Keeps what pgmulti's modules log while checking (e.g. TLS warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check the configuration at ``path``; print the report; return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = loader.load_config(path)
    except (loader.ConfigError, OSError) as exc:
        message = str(exc)
        located = _LOCATED.match(message)  # "file:line: problem" -> "file:line: error: problem"
        if located:
            message = f"{located.group(1)}: error: {located.group(2)}"
        else:
            message = f"error: {message}"
        print(message, file=err)
        print(f"{path}: configuration has errors", file=out)
        return 1

    collector = _Collector()
    pgmulti_log = logging.getLogger("pgmulti")
    saved_propagate = pgmulti_log.propagate
    pgmulti_log.addHandler(collector)
    pgmulti_log.propagate = False
    try:
        errors, warnings, notes = _problems(config, _locations(path))
    finally:
        pgmulti_log.removeHandler(collector)
        pgmulti_log.propagate = saved_propagate
    warnings += [f"{path}: warning: {record.getMessage()}" for record in collector.records]

    for line in errors + warnings:
        print(line, file=err)
    for line in notes:
        print(line, file=out)
    _print_settings(config, out)
    print(file=out)
    if errors:
        print(f"{path}: configuration has {_count(len(errors), 'error')}", file=out)
        return 1
    suffix = f" ({_count(len(warnings), 'warning')})" if warnings else ""
    print(f"{path}: configuration OK{suffix}", file=out)
    return 0


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- checks


def _locations(path: str) -> dict[str, str]:
    """``file:line`` of the last assignment of each [pgbouncer] key, and of ``[peers]``.

    A second, location-only pass over the already validated file(s); best effort.
    """
    where: dict[str, str] = {}
    try:
        section = None
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
        for item in loader._scan(text, path, depth=0):
            if isinstance(item, loader._Section):
                section = item.name
                if section == "peers":
                    where.setdefault("[peers]", str(item.where))
            elif section == "pgbouncer":
                where[item.key] = str(item.where)
    except Exception:  # the locations only decorate messages
        return where
    return where


def _problems(config: Config, where: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(errors, warnings, notes) for a loaded configuration."""
    from .app import SUPPORTED_AUTH_TYPES
    from .tls import TlsConfigError, TlsContexts

    cfg = config.pgbouncer
    errors: list[str] = []
    warnings: list[str] = list(f"{w.replace(': ', ': warning: ', 1)}" for w in config.warnings)
    notes: list[str] = []

    def at(key: str) -> str:
        return where.get(key, config.path)

    for key in config.unsupported:
        what = "entries" if key == "[peers]" else "setting"
        warnings.append(f"{at(key)}: warning: {key}: {what} not supported by pgmulti (ignored)")

    if cfg.auth_type not in SUPPORTED_AUTH_TYPES:
        errors.append(f"{at('auth_type')}: error: auth_type = {cfg.auth_type} is not supported "
                      f"by pgmulti yet (supported: {', '.join(SUPPORTED_AUTH_TYPES)})")

    if cfg.auth_file:
        try:
            users = auth.load_userlist(cfg.auth_file)
        except auth.AuthFileError as exc:  # "path:line: problem", never the line's text
            errors.append(f"{exc.path}:{exc.line}: error: auth_file: {exc.problem}")
        except OSError as exc:
            errors.append(f"{at('auth_file')}: error: auth_file {cfg.auth_file}: "
                          f"{exc.strerror or exc}")
        else:
            notes.append(f"auth_file {cfg.auth_file}: {_count(len(users), 'user')}")
    elif cfg.auth_type not in ("any", "trust") and not _has_auth_user(config):
        warnings.append(f"{at('auth_type')}: warning: auth_type = {cfg.auth_type} without "
                        "auth_file or auth_user: no client can log in")

    try:
        TlsContexts(cfg)
    except TlsConfigError as exc:
        errors.append(f"{config.path}: error: TLS: {exc}")

    if cfg.syslog:
        _handler, problems = logs.syslog_handler(cfg.syslog_ident, cfg.syslog_facility)
        if _handler is not None:
            _handler.close()
        warnings += [f"{at('syslog')}: warning: {problem}" for problem in problems]
    return errors, warnings, notes


def _has_auth_user(config: Config) -> bool:
    return bool(config.pgbouncer.auth_user
                or any(db.auth_user for db in config.databases.values()))


# --------------------------------------------------------------------------- report


def _print_settings(config: Config, out: TextIO) -> None:
    cfg = config.pgbouncer
    defaults = Pgbouncer()
    changed = []
    for name in cfg.__struct_fields__:
        value = getattr(cfg, name)
        if value == getattr(defaults, name):
            continue
        if name == "conffile" and value == config.path:
            continue  # set to the loaded file by the loader
        if name in Pgbouncer._secret_fields and value:
            changed.append(f"{name} = {MASK}")
        else:
            changed.append(f"{name} = {_setting_text(name, value)}")
    print("[pgbouncer] settings that differ from the defaults:"
          if changed else "[pgbouncer] all settings at their defaults", file=out)
    for line in changed:
        print(line, file=out)
    _print_entries(out, "databases", config.databases, Database, _SECRET_DB_FIELDS, skip=("name",))
    _print_entries(out, "users", config.users, User, frozenset(), skip=("name",))
    _print_entries(out, "peers", config.peers, Peer, frozenset(), skip=("peer_id",))


def _setting_text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if name == "unix_socket_mode" and isinstance(value, int):
        return f"0{value:o}"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _print_entries(out: TextIO, section: str, entries: dict, struct: type,
                   secret: frozenset[str], skip: tuple[str, ...]) -> None:
    if not entries:
        return
    print(f"\n[{section}]", file=out)
    fields = [f for f in msgspec.structs.fields(struct) if f.name not in skip]
    for key, entry in entries.items():
        pairs = []
        for field in fields:
            value = getattr(entry, field.name)
            if value is None or value == field.default:
                continue
            text = MASK if field.name in secret else _quote_value(_setting_text(field.name, value))
            pairs.append(f"{field.name}={text}")
        print(f"{_quote_name(str(key))} = {' '.join(pairs)}".rstrip(), file=out)


def _quote_name(name: str) -> str:
    if _PLAIN_NAME.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _quote_value(text: str) -> str:
    if _PLAIN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("'", "''") + "'"
