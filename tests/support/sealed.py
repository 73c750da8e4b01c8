"""Writing `dossier.events` directly as intake would (CONTRACT section 10): each dossier's data
key on `dossier.keys` first, the personal fields sealed (`sealing.KeyBook`), with the KEKs of
`MOTCUA_KEK` (the dev KEK by default), which the services of the same environment read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from services.common.changelog import read_latest
from services.common.sealing import Keks, KeyBook, WrappedKey, has_personal_data, unseal_data
from services.common.settings import Settings
from services.common.topics import DOSSIER_KEYS

BOOK = KeyBook(Keks.parse(Settings().kek))


async def sealed(
    producer: AIOKafkaProducer, events: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`events` with their personal fields sealed; the keys they need written (acks as the
    producer's) and flushed before this returns, so the events may follow."""
    out = [BOOK.seal_event(event) for event in events]
    records = BOOK.take_records()
    for key, value in records:
        await producer.send(DOSSIER_KEYS, value, key=key)
    if records:
        await producer.flush()
    return out


async def opened(bootstrap: str, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`events` with the personal fields of their `data` opened with the dossiers' keys on
    `dossier.keys` (what a test expects from them is computed on the clear values); an event
    whose dossier has no key is left as it is."""
    keys = await read_latest(bootstrap, DOSSIER_KEYS)
    keks = Keks.parse(Settings().kek)
    out: list[dict[str, Any]] = []
    for event in events:
        data = event.get("data")
        wrapped = keys.get(str(event.get("subject", "")).encode())
        if isinstance(data, dict) and wrapped is not None and has_personal_data(data):
            data_key = keks.unwrap(str(event["subject"]), WrappedKey.decode(wrapped))
            event = {**event, "data": unseal_data(data, data_key)}
        out.append(event)
    return out
