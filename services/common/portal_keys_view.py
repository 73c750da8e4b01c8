"""The portal keys a process holds: `MOTCUA_PORTALS` and the compacted topic `portal.keys`,
followed while the process runs (`following.CompactedView`; the rules are
`services.common.portal_keys`). Intake authenticates portals with it, the portals service
checks the portals' own requests with it.

The first whole read sets `caught_up` (a ready check); from then on each new record is folded
in within a second of its write. When the broker goes away the view keeps the table it has.
`apply_record` folds in a record this process has just written, so its own answer already
holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.common.following import CompactedView, Record
from services.common.logging import get_logger
from services.common.portal_keys import InvalidRecord, KeyRecord, KeyTable, decode_record, fold
from services.common.settings import Portal
from services.common.topics import portal_keys_spec

log = get_logger("motcua.portal_keys")


class PortalKeys(CompactedView):
    """The current `KeyTable` of this process, and the task that keeps it current."""

    name = "portal_keys"

    def __init__(self, bootstrap: str, static: Sequence[Portal], *, replication: int = 1) -> None:
        super().__init__(bootstrap, portal_keys_spec(), replication=replication)
        self._static = list(static)
        self.table: KeyTable = fold(self._static, [])
        self.skipped = 0  # records of the topic that are no valid key record

    def find(self, key_sha256: str) -> Portal | None:
        return self.table.find(key_sha256)

    def apply_record(self, record: KeyRecord) -> None:
        self.table = self.table.with_record(record)

    def reset(self, records: Iterable[Record]) -> None:
        decoded = [r for key, value in records if (r := self._decoded(key, value)) is not None]
        self.table = fold(self._static, decoded)
        log.info(
            "portal_keys_caught_up", keys=len(self.table.entries), active=self.table.active_count
        )

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        record = self._decoded(key, value)
        if record is not None:
            self.apply_record(record)
            log.info(
                "portal_key_changed", source=record.source, key_id=record.key_id, state=record.state
            )

    def _decoded(self, key: bytes | None, value: bytes | None) -> KeyRecord | None:
        if not value:
            return None  # a tombstone: nothing writes one, and it removes nothing
        try:
            return decode_record(key, value)
        except InvalidRecord as exc:
            self.skipped += 1
            log.warning("portal_key_record_skipped", reason=str(exc))
            return None
