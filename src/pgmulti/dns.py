"""Server host names resolved as PgBouncer resolves them.

A name's addresses are kept for ``dns_max_ttl`` seconds whatever TTL the DNS gave them, and a
failed lookup is remembered for ``dns_nxdomain_ttl`` seconds. When a name has several
addresses, new server connections take them in turn (round robin); a connect that fails on
one address tries the others before giving up. Connects that need the same name while it is
being looked up share that one lookup. IP addresses are not looked up and not cached.

When a lookup gives other addresses than the last one, ``on_change(name)`` is called: the
pools using that name close their servers as they are released (PgBouncer does the same).
SHOW DNS_HOSTS and the dns_* counts of SHOW LISTS read the cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

Resolve = Callable[[str], Awaitable[list[tuple]]]
"""Looks a name up: getaddrinfo's (family, type, proto, canonname, sockaddr) tuples."""


class Lookup:
    """One host name in the cache."""

    __slots__ = ("addresses", "error", "expires", "name", "pending", "turn")

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[tuple[int, tuple]] = []  # (family, sockaddr without the port)
        self.error: OSError | None = None
        self.expires = 0.0
        self.turn = 0                   # the next connect starts at this address
        self.pending: asyncio.Future | None = None


class HostCache:
    def __init__(self, resolve: Resolve, on_change: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resolve = resolve
        self._on_change = on_change
        self._clock = clock
        self._lookups: dict[str, Lookup] = {}
        self.max_ttl = 15.0
        self.nxdomain_ttl = 15.0

    def configure(self, max_ttl: float, nxdomain_ttl: float) -> None:
        """dns_max_ttl and dns_nxdomain_ttl; what is cached keeps the expiry it was given."""
        self.max_ttl = max_ttl
        self.nxdomain_ttl = nxdomain_ttl

    async def addresses(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """(family, sockaddr) pairs to connect to, in the order to try them: the name's
        addresses starting at its turn, which moves on by one for the next connect."""
        if _is_ip(host):  # numeric: no lookup, nothing blocks
            return [(family, address) for family, _, _, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)]
        lookup = self._lookups.get(host)
        if lookup is None:
            lookup = self._lookups[host] = Lookup(host)
        if lookup.expires <= self._clock():
            await self._refresh(lookup)
        if lookup.error is not None:
            raise lookup.error
        found = lookup.addresses
        start = lookup.turn % len(found)
        lookup.turn = start + 1
        return [(family, _with_port(address, port)) for family, address
                in found[start:] + found[:start]]

    async def _refresh(self, lookup: Lookup) -> None:
        if lookup.pending is None:
            lookup.pending = asyncio.ensure_future(self._look_up(lookup))
        await asyncio.shield(lookup.pending)

    async def _look_up(self, lookup: Lookup) -> None:
        previous = lookup.addresses
        try:
            infos = await self._resolve(lookup.name)
            found = list(dict.fromkeys(  # each address once, in the resolver's order
                (family, _with_port(address, 0)) for family, _, _, _, address in infos))
            if not found:
                raise OSError(f"no address for {lookup.name}")
        except OSError as exc:
            lookup.error = exc
            lookup.expires = self._clock() + self.nxdomain_ttl
        else:
            lookup.addresses, lookup.error = found, None
            lookup.expires = self._clock() + self.max_ttl
            if previous and set(previous) != set(found):
                self._on_change(lookup.name)
        finally:
            lookup.pending = None

    # -- what the admin console shows ------------------------------------------------------

    def rows(self) -> list[list]:
        """SHOW DNS_HOSTS: hostname, whole seconds until the next lookup, addresses."""
        now = self._clock()
        return [[lookup.name, max(0, int(lookup.expires - now)),
                 ",".join(_address_text(address) for _, address in lookup.addresses)]
                for lookup in self._lookups.values()]

    @property
    def names(self) -> int:
        return len(self._lookups)

    @property
    def queries(self) -> int:
        """Lookups in flight."""
        return sum(1 for lookup in self._lookups.values() if lookup.pending is not None)


def loop_resolver(loop: asyncio.AbstractEventLoop) -> Resolve:
    """The event loop's getaddrinfo (the system resolver, in a thread) for TCP addresses."""
    async def resolve(host: str) -> list[tuple]:
        return await loop.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    return resolve


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_port(address: tuple, port: int) -> tuple:
    return (address[0], port, *address[2:])


def _address_text(address: tuple) -> str:
    """As PgBouncer prints a cached address: the lookup names no port, so it shows 0."""
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{host}:{address[1]}"
