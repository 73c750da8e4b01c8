"""The dossiers' data keys, read from `dossier.keys` (CONTRACT section 10).

`dossier.keys` is compacted: key = dossier id, value = the dossier's data key wrapped by a KEK
(`sealing.WrappedKey`); a tombstone is the erasure of the dossier's personal data. Every process
that opens a personal field (intake, SMS for the phone, postal for the address) follows the topic
whole with one `DataKeys` (a task of its lifespan or app): the wrapped keys are held in memory,
and a key is unwrapped only for the call that needs it, never kept in clear.

A dossier not seen yet may only be behind: `data_key` reads the topic to its end offsets (taken
at the call) before it concludes that the dossier has no key. A dossier whose tombstone was
compacted away is indistinguishable from one that never had a key: either way its sealed fields
do not open (`KeyErased`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

from services.common.following import CompactedView, NotReadToNow, Record
from services.common.kept_json import right_sized
from services.common.latest import LatestKeys
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
# Erasures remembered, the latest (about 170 bytes each with the dossier id): the retention
# destroys the key of every closed dossier, so keeping them all would grow with the history.
# Intake, which makes the keys, keeps the most (34 MB at most): an event of a dossier whose
# erasure it remembers is refused rather than sealed with a new key. A service that only opens
# fields (SMS, postal) keeps few: for an erasure it no longer remembers, a call reads the topic
# to its end before it concludes the key is gone, the same answer a little later.
ERASED_KEPT = 200_000
ERASED_KEPT_OPENING = 10_000

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
    """The wrapped data key of every dossier on `dossier.keys`, and the erased dossiers."""

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
    ) -> None:
        super().__init__(
            bootstrap,
            dossier_keys_spec(partitions),
            replication=replication,
            poll_ms=poll_ms,
            catch_up_seconds=catch_up_seconds,
        )
        self.keks = keks
        # as written (`WrappedKey.encode`): about 250 bytes a key with its dossier id
        self._wrapped: dict[str, bytes] = {}
        # the latest erasures, oldest first, at most `erased_kept` (compaction forgets older
        # tombstones too): a dossier's erasure is told from a key not read yet while here
        self._erased: LatestKeys[str] = LatestKeys(erased_kept)

    @classmethod
    def of(cls, settings: Settings, *, erased_kept: int = ERASED_KEPT) -> DataKeys:
        """The keys a service's settings name: its broker, `MOTCUA_KEK`, the topics' layout."""
        return cls(
            settings.kafka_bootstrap,
            Keks.parse(settings.kek),
            partitions=settings.topic_partitions,
            replication=settings.topic_replication,
            erased_kept=erased_kept,
        )

    def reset(self, records: Iterable[Record]) -> None:
        self._wrapped, self._erased = {}, LatestKeys(self._erased.most)
        for key, value in records:
            if key is not None:
                self.apply(key, value)
        log.info("data_keys_caught_up", keys=len(self._wrapped), erased=len(self._erased))

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one record of `dossier.keys` in, as written: a key is decoded and unwrapped only
        when a call opens its dossier's data (one that does not decode is `Tampered` then, and
        counted), so a start with a million keys reads bytes and does nothing more."""
        if key is not None:
            self._fold(key.decode(errors="replace"), value or None)

    def apply_written(self, dossier_id: str, value: bytes | None) -> None:
        """Fold in what this process has just written for a dossier: its wrapped key
        (`WrappedKey.encode`), or None for its erasure. The key is held as a copy of its own
        size: `orjson.dumps` output keeps the 4 KiB buffer it was written in."""
        self._fold(dossier_id, None if value is None else right_sized(value))

    def _fold(self, dossier_id: str, value: bytes | None) -> None:
        if value is None:
            self._erase(dossier_id)
            return
        self._wrapped[dossier_id] = value
        self._erased.discard(dossier_id)

    # --- what is known ------------------------------------------------------------------------

    def _erase(self, dossier_id: str) -> None:
        self._wrapped.pop(dossier_id, None)
        self._erased.add([dossier_id])

    def known(self, dossier_id: str) -> bool:
        return dossier_id in self._wrapped

    def __contains__(self, dossier_id: object) -> bool:
        return dossier_id in self._wrapped

    def erased(self, dossier_id: str) -> bool:
        return dossier_id in self._erased

    def __len__(self) -> int:
        return len(self._wrapped)

    # --- opening --------------------------------------------------------------------------------

    async def data_key(self, dossier_id: str, *, fresh: bool = False) -> bytes:
        """The dossier's data key, unwrapped for this call; `KeyErased` when it has none after
        reading the topic to its end, `KeysUnavailable` when the topic cannot be read now.
        `fresh`: read the topic to its end first, so an erasure acknowledged before the call
        holds (a send or a booking asks so)."""
        if fresh:
            await self.read_to_now()
        wrapped = self._wrapped.get(dossier_id)
        if wrapped is None and dossier_id not in self._erased:
            await self.read_to_now()
            wrapped = self._wrapped.get(dossier_id)
        if wrapped is None:
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
