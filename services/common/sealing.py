"""Personal data sealed with a key of its dossier (CONTRACT section 10).

Every dossier has a data key of its own (32 random bytes). The personal fields of its events
(`PERSONAL_FIELDS`) are sealed with it, so destroying the key erases them wherever a copy lies
(topics, changelogs, dead letters). The data key is stored only wrapped by a key-encryption key
(KEK) of `MOTCUA_KEK`: several KEKs may be active at once (rotation); the first one wraps, any
listed one unwraps.

- **Wrapping** a data key: AES-256-GCM under the KEK, a random 96-bit nonce, the dossier id as
  associated data (a wrapped key copied to another dossier does not unwrap).
- **Sealing** a field: AES-256-GCM-SIV (RFC 8452, nonce-misuse resistant) under the data key,
  the associated data `<dossier id>\\0<field>` and a nonce derived from it. Sealing is
  deterministic: the same value of the same field of the same dossier seals to the same text, so
  a portal's resent event is published with the same bytes (intake's ledger tells a duplicate
  from a conflict by those bytes) and a redelivered input gives the same outputs. Equal values
  within one dossier's field are the only thing this reveals. A sealed value moved to another
  dossier or field does not open.

A sealed value is a string `sealed:v1:<base64url of nonce + ciphertext>`; the value sealed is
the field's JSON (a string, or an address object). Anything altered raises `Tampered`.
No I/O here: the key store (`services.common.data_keys`) reads and writes the keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV

SEALED_PREFIX: Final = "sealed:v1:"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
# The longest plain value sealed: an address as an object is at most 2,000 bytes of JSON, as
# text 500 characters (at most 4 bytes each, and quoted); a name 256 characters.
PLAIN_MAX: Final = 4096
SEALED_MAX: Final = len(SEALED_PREFIX) + (NONCE_BYTES + PLAIN_MAX + TAG_BYTES + 2) // 3 * 4

# The personal fields of `dossier.submitted`'s `data` (CONTRACT section 10), as (section, field).
PERSONAL_FIELDS: Final = (
    ("applicant", "name"),
    ("applicant", "phone"),
    ("applicant", "email"),
    ("applicant", "address"),
    ("postal", "address"),
)


class SealingError(ValueError):
    """Base of what goes wrong opening sealed data or keys."""


class Tampered(SealingError):
    """A sealed value or a wrapped key was altered, moved to another dossier or field, or sealed
    under another key."""


class UnknownKek(SealingError):
    """A wrapped key names a KEK that `MOTCUA_KEK` does not list (any more)."""


class InvalidKekList(ValueError):
    """`MOTCUA_KEK` is not a list of `id:base64 key` with 32-byte keys and distinct ids."""


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


# --- key-encryption keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class WrappedKey:
    """A dossier's data key as stored: the KEK that wrapped it, and nonce + ciphertext."""

    kek_id: str
    blob: bytes

    def encode(self) -> bytes:
        return orjson.dumps(
            {"kek": self.kek_id, "key": base64.urlsafe_b64encode(self.blob).decode()}
        )

    @classmethod
    def decode(cls, raw: bytes) -> WrappedKey:
        try:
            value = orjson.loads(raw)
            kek, key = value["kek"], value["key"]
            if not isinstance(kek, str) or not isinstance(key, str):
                raise TypeError("kek and key must be strings")
            return cls(kek, base64.urlsafe_b64decode(key.encode()))
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
            raise Tampered(f"not a wrapped key: {type(exc).__name__}") from None


class Keks:
    """The active key-encryption keys, newest first: the first wraps, every one unwraps."""

    def __init__(self, keks: Mapping[str, bytes]) -> None:
        if not keks:
            raise InvalidKekList("at least one KEK is needed")
        for kek_id, key in keks.items():
            if len(key) != KEY_BYTES:
                raise InvalidKekList(f"KEK {kek_id!r} must be {KEY_BYTES} bytes")
        self._keks = {kek_id: AESGCM(key) for kek_id, key in keks.items()}
        self.wrapping_id = next(iter(keks))

    @classmethod
    def parse(cls, text: str) -> Keks:
        """`id:base64key,id:base64key,...`, newest first (standard or URL-safe base64)."""
        keks: dict[str, bytes] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            kek_id, sep, encoded = part.partition(":")
            kek_id = kek_id.strip()
            if not sep or not kek_id:
                raise InvalidKekList("each KEK is `id:base64 key`")
            if kek_id in keks:
                raise InvalidKekList(f"KEK id {kek_id!r} is listed twice")
            try:
                key = base64.b64decode(encoded.strip().replace("-", "+").replace("_", "/"))
            except binascii.Error:
                raise InvalidKekList(f"KEK {kek_id!r} is not base64") from None
            keks[kek_id] = key
        return cls(keks)

    @property
    def ids(self) -> list[str]:
        return list(self._keks)

    def wrap(self, dossier_id: str, data_key: bytes) -> WrappedKey:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keks[self.wrapping_id].encrypt(nonce, data_key, dossier_id.encode())
        return WrappedKey(self.wrapping_id, nonce + sealed)

    def unwrap(self, dossier_id: str, wrapped: WrappedKey) -> bytes:
        aead = self._keks.get(wrapped.kek_id)
        if aead is None:
            raise UnknownKek(f"KEK {wrapped.kek_id!r} is not active")
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            key = aead.decrypt(nonce, sealed, dossier_id.encode())
        except (InvalidTag, ValueError):
            raise Tampered(f"the data key of dossier {dossier_id!r} does not unwrap") from None
        if len(key) != KEY_BYTES:
            raise Tampered(f"the data key of dossier {dossier_id!r} has the wrong length")
        return key


# --- fields ----------------------------------------------------------------------------------


_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")  # base64 to its URL-safe alphabet


def _associated(dossier_id: str, field: str) -> bytes:
    return f"{dossier_id}\x00{field}".encode()


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def seal(data_key: bytes, dossier_id: str, field: str, value: Any) -> str:
    """`value` (JSON-serialisable) sealed for `field` of `dossier_id`."""
    return _seal_with(AESGCMSIV(data_key), dossier_id, field, value)


def _seal_with(aead: AESGCMSIV, dossier_id: str, field: str, value: Any) -> str:
    plain = orjson.dumps(value)
    if len(plain) > PLAIN_MAX:
        raise ValueError(f"{field} is over {PLAIN_MAX} bytes of JSON")
    associated = _associated(dossier_id, field)
    nonce = hashlib.sha256(associated).digest()[:NONCE_BYTES]
    sealed = aead.encrypt(nonce, plain, associated)
    encoded = binascii.b2a_base64(nonce + sealed, newline=False).translate(_URLSAFE)
    return SEALED_PREFIX + encoded.rstrip(b"=").decode()


def unseal(data_key: bytes, dossier_id: str, field: str, sealed: str) -> Any:
    """The value `seal` sealed; `Tampered` if it was altered, moved or is not a sealed value."""
    if not is_sealed(sealed):
        raise Tampered(f"{field} is not a sealed value")
    body = sealed[len(SEALED_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise Tampered(f"{field} is not valid base64") from None
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != body:  # unused bits set: altered
        raise Tampered(f"{field} is not canonical base64")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise Tampered(f"{field} is too short to be sealed")
    nonce, ciphertext = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
    try:
        plain = AESGCMSIV(data_key).decrypt(nonce, ciphertext, _associated(dossier_id, field))
    except (InvalidTag, ValueError):
        raise Tampered(f"{field} of dossier {dossier_id!r} does not open") from None
    return orjson.loads(plain)


def field_name(section: str, name: str) -> str:
    return f"{section}.{name}"


def personal_values(data: Mapping[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(section, field, value) of every personal field present (not null) in a
    `dossier.submitted`'s `data`."""
    for section, name in PERSONAL_FIELDS:
        part = data.get(section)
        if isinstance(part, Mapping) and part.get(name) is not None:
            yield section, name, part[name]


def has_personal_data(data: Mapping[str, Any]) -> bool:
    return next(personal_values(data), None) is not None


# `PERSONAL_FIELDS` by section: (section, ((name, field name), ...)).
_BY_SECTION: Final = tuple(
    (section, tuple((n, field_name(s, n)) for s, n in PERSONAL_FIELDS if s == section))
    for section in dict.fromkeys(s for s, _ in PERSONAL_FIELDS)
)


def seal_data(data: Mapping[str, Any], data_key: bytes) -> dict[str, Any]:
    """A copy of a `dossier.submitted`'s `data` with every personal field sealed (a field sealed
    already is sealed again: whatever a portal sends is the applicant's value)."""
    dossier_id = str(data["dossier_id"])
    aead = AESGCMSIV(data_key)  # one cipher for every field of the dossier
    sealed = dict(data)
    for section, names in _BY_SECTION:  # each section copied once, if it has a field to seal
        part = data.get(section)
        if not isinstance(part, Mapping):
            continue
        copy: dict[str, Any] | None = None
        for name, field in names:
            value = part.get(name)
            if value is not None:
                if copy is None:
                    copy = sealed[section] = dict(part)
                copy[name] = _seal_with(aead, dossier_id, field, value)
    return sealed


def unseal_data(data: Mapping[str, Any], data_key: bytes) -> dict[str, Any]:
    """A copy of a sealed `data` with every personal field opened; `Tampered` for one that does
    not open."""
    dossier_id = str(data["dossier_id"])
    opened = dict(data)
    for section, name, value in personal_values(data):
        part = dict(opened[section])
        part[name] = unseal(data_key, dossier_id, field_name(section, name), value)
        opened[section] = part
    return opened


class KeyBook:
    """Sealing for a producer that writes `dossier.events` itself instead of posting to intake
    (benchmarks, tests): a new data key per dossier, the `dossier.keys` records to write before
    the events (`take_records`), and each event's personal fields sealed as intake seals them."""

    def __init__(self, keks: Keks) -> None:
        self.keks = keks
        self.data_keys: dict[str, bytes] = {}
        self._records: list[tuple[bytes, bytes]] = []

    def key_of(self, dossier_id: str) -> bytes:
        key = self.data_keys.get(dossier_id)
        if key is None:
            key = self.data_keys[dossier_id] = new_data_key()
            wrapped = self.keks.wrap(dossier_id, key)
            self._records.append((dossier_id.encode(), wrapped.encode()))
        return key

    def seal_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A CloudEvent (as JSON values) with its personal fields sealed, if it has any."""
        sealed = dict(event)
        data = event.get("data")
        personal = isinstance(data, Mapping) and has_personal_data(data)
        if event.get("type") == "dossier.submitted" and personal:
            assert isinstance(data, Mapping)
            sealed["data"] = seal_data(data, self.key_of(str(data["dossier_id"])))
        return sealed

    def take_records(self) -> list[tuple[bytes, bytes]]:
        """The (dossier id, wrapped key) records made since the last call, for `dossier.keys`."""
        records, self._records = self._records, []
        return records
