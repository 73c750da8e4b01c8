"""Portals' callback subscriptions (CONTRACT section 9): pure rules, no I/O.

One subscription per portal source, on the compacted topic `portal.subscriptions` keyed by the
source: `{source, url, types, secret, at}`, or a tombstone once deleted. Every portals process
reads the topic whole and follows it (`book.SubscriptionBook`); the latest record of a source
wins. `types` entries are exact event types a portal hears (`payment.*`, `postal.*`, `sms.*`
events and `dossier.overdue`) or `prefix.*`; `matches` says whether an event type is wanted.
`parse_request` checks a `PUT /v1/subscription` body and names each bad field by JSON pointer;
the URL's form and addresses are `urls.py`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from services.common.portal_keys import SOURCE_PATTERN

# The outcome prefixes a portal hears every event of, and the one dossier type it hears.
PREFIXES: frozenset[str] = frozenset({"payment", "postal", "sms"})
DOSSIER_TYPES: frozenset[str] = frozenset({"dossier.overdue"})
MAX_TYPES = 64
_TYPE = re.compile(r"[a-z][a-z_]{0,63}\.(\*|[a-z][a-z_]{0,63})")
# What `type_problems` accepts of one entry, as a JSON Schema pattern for the documents.
_HEARD = "|".join(sorted(PREFIXES))
TYPE_ENTRY_PATTERN: Final = (
    rf"^(({_HEARD}|dossier)\.\*|({_HEARD})\.[a-z][a-z_]{{0,63}}|"
    + "|".join(re.escape(t) for t in sorted(DOSSIER_TYPES))
    + ")$"
)


def deliverable(event_type: str) -> bool:
    """Whether a portal can hear events of this type at all."""
    prefix, _, _ = event_type.partition(".")
    return prefix in PREFIXES or event_type in DOSSIER_TYPES


def matches(types: Sequence[str], event_type: str) -> bool:
    """Whether a subscription's `types` want `event_type` (exact, or `prefix.*`)."""
    if not deliverable(event_type):
        return False
    prefix = event_type.partition(".")[0]
    return any(t == event_type or t == f"{prefix}.*" for t in types)


@dataclass(frozen=True)
class Subscription:
    """A portal's subscription as stored (its secret included: the service signs with it)."""

    source: str
    url: str
    types: tuple[str, ...]
    secret: str
    at: datetime

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "source": self.source,
                "url": self.url,
                "types": list(self.types),
                "secret": self.secret,
                "at": self.at.isoformat(),
            }
        )

    def shown(self, *, with_secret: bool) -> dict[str, Any]:
        """The subscription as its portal sees it: `{url, types}` (and `secret` on a put)."""
        out: dict[str, Any] = {"url": self.url, "types": list(self.types)}
        if with_secret:
            out["secret"] = self.secret
        return out


class InvalidSubscription(ValueError):
    """A record of `portal.subscriptions` that is not one this module wrote."""


def decode(kafka_key: bytes | None, value: bytes) -> Subscription:
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidSubscription("not JSON") from exc
    if not isinstance(raw, dict):
        raise InvalidSubscription("not a JSON object")
    source, url, types, secret, at = (
        raw.get(k) for k in ("source", "url", "types", "secret", "at")
    )
    if not isinstance(source, str) or not SOURCE_PATTERN.fullmatch(source):
        raise InvalidSubscription("source is not a portal's source")
    if kafka_key is not None and kafka_key != source.encode():
        raise InvalidSubscription("the record's Kafka key is not its source")
    if not isinstance(url, str) or not url:
        raise InvalidSubscription("url is missing")
    if not isinstance(types, list) or type_problems(types):
        raise InvalidSubscription("types are not valid")
    if not isinstance(secret, str) or len(secret) < 16:
        raise InvalidSubscription("secret is missing or short")
    try:
        when = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidSubscription("at is not an RFC 3339 time with an offset")
    return Subscription(source, url, tuple(types), secret, when)


def type_problems(types: object) -> list[tuple[str, str]]:
    """(JSON pointer, problem) for each bad entry of `types`; empty when all are valid."""
    if not isinstance(types, list):
        return [("/types", "types must be a list of event types or prefix.* patterns")]
    if not types:
        return [("/types", "types must name at least one event type")]
    if len(types) > MAX_TYPES:
        return [("/types", f"types may hold at most {MAX_TYPES} entries")]
    problems: list[tuple[str, str]] = []
    for i, entry in enumerate(types):
        where = f"/types/{i}"
        if not isinstance(entry, str) or not _TYPE.fullmatch(entry):
            problems.append((where, "must be an event type (payment.succeeded) or prefix.*"))
            continue
        prefix, _, rest = entry.partition(".")
        if rest == "*":
            if prefix not in PREFIXES and prefix != "dossier":
                problems.append((where, f"{entry}: portals hear payment, postal, sms, dossier"))
        elif not deliverable(entry):
            problems.append(
                (
                    where,
                    f"{entry}: not a type portals hear (payment.*, postal.*, sms.*, "
                    "dossier.overdue)",
                )
            )
    return problems


@dataclass(frozen=True)
class Request:
    """A valid `PUT /v1/subscription` body (the URL's form only; addresses are checked next)."""

    url: str
    types: tuple[str, ...]


def parse_request(body: object) -> Request | list[tuple[str, str]]:
    """The request, or (JSON pointer, problem) for each bad field."""
    if not isinstance(body, dict):
        return [("", 'the body must be a JSON object {"url": ..., "types": [...]}')]
    problems: list[tuple[str, str]] = []
    url = body.get("url")
    if not isinstance(url, str) or not url:
        problems.append(("/url", "url is required: the https URL to call back"))
    problems.extend(type_problems(body.get("types")))
    unknown = sorted(set(body) - {"url", "types"})
    problems.extend((f"/{name}", "unknown field") for name in unknown)
    if problems:
        return problems
    assert isinstance(url, str)
    types = body["types"]
    return Request(url, tuple(dict.fromkeys(types)))
