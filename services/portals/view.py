"""What every portals process answers from: the whole changelog of the dossier states, all
partitions (from their latest snapshots on), followed (`following.CompactedView`), so any number of
processes answer every portal's `GET /v1/dossiers/{id}`, `GET /v1/deliveries` and `POST
/v1/deliveries/{id}/redeliver` alike, whichever partitions each one consumes. A change shows
once the worker holding the dossier has written it to the changelog (before its commit) and this
process has read it: well under a second.

Each state is kept as its bytes (decoded on a read), and each portal's deliveries are indexed
as the records come (delivery id → its line of the delivery log, oldest first), so the log is
read without decoding any state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from services.common.changelog import Changelog
from services.common.following import CompactedView, Record
from services.common.topics import TopicSpec
from services.portals.domain import Delivery, DossierState, Status, decode_state


class StatesView(CompactedView):
    name = "portals_states"

    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        *,
        replication: int = 1,
        changelog: Changelog | None = None,
    ) -> None:
        super().__init__(bootstrap, spec, replication=replication, changelog=changelog)
        self._raw: dict[str, bytes] = {}
        self._indexed: dict[str, set[tuple[str, str]]] = {}
        self.deliveries_of: dict[str, dict[str, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._raw)

    # --- following ---------------------------------------------------------------------------

    def reset(self, records: Iterable[Record]) -> None:
        self._raw = {}
        self._indexed = {}
        self.deliveries_of = {}
        for key, value in records:
            self.apply(key, value)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        dossier_id = key.decode(errors="replace")
        if not value:
            self._raw.pop(dossier_id, None)
            self._index(dossier_id, {})
            return
        try:
            held = orjson.loads(value).get("deliveries") or ()
            lines = {
                (str(d["portal"]), str(d["id"])): {
                    "id": d["id"],
                    "type": d["type"],
                    "dossier_id": dossier_id,
                    "status": d["status"],
                    "attempts": d["attempts"],
                    "last_status_code": d.get("last_status_code"),
                    "next_attempt_at": d.get("next_attempt_at"),
                }
                for d in held
            }
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            return  # not a state of this service: nothing to answer from
        self._raw[dossier_id] = value
        self._index(dossier_id, lines)

    def _index(self, dossier_id: str, lines: dict[tuple[str, str], dict[str, Any]]) -> None:
        before = self._indexed.pop(dossier_id, set())
        for portal, delivery_id in before - set(lines):
            self.deliveries_of.get(portal, {}).pop(delivery_id, None)
        for (portal, delivery_id), line in lines.items():
            self.deliveries_of.setdefault(portal, {})[delivery_id] = line
        if lines:
            self._indexed[dossier_id] = set(lines)

    # --- reading -----------------------------------------------------------------------------

    def get(self, dossier_id: str) -> DossierState | None:
        raw = self._raw.get(dossier_id)
        return decode_state(dossier_id, raw) if raw is not None else None

    def delivery(self, portal: str, delivery_id: str) -> tuple[str, Delivery] | None:
        """The dossier and delivery of `portal` with this id, if any."""
        line = self.deliveries_of.get(portal, {}).get(delivery_id)
        state = self.get(line["dossier_id"]) if line is not None else None
        found = state.delivery(delivery_id) if state is not None else None
        if state is None or found is None or found.portal != portal:
            return None
        return state.dossier_id, found

    def log(self, portal: str, status: Status | None, limit: int) -> list[dict[str, Any]]:
        """The portal's deliveries, newest first, at most `limit`."""
        out: list[dict[str, Any]] = []
        for line in reversed(self.deliveries_of.get(portal, {}).values()):
            if status is None or line["status"] == status.value:
                out.append(dict(line))
                if len(out) >= limit:
                    break
        return out
