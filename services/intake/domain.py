"""Intake's rules, free of I/O: reading a batch, naming every bad field, deciding duplicates.

What a portal may post is what every consumer can handle: the event models bound every known
field (`services.common.events`), and intake adds the one rule that needs the clock, passed in as
`now`: every timestamp of an event lies between `EARLIEST` and `now + HORIZON`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import orjson
from pydantic import BaseModel

from services.common.events import (
    CloudEvent,
    FieldError,
    InvalidEvent,
    content_of,
    json_pointer,
    parse_event,
)

MAX_BATCH = 500
# The window of every timestamp a portal may post (`time` and each one in `data`).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
HORIZON = timedelta(days=3653)  # ten years ahead of the clock

# What a portal may publish: every dossier event but the one motcua itself detects.
PORTAL_TYPES = frozenset(
    {
        "dossier.submitted",
        "dossier.received",
        "dossier.rejected",
        "dossier.supplement_requested",
        "dossier.supplement_received",
        "dossier.transferred",
        "dossier.resolved",
        "dossier.apology_issued",
        "dossier.result_returned",
        "dossier.withdrawn",
    }
)


@dataclass(frozen=True)
class EventError:
    """One bad field of one event of the request: `index` in the batch, `pointer` in the event."""

    index: int
    pointer: str
    detail: str

    def as_problem_item(self) -> dict[str, Any]:
        return {"index": self.index, "pointer": self.pointer, "detail": self.detail}


# What a body may be, by its Content-Type (parameters aside; a charset, if any, is UTF-8).
JSON_MEDIA_TYPES = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)


def unsupported_media_type(content_type: str | None) -> str | None:
    """Why a body of this Content-Type is not read (the 415's detail), or None when it is JSON."""
    expected = ", ".join(JSON_MEDIA_TYPES)
    if content_type is None or not content_type.strip():
        return f"a Content-Type is required: one of {expected}"
    media_type, *params = (part.strip() for part in content_type.split(";"))
    if media_type.lower() not in JSON_MEDIA_TYPES:
        return f"Content-Type {media_type[:100]!r} is not JSON; expected one of {expected}"
    for param in params:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"charset {charset[:40]!r} is not supported; JSON is read as UTF-8"
    return None


class BatchInvalid(Exception):
    def __init__(self, errors: Sequence[EventError], detail: str) -> None:
        super().__init__(detail)
        self.errors = list(errors)
        self.detail = detail


def read_batch(body: bytes, *, now: datetime) -> list[CloudEvent[Any]]:
    """Parse a request body (one envelope or an array of at most 500) or say all that is wrong;
    `now` (aware) bounds the timestamps (`out_of_window`)."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BatchInvalid(
            [EventError(0, "", f"malformed JSON: {exc}")], "malformed JSON"
        ) from None
    items: list[Any] = value if isinstance(value, list) else [value]
    if not items:
        raise BatchInvalid([EventError(0, "", "the batch is empty")], "empty batch")
    if len(items) > MAX_BATCH:
        raise BatchInvalid(
            [EventError(MAX_BATCH, "", f"a batch holds at most {MAX_BATCH} events")],
            f"{len(items)} events in one batch; at most {MAX_BATCH}",
        )
    events: list[CloudEvent[Any]] = []
    errors: list[EventError] = []
    for index, item in enumerate(items):
        try:
            # The trace context of an accepted event is the request's (`traceparent` header),
            # stamped at publication: a portal's own tracing attributes are not kept.
            content = content_of(item) if isinstance(item, dict) else item
            event = parse_event(content, allowed_types=PORTAL_TYPES)
        except InvalidEvent as exc:
            errors.extend(_at(index, exc.errors))
            continue
        errors.extend(_at(index, out_of_window(event, now)))
        events.append(event)
    if errors:
        bad = len({e.index for e in errors})
        raise BatchInvalid(errors, f"{bad} of {len(items)} events are invalid; none was published")
    return events


def _at(index: int, errors: Sequence[FieldError]) -> list[EventError]:
    return [EventError(index, e.pointer, e.detail) for e in errors]


def out_of_window(event: CloudEvent[Any], now: datetime) -> list[FieldError]:
    """Each timestamp of `event` (`time`, and every one its `data` model parsed) before
    `EARLIEST` or after `now + HORIZON`: the consumers compute days, deadlines and buckets from
    them, which a year 1 or 9999 overflows."""
    latest = now + HORIZON
    outside: list[tuple[tuple[str, ...], datetime]] = []
    _collect_outside(event, (), latest, outside)
    return [
        FieldError(
            pointer=json_pointer(loc),
            detail=f"{moment.isoformat()} is outside {EARLIEST.isoformat()} .. "
            f"{latest.isoformat(timespec='seconds')} (now + 10 years)",
        )
        for loc, moment in outside
    ]


def _collect_outside(
    model: BaseModel,
    loc: tuple[str, ...],
    latest: datetime,
    outside: list[tuple[tuple[str, ...], datetime]],
) -> None:
    """Every datetime of a validated model outside the window, nested models included (extra
    fields are kept as JSON values, never datetimes). On intake's hot path: no generators, and
    a location is built only for a nested model or a value outside."""
    for name, value in model.__dict__.items():
        if isinstance(value, str):
            continue
        if isinstance(value, datetime):
            if not EARLIEST <= value <= latest:
                outside.append(((*loc, name), value))
        elif isinstance(value, BaseModel):
            _collect_outside(value, (*loc, name), latest, outside)


def foreign_sources(events: Sequence[CloudEvent[Any]], own_source: str) -> list[EventError]:
    """Events a portal may not publish: those whose `source` is not its own."""
    return [
        EventError(i, "/source", f"this key may publish only source {own_source!r}")
        for i, e in enumerate(events)
        if e.source != own_source
    ]


def canonical_json(event: CloudEvent[Any]) -> bytes:
    """The event as published: sorted keys, no whitespace, so equal events are equal bytes."""
    return canonical_bytes(event.to_dict())


def canonical_bytes(value: Mapping[str, Any]) -> bytes:
    """`canonical_json` of an event given as JSON values (`CloudEvent.to_dict`)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def digest_of(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def traced_bytes(canonical: bytes, attributes: Mapping[str, str] | None) -> bytes:
    """An event's canonical bytes with the tracing attributes of its publication (the same
    bytes without any); its content, and so its digest, is that of `canonical`."""
    if not attributes:
        return canonical
    return canonical_bytes({**content_of(orjson.loads(canonical)), **attributes})


def content_digest(published: bytes, value: Mapping[str, Any]) -> str:
    """The digest of an event's content as intake published it (`value`: its JSON values):
    that of its canonical bytes without the tracing attributes."""
    if "traceparent" in value or "tracestate" in value:
        return digest_of(canonical_bytes(content_of(dict(value))))
    return digest_of(published)


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Candidate:
    index: int
    key: str
    digest: str
    event: CloudEvent[Any]


@dataclass
class Triage:
    """A batch sorted against what was seen before: publish `new`, count `duplicates`."""

    new: list[Candidate] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[EventError] = field(default_factory=list)


def triage(candidates: Sequence[Candidate], seen: Mapping[str, str]) -> Triage:
    """Sort candidates against `seen` (key → content hash) and against each other.

    The same (source, id) with the same content is a duplicate, with other content a conflict,
    whether it was seen in an earlier request or earlier in this batch.
    """
    result = Triage()
    first_in_batch: dict[str, str] = {}
    for candidate in candidates:
        earlier = seen.get(candidate.key, first_in_batch.get(candidate.key))
        if earlier is None:
            first_in_batch[candidate.key] = candidate.digest
            result.new.append(candidate)
        elif earlier == candidate.digest:
            result.duplicates += 1
        else:
            result.conflicts.append(
                EventError(
                    candidate.index,
                    "/id",
                    f"event id {candidate.event.id!r} of {candidate.event.source!r} was already "
                    "accepted with different content",
                )
            )
    return result
