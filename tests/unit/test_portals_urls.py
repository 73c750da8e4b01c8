"""Where a portal may be called back (services/portals/urls.py): form, then resolved addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.portals.urls import Target, address_problem, kind_of, url_problem


def target(url: str, *, dev: bool = False) -> Target:
    parsed = url_problem(url, dev=dev)
    assert isinstance(parsed, Target), parsed
    return parsed


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("", "non-empty"),
        ("ftp://portal.example/cb", "https"),
        ("http://portal.example/cb", "https"),
        ("https://user:pw@portal.example/cb", "credentials"),
        ("https://portal.example/cb#frag", "fragment"),
        ("https:///cb", "host"),
        ("https://portal.example/a b", "spaces"),
        ("https://portal.example:99999/", "valid URL"),
        ("https://portal.example/" + "a" * 2000, "2000"),
    ],
)
def test_a_malformed_url_is_refused_naming_why(url: str, named: str) -> None:
    problem = url_problem(url, dev=False)
    assert isinstance(problem, str) and named in problem


def test_http_is_a_form_allowed_in_dev_only() -> None:
    assert isinstance(url_problem("http://127.0.0.1:8016/callbacks", dev=True), Target)
    assert isinstance(url_problem("http://127.0.0.1:8016/callbacks", dev=False), str)


def test_the_target_names_host_and_port() -> None:
    assert target("https://Portal.Example./cb") == Target(
        "https://Portal.Example./cb", "https", "portal.example", 443
    )
    assert target("https://[2001:db8::1]:8443/cb").host == "2001:db8::1"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("240.0.0.1", "private"),  # 240/4 is in Python's private list
        ("2001:db8::1", "private"),
    ],
)
def test_internal_addresses_are_named(address: str, kind: str) -> None:
    named = kind_of(ipaddress.ip_address(address))
    assert named is not None and kind in named


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert kind_of(ipaddress.ip_address(address)) is None


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    why = address_problem(target("https://portal.example/cb"), ["10.1.2.3"], dev=False)
    assert why is not None
    assert "portal.example resolves to 10.1.2.3, a private address" in why


def test_one_internal_address_among_public_ones_refuses_the_url() -> None:
    why = address_problem(
        target("https://portal.example/cb"), ["93.184.216.34", "169.254.169.254"], dev=False
    )
    assert why is not None and "metadata" in why


def test_a_name_that_does_not_resolve_is_refused() -> None:
    why = address_problem(target("https://nowhere.invalid/cb"), [], dev=False)
    assert why is not None and "does not resolve" in why


def test_loopback_is_allowed_in_dev_only() -> None:
    local = target("http://localhost:8016/cb", dev=True)
    assert address_problem(local, ["127.0.0.1", "::1"], dev=True) is None
    assert address_problem(local, ["127.0.0.1"], dev=False) is not None
    # in dev, a loopback name that also resolves elsewhere is not loopback
    assert address_problem(local, ["127.0.0.1", "10.0.0.1"], dev=True) is not None


def test_http_to_a_public_address_is_refused_even_in_dev() -> None:
    why = address_problem(target("http://portal.example/cb", dev=True), ["93.184.216.34"], dev=True)
    assert why is not None and "https" in why


def test_https_to_public_addresses_is_allowed() -> None:
    assert (
        address_problem(target("https://portal.example/cb"), ["93.184.216.34"], dev=False) is None
    )


@given(
    st.ip_addresses().filter(lambda a: kind_of(a) is not None),
    st.lists(st.ip_addresses(v=4).filter(lambda a: kind_of(a) is None), max_size=3),
    st.booleans(),
)
def test_any_internal_address_refuses_whatever_else_resolves(
    internal: ipaddress.IPv4Address | ipaddress.IPv6Address,
    public: list[ipaddress.IPv4Address],
    dev: bool,
) -> None:
    addresses = [str(a) for a in public] + [str(internal)]
    loopback_only = all(kind_of(ipaddress.ip_address(a)) == "a loopback address" for a in addresses)
    why = address_problem(target("https://portal.example/cb"), addresses, dev=dev)
    if dev and loopback_only:
        assert why is None
    else:
        assert why is not None
