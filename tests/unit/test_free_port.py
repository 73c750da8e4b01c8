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
        offers = iter(
            [taken, taken, taken + 1 if taken + 1 in below_ephemeral_ports() else taken - 1]
        )
        monkeypatch.setattr(embedded.random, "choice", lambda _ports: next(offers))
        chosen = free_port()
        assert chosen != taken
        assert abs(chosen - taken) == 1
