"""The deliverer's resolver: a portal's host is checked again when a delivery connects, so a name
that resolved to a public address when the subscription was put and to an internal one later
(DNS rebinding) is never connected to."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from services.portals.connecting import InternalAddress, PublicOnlyResolver


class Answers(AbstractResolver):
    """What a name server answers, changed by the test."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_a_name_that_turns_internal_is_refused_at_connect_time() -> None:
    answers = Answers(["93.184.215.14"])  # public when the subscription was put
    resolver = PublicOnlyResolver(dev=False, inner=answers)
    [found] = await resolver.resolve("portal.example", 443)
    assert found["host"] == "93.184.215.14"
    for internal, named in [
        ("10.1.2.3", "a private address"),
        ("169.254.169.254", "the cloud metadata address"),
        ("127.0.0.1", "a loopback address"),
        ("fd00::1", "a unique-local address"),
    ]:
        answers.addresses = ["93.184.215.14", internal]  # one internal answer is enough
        with pytest.raises(InternalAddress, match=named):
            await resolver.resolve("portal.example", 443)


async def test_loopback_is_allowed_in_dev_only() -> None:
    answers = Answers(["127.0.0.1"])
    [found] = await PublicOnlyResolver(dev=True, inner=answers).resolve("localhost", 8016)
    assert found["host"] == "127.0.0.1"
    with pytest.raises(InternalAddress, match="loopback"):
        await PublicOnlyResolver(dev=False, inner=answers).resolve("localhost", 8016)
    answers.addresses = ["10.0.0.7", "127.0.0.1"]  # dev allows loopback, nothing else
    with pytest.raises(InternalAddress, match="private"):
        await PublicOnlyResolver(dev=True, inner=answers).resolve("localhost", 8016)


async def test_a_name_that_resolves_to_nothing_is_refused() -> None:
    with pytest.raises(InternalAddress, match="does not resolve"):
        await PublicOnlyResolver(dev=False, inner=Answers([])).resolve("gone.example", 443)
