"""Where a delivery may connect: the addresses a portal's host resolves to *when the delivery
connects*, checked by the same rules as a subscription's URL (`urls.address_problem`).

A subscription's URL is checked when it is put, but a name may resolve elsewhere later (DNS
rebinding: public when checked, internal when called). So the deliverer's connection pool
resolves every host through `PublicOnlyResolver`, which refuses to hand aiohttp any address when
one of them is internal (private, loopback, link-local, metadata, ...; loopback is allowed while
`MOTCUA_ENV=dev`): the connection is never made and the attempt fails like a refused one,
retried on the schedule and given up with that reason. The addresses checked are the ones
connected to. An IP literal in a URL is not resolved; it was checked when it was put.
"""

from __future__ import annotations

import socket

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from services.portals.urls import Target, address_problem


class InternalAddress(OSError):
    """A portal's host resolved to an address callbacks may not go to."""


class PublicOnlyResolver(AbstractResolver):
    def __init__(self, *, dev: bool, inner: AbstractResolver | None = None) -> None:
        self._dev = dev
        self._inner = inner or aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        target = Target(f"https://{host}/", "https", host.rstrip(".").lower(), port)
        problem = address_problem(target, [str(r["host"]) for r in found], dev=self._dev)
        if problem is not None:
            raise InternalAddress(problem)
        return found

    async def close(self) -> None:
        await self._inner.close()


def public_only_transport(*, dev: bool, connections: int) -> httpx.AsyncBaseTransport:
    """An aiohttp transport whose connections go to vetted addresses only."""

    def session() -> aiohttp.ClientSession:
        # aiohttp caches what the resolver returned (10 s): vetted addresses only
        connector = aiohttp.TCPConnector(limit=connections, resolver=PublicOnlyResolver(dev=dev))
        return aiohttp.ClientSession(connector=connector)

    return AiohttpTransport(client=session)
