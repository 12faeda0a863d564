"""auth_hba_file: PgBouncer's subset of pg_hba.conf, parsed once per (re)load, matched per login.

Supported, as in PgBouncer 1.25 (doc/config.md "HBA file format"):

* record types ``local``, ``host``, ``hostssl``, ``hostnossl``;
* databases ``all``, ``sameuser``, ``replication`` (pgmulti has no replication connections,
  so it matches nothing), names, ``"quoted names"``, ``@file``; not ``samerole``/``samegroup``;
* users ``all``, names, ``@file``; not ``+group``;
* addresses ``all``, IPv4 or IPv6 with ``/bits`` or a separate mask; not ``samehost``,
  ``samenet`` or host names;
* methods ``trust``, ``reject``, ``md5``, ``password``, ``scram-sha-256``, ``cert``, ``peer``;
  the only option after the method is ``map=`` for ``cert`` and ``peer``, naming a map of
  ``auth_ident_file``: lines ``map-name system-user database-user`` (the database user may
  be ``all``; no regular expressions, as in PgBouncer). The system user is a certificate
  name (cert) or the OS user at the other end of the Unix socket (peer).

A line that cannot be parsed is logged with file:line and skipped, the rest of the file still
applies (PgBouncer does the same). No line matching a login means it is rejected.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from . import errors
from .errors import PgError

log = logging.getLogger("pgmulti.hba")

RECORD_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "md5", "password", "scram-sha-256", "cert", "peer")
# hba method -> pgmulti's auth_type word for the same exchange.
AUTH_TYPE_OF_METHOD = {"password": "plain"}
_MAX_INCLUDE_DEPTH = 10  # @file inside @file: enough for any real setup, stops loops


class HbaLineError(ValueError):
    """One line cannot be used; the message never repeats the line's text."""


@dataclass(frozen=True, slots=True)
class Names:
    """A database or user field: keywords plus a set of plain names."""

    all: bool = False
    sameuser: bool = False     # database field only: the database named like the user
    names: frozenset[str] = frozenset()

    def matches(self, name: str, pair: str) -> bool:
        """`pair` is the other field's value (the user, for sameuser)."""
        return self.all or (self.sameuser and name == pair) or name in self.names


@dataclass(frozen=True)
class Rule:
    line: int
    kind: str                   # one of RECORD_TYPES
    databases: Names
    users: Names
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # None: all addresses
    method: str                 # one of METHODS
    ident_map: IdentMap | None = None  # map= (cert, peer)

    def __post_init__(self) -> None:
        # Plain integers for the per-login test: (version, network, mask).
        net = self.network
        key = None if net is None else (net.version, int(net.network_address),
                                        int(net.netmask))
        object.__setattr__(self, "_net", key)

    def matches_connection(self, unix: bool, address: tuple[int, int] | None,
                           tls: bool) -> bool:
        """address: (IP version, address as an integer) of a TCP client."""
        if unix:
            return self.kind == "local"
        if self.kind == "local":
            return False
        if self.kind == "hostssl" and not tls:
            return False
        if self.kind == "hostnossl" and tls:
            return False
        net = self._net
        if net is None:
            return True
        return address is not None and address[0] == net[0] and address[1] & net[2] == net[1]


@dataclass(frozen=True)
class IdentMap:
    """One map of auth_ident_file: (system user, database user or None for all) pairs."""

    name: str
    mappings: tuple[tuple[str, str | None], ...]

    def allows(self, system_users: list[str], user: str, fold_case: bool = False) -> bool:
        """Whether one of the system users (certificate names compare without case) may log
        in as the database user."""
        if fold_case:
            system_users = [name.lower() for name in system_users]
        return any((system.lower() if fold_case else system) in system_users
                   and (database is None or database == user)
                   for system, database in self.mappings)


class HbaRules:
    """The usable lines of one hba file, in order; the first match decides."""

    def __init__(self, path: str, rules: list[Rule], problems: list[str]):
        self.path = path
        self.rules = tuple(rules)
        self.problems = problems  # "path:line: problem", already logged

    def match(self, *, unix: bool, address: str | None, tls: bool, database: str,
              user: str) -> Rule | None:
        """The first rule for this connection, or None (which means reject)."""
        ip = _client_ip(address) if not unix else None
        for rule in self.rules:
            if (rule.matches_connection(unix, ip, tls) and rule.databases.matches(database, user)
                    and rule.users.matches(user, database)):
                return rule
        return None


def _client_ip(address: str | None) -> tuple[int, int] | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d; IPv4 lines match it.
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version, int(ip)


# --- parsing ------------------------------------------------------------------------------

COMMA = ","


def tokenize(line: str) -> list[tuple[str, bool]]:
    """(text, quoted) tokens of one line; "," is a token of its own; '#' starts a comment.

    As in PgBouncer, a quoted token keeps its text literally ("" is a quote) and is never a
    keyword; an unquoted token ends at white space, ',', '#' or '"'.
    """
    tokens: list[tuple[str, bool]] = []
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch.isspace():
            i += 1
        elif ch == "#":
            break
        elif ch == ",":
            tokens.append((COMMA, False))
            i += 1
        elif ch == '"':
            text = []
            i += 1
            while True:
                if i >= n:
                    raise HbaLineError("unterminated quoted name")
                if line[i] == '"':
                    if i + 1 < n and line[i + 1] == '"':
                        text.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                text.append(line[i])
                i += 1
            tokens.append(("".join(text), True))
        else:
            start = i
            while i < n and not line[i].isspace() and line[i] not in ',#"':
                i += 1
            tokens.append((line[start:i], False))
    return tokens


class _Tokens:
    def __init__(self, tokens: list[tuple[str, bool]]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, bool] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, what: str) -> tuple[str, bool]:
        token = self.peek()
        if token is None or token == (COMMA, False):
            raise HbaLineError(f"missing {what}")
        self.pos += 1
        return token

    def keyword(self) -> str | None:
        """The next token if it is unquoted (keywords are never quoted)."""
        token = self.peek()
        return token[0] if token is not None and not token[1] and token[0] != COMMA else None

    def at_comma(self) -> bool:
        if self.peek() == (COMMA, False):
            self.pos += 1
            return True
        return False


class _NamesBuilder:
    def __init__(self):
        self.all = False
        self.sameuser = False
        self.names: set[str] = set()

    def build(self) -> Names:
        return Names(self.all, self.sameuser, frozenset(self.names))


def _parse_names(tokens: _Tokens, into: _NamesBuilder, is_db: bool, base_dir: str,
                 depth: int) -> None:
    """A comma-separated list of names and keywords (a database or user field)."""
    what = "database" if is_db else "user name"
    while True:
        text, quoted = tokens.take(what)
        if quoted:
            into.names.add(text)
        elif text == "all":
            into.all = True
        elif is_db and text == "sameuser":
            into.sameuser = True
        elif is_db and text == "replication":
            pass  # only replication connections, which pgmulti refuses anyway
        elif is_db and text in ("samerole", "samegroup"):
            raise HbaLineError(f"{text} is not supported")
        elif text.startswith("+"):
            raise HbaLineError("group membership (+name) is not supported")
        elif text.startswith("@"):
            _read_name_file(os.path.join(base_dir, text[1:]), into, is_db, depth + 1)
        else:
            into.names.add(text)
        if not tokens.at_comma():
            return


def _read_name_file(path: str, into: _NamesBuilder, is_db: bool, depth: int) -> None:
    """@file: names separated by commas or white space, on any number of lines."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise HbaLineError("@file nested too deeply")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise HbaLineError(f"cannot read {path}: {exc.strerror or exc}") from None
    for line in lines:
        tokens = _Tokens(tokenize(line))
        while tokens.peek() is not None:
            _parse_names(tokens, into, is_db, os.path.dirname(path), depth)


def _parse_address(tokens: _Tokens) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    text, quoted = tokens.take("address")
    if text == "all" and not quoted:
        return None
    if text in ("samehost", "samenet") and not quoted:
        raise HbaLineError(f"{text} is not supported")
    address, slash, bits = text.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise HbaLineError("invalid IP address (host names are not supported)") from None
    if slash:
        if not bits.isdigit() or int(bits) > ip.max_prefixlen:
            raise HbaLineError("invalid CIDR mask")
        prefix = int(bits)
    else:
        mask_text, _ = tokens.take("IP mask")
        try:
            mask = ipaddress.ip_address(mask_text)
        except ValueError:
            raise HbaLineError("invalid IP mask") from None
        if mask.version != ip.version:
            raise HbaLineError("IP address and mask do not match in family")
        prefix = _prefix_of_mask(int(mask), ip.max_prefixlen)
    network = ipaddress.ip_network((ip, prefix), strict=False)
    if network.network_address != ip:
        log.warning("hba: %s/%d has bits set beyond the mask; matching %s", ip, prefix, network)
    return network


def _prefix_of_mask(mask: int, width: int) -> int:
    prefix = bin(mask).count("1")
    if mask != ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1):
        raise HbaLineError("invalid IP mask (not contiguous)")
    return prefix


def parse_line(line: str, number: int, base_dir: str,
               ident_maps: dict[str, IdentMap] | None = None) -> Rule | None:
    """One line as a Rule, None for a blank or comment line; HbaLineError if unusable.
    `ident_maps`: auth_ident_file's maps, for map= options."""
    tokens = _Tokens(tokenize(line))
    if tokens.peek() is None:
        return None
    kind = tokens.keyword()
    if kind not in RECORD_TYPES:
        raise HbaLineError("unknown record type (local, host, hostssl or hostnossl)")
    tokens.pos += 1
    databases = _NamesBuilder()
    _parse_names(tokens, databases, True, base_dir, 0)
    users = _NamesBuilder()
    _parse_names(tokens, users, False, base_dir, 0)
    network = None if kind == "local" else _parse_address(tokens)
    method = tokens.keyword()
    if method not in METHODS:
        # The method name only: options of other methods (ldap) may hold passwords.
        shown = method if method and method.replace("-", "").isalnum() else "?"
        raise HbaLineError(f"unsupported authentication method {shown}")
    tokens.pos += 1
    ident_map = None
    if tokens.peek() is not None:
        option, _, map_name = tokens.take("option")[0].partition("=")
        if option != "map":
            raise HbaLineError("options after the authentication method are not supported")
        if method not in ("cert", "peer"):
            raise HbaLineError("map= is supported with the cert and peer methods only")
        ident_map = (ident_maps or {}).get(map_name)
        if ident_map is None:
            raise HbaLineError(f"ident map {map_name!r} is not in auth_ident_file")
        if tokens.peek() is not None:
            raise HbaLineError("options after map= are not supported")
    return Rule(number, kind, databases.build(), users.build(), network, method, ident_map)


def parse(text: str, path: str, ident_maps: dict[str, IdentMap] | None = None) -> HbaRules:
    """Every usable line of `text` (the file at `path`); problems are logged, never fatal."""
    rules: list[Rule] = []
    problems: list[str] = []
    base_dir = os.path.dirname(path)
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rule = parse_line(line, number, base_dir, ident_maps)
        except HbaLineError as exc:
            problem = f"{path}:{number}: {exc}; line ignored"
            problems.append(problem)
            log.warning("auth_hba_file %s", problem)
            continue
        if rule is not None:
            rules.append(rule)
    return HbaRules(path, rules, problems)


def parse_ident(text: str, path: str) -> dict[str, IdentMap]:
    """auth_ident_file's maps by name; an unusable line is logged with file:line and skipped."""
    pairs: dict[str, list[tuple[str, str | None]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            tokens = [word for word, _ in tokenize(line)]
            if not tokens:
                continue
            if len(tokens) != 3 or COMMA in tokens:
                raise HbaLineError("expected: map-name system-user database-user")
        except HbaLineError as exc:
            log.warning("auth_ident_file %s:%d: %s; line ignored", path, number, exc)
            continue
        name, system, database = tokens
        pairs.setdefault(name, []).append((system, None if database == "all" else database))
    return {name: IdentMap(name, tuple(mappings)) for name, mappings in pairs.items()}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


def load(path: str, ident_path: str = "") -> HbaRules:
    """The rules of the file (with the maps of `ident_path`); a file that cannot be read has
    none, so every login is rejected."""
    ident_maps: dict[str, IdentMap] = {}
    if ident_path:
        try:
            ident_maps = parse_ident(_read(ident_path), ident_path)
        except OSError as exc:
            log.error("could not open auth_ident_file %s: %s; lines with map= are ignored",
                      ident_path, exc.strerror or exc)
    try:
        text = _read(path)
    except OSError as exc:
        log.error("could not open auth_hba_file %s: %s; every login is rejected",
                  path, exc.strerror or exc)
        return HbaRules(path, [], [f"{path}: {exc.strerror or exc}"])
    rules = parse(text, path, ident_maps)
    log.info("auth_hba_file %s: %d rules", path, len(rules.rules))
    return rules


# The configuration object is replaced on every reload (SIGHUP, RELOAD), so comparing it
# tells when to read the file again: at the first login after a reload.
_loaded: tuple[object, HbaRules] | None = None


def rules_for(config) -> HbaRules:
    global _loaded
    if _loaded is None or _loaded[0] is not config:
        cfg = config.pgbouncer
        _loaded = (config, load(cfg.auth_hba_file, cfg.auth_ident_file or ""))
    return _loaded[1]


# --- the decision for one login -------------------------------------------------------------


def _connection_text(unix: bool, address: str | None, tls: bool, database: str,
                     user: str) -> str:
    host = "[local]" if unix else (address or "?")
    encryption = "SSL encryption" if tls else "no encryption"
    return f'host "{host}", user "{user}", database "{database}", {encryption}'


def method_for(config, *, unix: bool, address: str | None, tls: bool, database: str,
               user: str) -> tuple[str, IdentMap | None]:
    """The auth_type word for this login (trust, plain, md5, scram-sha-256, cert, peer), and
    the ident map of the line for cert and peer.

    Raises PostgreSQL's FATAL 28000 when no line matches or the matching line says reject.
    """
    rule = rules_for(config).match(unix=unix, address=address, tls=tls, database=database,
                                   user=user)
    where = _connection_text(unix, address, tls, database, user)
    if rule is None:
        raise errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                           f"no pg_hba.conf entry for {where}")
    if rule.method == "reject":
        raise errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                           f"pg_hba.conf rejects connection for {where}")
    log.debug("hba line %d matched %s", rule.line, where)
    return AUTH_TYPE_OF_METHOD.get(rule.method, rule.method), rule.ident_map


def certificate_failed(user: str) -> PgError:
    return errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                        f'certificate authentication failed for user "{user}"')


def peer_failed(user: str) -> PgError:
    return errors.fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION,
                        f'Peer authentication failed for user "{user}"')


def certificate_names(cert: dict) -> list[str]:
    """Names a verified client certificate (ssl getpeercert() dict) stands for.

    As PgBouncer (libtls tls_check_name): its DNS subjectAltNames if it has any, else the
    subject's commonName.
    """
    alt_names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if alt_names:
        return alt_names
    return [value for rdn in cert.get("subject", ()) for key, value in rdn
            if key == "commonName"]


def certificate_matches(cert: dict | None, user: str, ident_map: IdentMap | None = None) -> bool:
    """A verified certificate naming this user (case-insensitively, as libtls compares), or
    with `ident_map` a name the map lets log in as this user."""
    if not cert:
        return False
    names = certificate_names(cert)
    if ident_map is not None:
        return ident_map.allows(names, user, fold_case=True)
    wanted = user.lower()
    return any(name.lower() == wanted for name in names)


def peer_credentials(sock) -> tuple[int, int] | None:
    """Process id and user id at the other end of a Unix socket (SO_PEERCRED), if known."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    if pid <= 0 or uid < 0:  # not a Unix socket peer (e.g. a TCP socket)
        return None
    return pid, uid


def peer_user_name(sock) -> str | None:
    """The OS user name of the process at the other end of a Unix socket."""
    creds = peer_credentials(sock)
    if creds is None:
        return None
    try:
        return pwd.getpwuid(creds[1]).pw_name
    except (KeyError, OverflowError):
        return None
