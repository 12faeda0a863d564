"""HostCache: PgBouncer's DNS cache rules (dns_max_ttl, dns_nxdomain_ttl, round robin).

The resolver is a function of the test that answers from a table and counts its lookups;
the clock is the test's, so expiry needs no waiting.
"""

import asyncio
import socket

import pytest

from pgmulti.dns import HostCache

V4 = socket.AF_INET
V6 = socket.AF_INET6


def info(family, address):
    return (family, socket.SOCK_STREAM, 6, "", address)


class Resolver:
    def __init__(self, answers):
        self.answers = answers      # name -> list of getaddrinfo tuples, or an OSError
        self.lookups = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, name):
        self.lookups.append(name)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers[name]
        if isinstance(answer, OSError):
            raise answer
        return answer


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def cache_for(answers):
    resolver, clock, moved = Resolver(answers), Clock(), []
    cache = HostCache(resolver, moved.append, clock)
    return cache, resolver, clock, moved


THREE = [info(V4, ("10.0.0.1", 0)), info(V4, ("10.0.0.2", 0)), info(V6, ("fd00::3", 0, 0, 0))]


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_name_is_looked_up_once_per_dns_max_ttl():
    async def main():
        cache, resolver, clock, _ = cache_for({"db.example": THREE})
        cache.configure(max_ttl=15.0, nxdomain_ttl=5.0)
        await cache.addresses("db.example", 5432)
        clock.now += 14.9
        await cache.addresses("db.example", 5432)
        assert resolver.lookups == ["db.example"]
        clock.now += 0.2
        await cache.addresses("db.example", 5432)
        assert resolver.lookups == ["db.example", "db.example"]
    run(main())


def test_connects_take_the_addresses_in_turn_with_the_port():
    async def main():
        cache, *_ = cache_for({"db.example": THREE})
        orders = [await cache.addresses("db.example", 6432) for _ in range(4)]
        first = [address for _, address in orders[0]]
        assert first == [("10.0.0.1", 6432), ("10.0.0.2", 6432), ("fd00::3", 6432, 0, 0)]
        assert [order[0][1][0] for order in orders] == ["10.0.0.1", "10.0.0.2", "fd00::3",
                                                        "10.0.0.1"]
        # Every order holds every address once: a failed connect can try the others.
        assert all(sorted(order) == sorted(orders[0]) for order in orders)
    run(main())


def test_a_failed_lookup_is_remembered_for_dns_nxdomain_ttl():
    async def main():
        failure = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        cache, resolver, clock, _ = cache_for({"gone.example": failure})
        cache.configure(max_ttl=15.0, nxdomain_ttl=5.0)
        for _ in range(2):
            with pytest.raises(socket.gaierror):
                await cache.addresses("gone.example", 5432)
        assert resolver.lookups == ["gone.example"]
        clock.now += 5.0
        resolver.answers["gone.example"] = THREE[:1]
        assert (await cache.addresses("gone.example", 5432))[0][1] == ("10.0.0.1", 5432)
        assert resolver.lookups == ["gone.example"] * 2
    run(main())


def test_connects_during_a_lookup_share_it():
    async def main():
        cache, resolver, _, _ = cache_for({"db.example": THREE})
        resolver.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(cache.addresses("db.example", 5432)) for _ in range(3)]
        await asyncio.sleep(0)
        assert cache.queries == 1
        resolver.gate.set()
        orders = await asyncio.gather(*waiting)
        assert resolver.lookups == ["db.example"] and cache.queries == 0
        assert len({order[0] for order in orders}) == 3  # and each took its own turn
    run(main())


def test_new_addresses_are_reported_and_a_new_order_is_not():
    async def main():
        cache, resolver, clock, moved = cache_for({"db.example": THREE})
        await cache.addresses("db.example", 5432)
        resolver.answers["db.example"] = list(reversed(THREE))
        clock.now += 16
        await cache.addresses("db.example", 5432)
        assert moved == []
        resolver.answers["db.example"] = THREE[:2]
        clock.now += 16
        await cache.addresses("db.example", 5432)
        assert moved == ["db.example"]
    run(main())


def test_ip_addresses_are_not_looked_up_or_cached():
    async def main():
        cache, resolver, _, _ = cache_for({})
        assert await cache.addresses("127.0.0.1", 5432) == [(V4, ("127.0.0.1", 5432))]
        assert (await cache.addresses("::1", 5432))[0][1][:2] == ("::1", 5432)
        assert resolver.lookups == [] and cache.rows() == [] and cache.names == 0
    run(main())


def test_show_dns_hosts_rows():
    async def main():
        cache, _, clock, _ = cache_for({"db.example": THREE})
        cache.configure(max_ttl=15.0, nxdomain_ttl=15.0)
        await cache.addresses("db.example", 5432)
        clock.now += 4.5
        assert cache.rows() == [["db.example", 10, "10.0.0.1:0,10.0.0.2:0,[fd00::3]:0"]]
        clock.now += 60
        assert cache.rows()[0][1] == 0  # overdue: 0, as PgBouncer shows it
        assert cache.names == 1
    run(main())
