"""The dossiers' data keys, read from `dossier.keys` (CONTRACT section 10).

`dossier.keys` is compacted: key = dossier id, value = the dossier's data key wrapped by a KEK
(`sealing.WrappedKey`); a tombstone is the erasure of the dossier's personal data. Every process
that opens a personal field (intake, SMS for the phone, postal for the address) follows the topic
whole with one `DataKeys` (a task of its lifespan or app). The wrapped keys are held in a file
of the process's data directory (`key_file.KeyFile`), not in memory, and read on from where the
file stands when the process starts again; a key is unwrapped only for the call that needs it,
never kept in clear.

A dossier not seen yet may only be behind: `data_key` reads the topic to its end offsets (taken
at the call) before it concludes that the dossier has no key. A dossier whose tombstone was
compacted away (or is older than the latest erasures kept) is indistinguishable from one that
never had a key: either way its sealed fields do not open (`KeyErased`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from services.common.following import CompactedView, Mark, NotReadToNow, Record
from services.common.kept_json import right_sized
from services.common.key_file import ERASED, KeyFile
from services.common.logging import get_logger
from services.common.sealing import (
    Keks,
    SealingError,
    Tampered,
    UnknownKek,
    WrappedKey,
    is_sealed,
    unseal,
)
from services.common.settings import Settings
from services.common.topics import dossier_keys_spec

log = get_logger("motcua.data_keys")

CATCH_UP_SECONDS = 10.0
# Erasures remembered, the latest (a row of the key file each): the retention destroys the key
# of every closed dossier, so keeping them all would grow with the history. Intake, which makes
# the keys, keeps the most: an event of a dossier whose erasure it remembers is refused rather
# than sealed with a new key. A service that only opens fields (SMS, postal) keeps fewer: for an
# erasure it no longer remembers, a call reads the topic to its end before it concludes the key
# is gone, the same answer a little later.
ERASED_KEPT = 200_000
ERASED_KEPT_OPENING = 10_000
# Lookups kept in memory (about 300 bytes each): intake looks a dossier up for every event it
# seals, and a dossier's events come close together; SMS and postal look one up per send or
# booking.
# The tail's records go to the key file once a second, or at once when this many wait.
FLUSH_SECONDS = 1.0
FLUSH_RECORDS = 1_000
CACHED = 20_000
CACHED_OPENING = 2_000

# A data key that is there and does not unwrap: its KEK no longer listed in `MOTCUA_KEK`
# (`unknown_kek`), or the wrapped key altered (`tampered`). Erased keys are not counted.
UNOPENABLE = Counter(
    "motcua_data_keys_unopenable_total", "Data keys that did not unwrap, by reason", ["reason"]
)
for _reason in ("unknown_kek", "tampered"):
    UNOPENABLE.labels(_reason)


class KeyErased(SealingError):
    """The dossier's data key is destroyed (erasure or retention) or was never written: its
    personal data cannot be read any more."""


class KeysUnavailable(TimeoutError):
    """`dossier.keys` could not be read to its end in time (the broker away): retry later."""


class DataKeys(CompactedView):
    """The wrapped data key of every dossier on `dossier.keys`, and the latest erasures."""

    name = "data_keys"

    def __init__(
        self,
        bootstrap: str,
        keks: Keks,
        *,
        partitions: int,
        replication: int = 1,
        # A send or a booking first reads the topic to now (`read_to_now`), which can wait a
        # poll: with 100 ms polls an SMS took 65 ms more at p50 on the embedded broker, with
        # 20 ms polls 12 ms more (bench/sms.py, docs/benchmarks.md).
        poll_ms: int = 20,
        catch_up_seconds: float = CATCH_UP_SECONDS,
        erased_kept: int = ERASED_KEPT,
        cached: int = CACHED,
        flush_seconds: float = FLUSH_SECONDS,
        # where the key file is kept (None: in memory, for tests and tools), and what it is of
        directory: Path | None = None,
        source: str = "",
    ) -> None:
        super().__init__(
            bootstrap,
            dossier_keys_spec(partitions),
            replication=replication,
            poll_ms=poll_ms,
            catch_up_seconds=catch_up_seconds,
        )
        self.keks = keks
        self._flush_seconds = flush_seconds
        self._flushed_at = 0.0
        if directory is None:
            self._file = KeyFile(None, source, erased_kept=erased_kept, cached=cached)
        else:
            self._file = KeyFile.in_directory(
                directory, source, erased_kept=erased_kept, cached=cached
            )

    @classmethod
    def of(
        cls,
        settings: Settings,
        directory: Path,
        *,
        erased_kept: int = ERASED_KEPT,
        cached: int = CACHED,
    ) -> DataKeys:
        """The keys a service's settings name (its broker, `MOTCUA_KEK`, the topics' layout),
        their file under `directory` (the service's data directory)."""
        return cls(
            settings.kafka_bootstrap,
            Keks.parse(settings.kek),
            partitions=settings.topic_partitions,
            replication=settings.topic_replication,
            erased_kept=erased_kept,
            cached=cached,
            directory=directory,
            source=f"{settings.kafka_bootstrap}/{settings.redis_namespace}",
        )

    async def follow(self) -> None:
        """Follow `dossier.keys` for the life of the process (a task of its app); the file is
        closed, and its slot given up, when the task ends."""
        try:
            await super().follow()
        finally:
            self._file.close()

    # --- reading the topic ----------------------------------------------------------------------

    def kept_offsets(self) -> dict[int, Mark]:
        offsets = self._file.offsets()
        log.info("data_keys_reading_on", records_read=sum(o for o, _ in offsets.values()))
        return offsets

    def applied(self, marks: Mapping[int, Mark]) -> None:
        """Into the file, with where the read stands: a catch-up's batches each, and the tail's
        once a second (a transaction per poll would cost more than the keys it writes)."""
        now = time.monotonic()
        if self._file.unflushed >= FLUSH_RECORDS or now - self._flushed_at >= self._flush_seconds:
            self._file.flush(marks)
            self._flushed_at = now

    def forget(self) -> None:
        self._file.forget()

    def reset(self, records: Iterable[Record]) -> None:
        self._file.forget()
        for key, value in records:
            self.apply(key, value)
        self._file.flush()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one record of `dossier.keys` in, as written: a key is decoded and unwrapped only
        when a call opens its dossier's data (one that does not decode is `Tampered` then, and
        counted), so a start with a million keys reads bytes and does nothing more."""
        if key is not None:
            self._file.put(key.decode(errors="replace"), value or ERASED)

    def apply_written(self, dossier_id: str, value: bytes | None) -> None:
        """Fold in what this process has just written for a dossier: its wrapped key
        (`WrappedKey.encode`), or None for its erasure. The key is held as a copy of its own
        size until it is in the file: `orjson.dumps` output keeps the 4 KiB buffer it was
        written in."""
        self._file.put(dossier_id, ERASED if value is None else right_sized(value))

    # --- what is known ------------------------------------------------------------------------

    def __contains__(self, dossier_id: object) -> bool:
        """Whether the dossier's key is there (read or written by this process)."""
        return isinstance(dossier_id, str) and bool(self._file.get(dossier_id))

    def holding(self, dossier_ids: Iterable[str]) -> set[str]:
        """Those of `dossier_ids` whose key is there (many at once)."""
        return self._file.holding(dossier_ids)

    def erased(self, dossier_id: str) -> bool:
        return self._file.get(dossier_id) == ERASED

    @property
    def identity(self) -> str:
        """What the key file holds, named: a new name each time it is read again from the
        beginning (what is kept beside it must then be read again too)."""
        return self._file.identity

    def __len__(self) -> int:
        return self._file.count()

    # --- opening --------------------------------------------------------------------------------

    async def data_key(self, dossier_id: str, *, fresh: bool = False) -> bytes:
        """The dossier's data key, unwrapped for this call; `KeyErased` when it has none after
        reading the topic to its end, `KeysUnavailable` when the topic cannot be read now.
        `fresh`: read the topic to its end first, so an erasure acknowledged before the call
        holds (a send or a booking asks so)."""
        if fresh:
            await self.read_to_now()
        wrapped = self._file.get(dossier_id)
        if wrapped is None:
            await self.read_to_now()
            wrapped = self._file.get(dossier_id)
        if not wrapped:
            raise KeyErased(f"dossier {dossier_id!r} has no data key (erased)")
        try:
            return self.keks.unwrap(dossier_id, WrappedKey.decode(wrapped))
        except UnknownKek:
            UNOPENABLE.labels("unknown_kek").inc()
            raise
        except Tampered:
            UNOPENABLE.labels("tampered").inc()
            raise

    async def open(self, dossier_id: str, field: str, value: Any) -> Any:
        """A personal field's value in clear, for the call at hand: a sealed value opened (its
        dossier's key read for it), anything else (null, a value never sealed) as it is.
        `KeyErased`, `Tampered` or `UnknownKek` when it cannot be opened."""
        if not is_sealed(value):
            return value
        key = await self.data_key(dossier_id)
        return unseal(key, dossier_id, field, value)

    async def keys_read(self) -> bool:
        """Whether the first read of `dossier.keys` is done (a ready check)."""
        return self.caught_up

    async def read_to_now(self) -> None:
        """Wait until every record written before the call is read (`KeysUnavailable` after
        the catch-up time)."""
        try:
            await super().read_to_now()
        except NotReadToNow as exc:
            raise KeysUnavailable(str(exc)) from exc
