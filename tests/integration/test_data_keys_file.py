"""The data keys kept in a file of the process's data directory (services/common/data_keys.py,
key_file.py): a process started again reads `dossier.keys` on from where its file stands, and a
file the topic does not match (a broker started again empty at the same address) is read again
from the beginning. The real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.data_keys import DataKeys, KeyErased
from services.common.kafka import ensure_topics
from services.common.sealing import Keks, KeyBook
from services.common.settings import DEV_KEK
from services.common.topics import DOSSIER_KEYS, dossier_keys_spec
from services.dev.embedded import Broker, free_port
from tests.support.kafka import produce

pytestmark = pytest.mark.integration

KEKS = Keks.parse(DEV_KEK)
PARTITIONS = 2


class Counted(DataKeys):
    """Data keys that count the records they read."""

    read_records = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        self.read_records += 1
        super().apply(key, value)


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    broker = Broker(port=free_port()).start()
    try:
        asyncio.run(ensure_topics(broker.bootstrap, [dossier_keys_spec(PARTITIONS)]))
        yield broker
    finally:
        broker.stop()


async def write_keys(broker: Broker, book: KeyBook, dossier_ids: list[str]) -> None:
    for dossier_id in dossier_ids:
        book.key_of(dossier_id)
    await produce(broker.bootstrap, DOSSIER_KEYS, book.take_records())


async def followed(broker: Broker, directory: Path) -> tuple[Counted, asyncio.Task[None]]:
    keys = Counted(
        broker.bootstrap, KEKS, partitions=PARTITIONS, directory=directory, source="test"
    )
    task = asyncio.create_task(keys.follow())
    await asyncio.wait_for(keys.wait_read(), 30)
    return keys, task


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_process_started_again_reads_only_what_was_written_since(
    own_broker: Broker, tmp_path: Path
) -> None:
    book = KeyBook(KEKS)
    first_ids = [f"D{n}" for n in range(20)]
    await write_keys(own_broker, book, first_ids)
    keys, task = await followed(own_broker, tmp_path)
    assert keys.read_records == 20
    expected = {d: book.key_of(d) for d in first_ids}
    assert all([await keys.data_key(d) == key for d, key in expected.items()])
    await stopped(task)

    await write_keys(own_broker, book, ["D20", "D21"])
    await produce(own_broker.bootstrap, DOSSIER_KEYS, [(b"D0", b"")])  # D0's erasure
    again, task = await followed(own_broker, tmp_path)
    try:
        assert again.read_records == 3, "the file's records were read again"
        assert again.erased("D0")
        with pytest.raises(KeyErased):
            await again.data_key("D0")
        for dossier_id in [*first_ids[1:], "D20", "D21"]:
            assert await again.data_key(dossier_id) == book.key_of(dossier_id)
    finally:
        await stopped(task)


async def test_a_broker_started_again_empty_is_read_from_its_beginning(
    own_broker: Broker, tmp_path: Path
) -> None:
    book = KeyBook(KEKS)
    await write_keys(own_broker, book, ["OLD0", "OLD1", "OLD2"])
    keys, task = await followed(own_broker, tmp_path)
    assert "OLD1" in keys
    await stopped(task)

    own_broker.stop()
    own_broker.start()  # the same address, nothing kept
    await ensure_topics(own_broker.bootstrap, [dossier_keys_spec(PARTITIONS)])
    new_ids = [f"NEW{n}" for n in range(8)]  # more records than the file read
    await write_keys(own_broker, book, new_ids)
    again, task = await followed(own_broker, tmp_path)
    try:
        assert again.read_records == 8
        assert all(d in again for d in new_ids)
        assert not any(d in again for d in ("OLD0", "OLD1", "OLD2"))
    finally:
        await stopped(task)
