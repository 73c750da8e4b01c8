"""Portal keys that change without a restart: pure rules, no I/O.

The keys intake accepts are those of `MOTCUA_PORTALS` (the settings) and those on the compacted
topic `portal.keys`, where each record is keyed by its key id and holds
`{source, key_id, key_sha256, state, at}` (`state` `active` or `revoked`): only hashes, never a
key. Every key has a key id derived from its hash (`key_id_of`: its first 12 hex characters), so
a key of the settings can be revoked on the topic like any other.

`fold(static, records)` is the table of keys (`KeyTable`): the settings' keys first, then each
record of the topic in order, the latest record of a key id replacing what was known of it.
`KeyTable.find(digest)` answers which portal a key's SHA-256 belongs to while it is active.
`decide_add` and `decide_revoke` turn an operator's request into the record to write, or a
refusal, as values; the shell (services/intake) writes the record and folds it in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

from services.common.settings import Portal

KeyState = Literal["active", "revoked"]
Origin = Literal["settings", "portal.keys"]
STATES: frozenset[str] = frozenset({"active", "revoked"})
KEY_ID_LENGTH = 12
# A source a portal may own: what CloudEvents' `source` of its events will be (`portal/dvc-...`).
SOURCE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")
# Sources the services publish under themselves (`motcua/metrics`, ...): never a portal's.
RESERVED_PREFIX = "motcua/"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def key_id_of(key_sha256: str) -> str:
    """A key's id: the first 12 hex characters of its SHA-256 (what `motcua hash-key` prints)."""
    return key_sha256[:KEY_ID_LENGTH]


@dataclass(frozen=True)
class KeyRecord:
    """One record of `portal.keys` (its Kafka key is `key_id`)."""

    source: str
    key_id: str
    key_sha256: str
    state: KeyState
    at: datetime

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "source": self.source,
                "key_id": self.key_id,
                "key_sha256": self.key_sha256,
                "state": self.state,
                "at": self.at.isoformat(),
            }
        )


class InvalidRecord(ValueError):
    """A record of `portal.keys` that is not one this module wrote."""


def decode_record(kafka_key: bytes | None, value: bytes) -> KeyRecord:
    """The record `value` under `kafka_key`; `InvalidRecord` if it is not a valid one."""
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord("not JSON") from exc
    if not isinstance(raw, dict):
        raise InvalidRecord("not a JSON object")
    source, key_id, digest, state, at = (
        raw.get(name) for name in ("source", "key_id", "key_sha256", "state", "at")
    )
    if not isinstance(source, str) or not SOURCE_PATTERN.fullmatch(source):
        raise InvalidRecord("source is not a portal's source")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise InvalidRecord("key_sha256 is not a SHA-256 in lower-case hex")
    if not isinstance(key_id, str) or key_id != key_id_of(digest):
        raise InvalidRecord("key_id is not the key's id")
    if kafka_key is not None and kafka_key != key_id.encode():
        raise InvalidRecord("the record's Kafka key is not its key_id")
    if state not in STATES:
        raise InvalidRecord("state is neither active nor revoked")
    try:
        when = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidRecord("at is not an RFC 3339 time with an offset")
    return KeyRecord(source, key_id, digest, state, when)


@dataclass(frozen=True)
class KeyEntry:
    """What is known of one key: the latest record of its id, or its `MOTCUA_PORTALS` entry."""

    source: str
    key_id: str
    key_sha256: str
    state: KeyState
    at: datetime | None
    origin: Origin

    def listed(self) -> dict[str, Any]:
        """The entry as an operator sees it: never its hash."""
        return {
            "source": self.source,
            "key_id": self.key_id,
            "state": self.state,
            "at": self.at.isoformat() if self.at is not None else None,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class KeyTable:
    """Every key ever known (by key id) and, derived, the active ones by hash."""

    entries: Mapping[str, KeyEntry]
    # The settings' portals by source: their rate and burst hold for every key of that source.
    configured: Mapping[str, Portal]
    _active: dict[str, Portal] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        active = {
            entry.key_sha256: self.portal_of(entry)
            for entry in self.entries.values()
            if entry.state == "active"
        }
        object.__setattr__(self, "_active", active)

    def portal_of(self, entry: KeyEntry) -> Portal:
        """The portal a key opens: the settings' rate and burst for a configured source, the
        defaults of `Portal` otherwise."""
        configured = self.configured.get(entry.source)
        if configured is None:
            return Portal(source=entry.source, key_sha256=entry.key_sha256)
        return configured.model_copy(update={"key_sha256": entry.key_sha256})

    def limits(self, source: str) -> tuple[float, int]:
        """The rate (per second) and burst of `source`'s bucket."""
        portal = self.configured.get(source) or Portal(source=source, key_sha256="")
        return portal.rate_per_second, portal.burst

    def find(self, key_sha256: str) -> Portal | None:
        """The portal whose active key hashes to `key_sha256`, None for any other.

        A dictionary lookup: its timing can only tell about SHA-256 digests of the caller's own
        guesses, which says nothing of any key."""
        return self._active.get(key_sha256)

    def active_keys(self, source: str) -> list[KeyEntry]:
        return [e for e in self.entries.values() if e.source == source and e.state == "active"]

    def with_record(self, record: KeyRecord) -> KeyTable:
        """The table once `record` is folded in: it replaces what was known of its key id."""
        return KeyTable({**self.entries, record.key_id: _entry(record)}, self.configured)

    def listing(self) -> list[dict[str, Any]]:
        """Every key, by source then by key id; no hash."""
        ordered = sorted(self.entries.values(), key=lambda e: (e.source, e.key_id))
        return [entry.listed() for entry in ordered]

    @property
    def active_count(self) -> int:
        return len(self._active)


def static_table(portals: Sequence[Portal]) -> KeyTable:
    """The table of the settings' keys alone (each active, its id derived from its hash)."""
    entries = {
        key_id_of(p.key_sha256): KeyEntry(
            p.source, key_id_of(p.key_sha256), p.key_sha256, "active", None, "settings"
        )
        for p in portals
    }
    configured: dict[str, Portal] = {}
    for portal in portals:
        configured.setdefault(portal.source, portal)
    return KeyTable(entries, configured)


def fold(static: Sequence[Portal], records: Iterable[KeyRecord]) -> KeyTable:
    """The settings' keys, then the topic's records in order (the latest of a key id wins)."""
    table = static_table(static)
    entries = dict(table.entries)
    for record in records:
        entries[record.key_id] = _entry(record)
    return KeyTable(entries, table.configured)


def _entry(record: KeyRecord) -> KeyEntry:
    return KeyEntry(
        record.source, record.key_id, record.key_sha256, record.state, record.at, "portal.keys"
    )


# --- operators' requests --------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A request refused: the HTTP status and a detail that names what is wrong."""

    status: int
    title: str
    detail: str


def source_problem(source: str) -> str | None:
    """Why `source` cannot be a portal's source, None if it can."""
    if not SOURCE_PATTERN.fullmatch(source):
        return (
            "source must be 1 to 200 characters: letters, digits and . _ : / -, "
            "starting with a letter or digit (for example portal/dvc-khanhhoa)"
        )
    if source.startswith(RESERVED_PREFIX):
        return f"sources under {RESERVED_PREFIX} are motcua's own, never a portal's"
    return None


def decide_add(
    table: KeyTable, source: str, *, rotate: bool, key_sha256: str, at: datetime
) -> KeyRecord | Refusal:
    """The record that adds the key hashing to `key_sha256` to `source`, or why not.

    `add` (rotate False) refuses a source that has an active key already; `rotate` adds a key
    to a source that has one, which stays valid until it is revoked."""
    problem = source_problem(source)
    if problem is not None:
        return Refusal(422, "Invalid source", problem)
    active = table.active_keys(source)
    if active and not rotate:
        ids = ", ".join(sorted(e.key_id for e in active))
        return Refusal(
            409,
            "Conflict",
            f"{source} has an active key already ({ids}); rotate to add a second one",
        )
    if rotate and not active:
        return Refusal(404, "Not Found", f"{source} has no active key to rotate; add one first")
    key_id = key_id_of(key_sha256)
    if key_id in table.entries:
        return Refusal(409, "Conflict", f"key id {key_id} is taken; make another key")
    return KeyRecord(source, key_id, key_sha256, "active", at)


def decide_revoke(table: KeyTable, key_id: str, *, at: datetime) -> KeyRecord | Refusal | KeyEntry:
    """The record that revokes `key_id`; the entry itself when it is revoked already (nothing to
    write); a 404 refusal for an id never issued."""
    entry = table.entries.get(key_id)
    if entry is None:
        return Refusal(404, "Not Found", f"no portal key has the id {key_id}")
    if entry.state == "revoked":
        return entry
    return KeyRecord(entry.source, entry.key_id, entry.key_sha256, "revoked", at)
