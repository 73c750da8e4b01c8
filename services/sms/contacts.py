"""The applicant's phone number, sealed (CONTRACT section 10).

On `dossier.events` the phone of a `dossier.submitted` is sealed with its dossier's data key.
The worker opens it when the event comes (`open_phones`, before the fold), normalises it, and
gives the core the result: the E.164 number sealed again with the same key (field `sms.to`),
or why no SMS goes to it (`Unreachable`: not a mobile number, on the opt-out list, or the
dossier's personal data erased). So the records, the changelog, the pending messages and their
dead letters hold only sealed numbers; the sender opens a number for the provider call alone
(`number`), and a message whose dossier was erased meanwhile is suppressed (`erased`).

A phone that was never sealed (an event written before sealing existed) is read as it is.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import replace

from services.common.data_keys import DataKeys, KeyErased
from services.common.sealing import Tampered, is_sealed, seal, unseal
from services.sms.inbox import Input, Item
from services.sms.phones import (
    MobileNumber,
    PhoneResult,
    SuppressionReason,
    Unreachable,
    normalise_phone,
)

PHONE_FIELD = "applicant.phone"
SMS_TO_FIELD = "sms.to"


class Contacts:
    """Opens sealed phones with the dossiers' keys (`DataKeys`, following `dossier.keys`)."""

    def __init__(self, keys: DataKeys, opted_out: Container[str]) -> None:
        self.keys = keys
        self._opted_out = opted_out

    async def open_phones(self, items: Sequence[Item]) -> list[Item]:
        """`items` with each sealed `dossier.submitted` phone read (`decisions.Event.phone`).
        Raises `sealing.Tampered` (or `UnknownKek`) for a phone that does not open: the
        consumer dead-letters that event."""
        opened: list[Item] = []
        for item in items:
            if isinstance(item, Input) and item.event.type == "dossier.submitted":
                applicant = item.event.data.get("applicant")
                phone = applicant.get("phone") if isinstance(applicant, dict) else None
                if is_sealed(phone):
                    assert isinstance(phone, str)
                    result = await self._phone(item.dossier_id, phone)
                    item = replace(item, event=replace(item.event, phone=result))
            opened.append(item)
        return opened

    async def _phone(self, dossier_id: str, sealed: str) -> PhoneResult:
        try:
            key = await self.keys.data_key(dossier_id)
        except KeyErased:
            return Unreachable(SuppressionReason.ERASED)
        clear = unseal(key, dossier_id, PHONE_FIELD, sealed)
        result = normalise_phone(clear if isinstance(clear, str) else None)
        if not isinstance(result, MobileNumber):
            return result
        if result.e164 in self._opted_out:
            return Unreachable(SuppressionReason.OPTED_OUT)
        return MobileNumber(seal(key, dossier_id, SMS_TO_FIELD, result.e164))

    async def refresh(self) -> None:
        """Read `dossier.keys` to its end: an erasure acknowledged before holds for the numbers
        opened next (the sender asks once per provider call)."""
        await self.keys.read_to_now()

    async def number(self, dossier_id: str, to: str) -> str:
        """The number a message goes to, in clear for the provider call; `KeyErased` when the
        dossier's personal data was erased, `Tampered` when it does not open."""
        if not is_sealed(to):
            return to
        key = await self.keys.data_key(dossier_id)
        number = unseal(key, dossier_id, SMS_TO_FIELD, to)
        if not isinstance(number, str):
            raise Tampered(f"{SMS_TO_FIELD} of dossier {dossier_id!r} is not a number")
        return number
