"""Ports chosen for local servers stay out of the kernel's ephemeral range, so an outgoing
connection cannot take one between the choice and the bind, or while a killed server restarts."""

from __future__ import annotations

import socket

import pytest

from services.dev import embedded
from services.dev.embedded import below_ephemeral_ports, free_port


def test_a_chosen_port_is_below_the_ephemeral_range_and_bindable() -> None:
    ports = below_ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert port in ports
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        # the taken port twice, then its neighbours (one of them may be in use too: other
        # tests run servers beside this one)
        others = sorted(
            (p for p in below_ephemeral_ports() if p != taken), key=lambda p: abs(p - taken)
        )
        offers = iter([taken, taken, *others])
        monkeypatch.setattr(embedded.random, "choice", lambda _ports: next(offers))
        chosen = free_port()
        assert chosen != taken
        assert chosen in others[:50]  # the first free one offered after the taken port
