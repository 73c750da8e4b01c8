"""Where a portal may be called back (CONTRACT section 9): pure rules, no I/O.

A subscription's `url` must be `https` to a public address; while `MOTCUA_ENV=dev` an `http`
(or `https`) URL to a loopback address is allowed too. The name is checked first
(`url_problem`: scheme, host, no credentials, no fragment), then every address the host resolves
to (`address_problem`, the shell resolves): one address that is private, loopback, link-local
(the cloud metadata address 169.254.169.254 among them), unique-local, shared, multicast,
reserved or unspecified refuses the whole URL, so a name resolving to both a public and an
internal address cannot point the service at the internal network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2000
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """A URL whose form is acceptable: the host to resolve and the port to reach."""

    url: str
    scheme: str
    host: str
    port: int


def url_problem(url: object, *, dev: bool) -> Target | str:
    """The URL's target, or why its form is refused (a sentence naming the problem)."""
    if not isinstance(url, str) or not url:
        return "url must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"url must be at most {MAX_URL_LENGTH} characters"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return "url must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"url is not a valid URL: {exc}"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        return "url must use https" + (" (or http to loopback in dev)" if dev else "")
    if scheme == "http" and not dev:
        return "url must use https (http is allowed only to loopback while MOTCUA_ENV=dev)"
    if parts.username is not None or parts.password is not None:
        return "url must not carry credentials (user:password@)"
    if parts.fragment:
        return "url must not have a fragment (#...)"
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return "url must name a host"
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80))


def literal_address(host: str) -> Address | None:
    """The host as an IP address when it is one (an IPv6 literal without its brackets)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def kind_of(address: Address) -> str | None:
    """What internal kind of address this is ('private', 'loopback', ...); None when public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return kind_of(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return "the cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv6Address) and address in UNIQUE_LOCAL:
        return "a unique-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


def address_problem(target: Target, addresses: Sequence[str], *, dev: bool) -> str | None:
    """Why the URL may not be called given what its host resolved to; None when it may.

    In dev, a URL whose every address is loopback is allowed (http or https); anywhere, a URL
    must be https and every address public."""
    if not addresses:
        return f"url host {target.host} does not resolve to any address"
    parsed: list[Address] = []
    for text in addresses:
        address = literal_address(text.split("%", 1)[0])
        if address is None:
            return f"url host {target.host} resolved to {text!r}, not an IP address"
        parsed.append(address)
    if dev and all(_loopback(a) for a in parsed):
        return None
    for address in parsed:
        kind = kind_of(address)
        if kind is not None:
            via = "is" if str(address) == target.host else f"resolves to {address},"
            return f"url host {target.host} {via} {kind}; callbacks go to public addresses only"
    if target.scheme != "https":
        return (
            "url must use https to a public address (http is allowed only to loopback "
            "while MOTCUA_ENV=dev)"
        )
    return None


def _loopback(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
