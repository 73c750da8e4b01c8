"""The applicant's address, name and phone, sealed (CONTRACT section 10).

On `dossier.events` a `dossier.submitted`'s personal fields are sealed with the dossier's data
key. Postal keeps them sealed in its states (and so in its changelog): when the event comes,
`opened_inputs` opens the address the order would go to only to check that a carrier can route
it (an unroutable one is `invalid_address`, as in clear), and keeps it as a `SealedAddress`.
The shell opens the address, name and phone of a `BookOrder` for the booking call alone
(`clear_order`); a dossier whose personal data was erased meanwhile cannot be booked
(`KeyErased`: the leg fails with reason `erased`).

Fields that were never sealed (events written before sealing existed) are read as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

from services.common.data_keys import DataKeys, KeyErased
from services.common.sealing import Tampered, is_sealed, unseal
from services.postal.commands import BookOrder
from services.postal.inputs import DossierSubmitted
from services.postal.plans import Address, SealedAddress, parse_address

# What `delivery_address` reads as unroutable: the core then fails the legs `invalid_address`.
UNROUTABLE: dict[str, Any] = {}

ERASED = "erased"

T = TypeVar("T")


class PersonalData:
    """Opens a dossier's sealed fields with its key (`DataKeys`, following `dossier.keys`)."""

    def __init__(self, keys: DataKeys) -> None:
        self.keys = keys

    async def opened_inputs(self, inputs: Sequence[T]) -> list[T]:
        """`inputs` with each sealed address of a `dossier.submitted` checked and kept sealed
        (`SealedAddress`). Raises `sealing.Tampered` (or `UnknownKek`) for one that does not
        open: the consumer dead-letters that event."""
        return [
            await self._submitted(item) if isinstance(item, DossierSubmitted) else item  # type: ignore[misc]
            for item in inputs
        ]

    async def _submitted(self, event: DossierSubmitted) -> DossierSubmitted:
        if event.postal_address is not None:
            field, raw = "postal.address", event.postal_address
        else:
            field, raw = "applicant.address", event.applicant_address
        if not is_sealed(raw):
            return event
        assert isinstance(raw, str)
        try:
            clear = unseal(await self.keys.data_key(event.dossier_id), event.dossier_id, field, raw)
        except KeyErased:
            checked: object = SealedAddress(raw, field)  # the booking fails `erased`
        else:
            checked = SealedAddress(raw, field) if parse_address(clear) is not None else UNROUTABLE
        if field == "postal.address":
            return replace(event, postal_address=checked)
        return replace(event, applicant_address=checked)

    async def clear_order(self, order: BookOrder) -> BookOrder:
        """The order with its address, name and phone in clear, for the carrier call only.
        Raises `KeyErased` (the dossier's personal data erased) or `Tampered`."""
        address = order.address
        name, phone = order.contact_name, order.contact_phone
        sealed = isinstance(address, SealedAddress) or is_sealed(name) or is_sealed(phone)
        if not sealed:
            return order
        key = await self.keys.data_key(order.dossier_id, fresh=True)
        if isinstance(address, SealedAddress):
            parsed = parse_address(unseal(key, order.dossier_id, address.field, address.sealed))
            if not isinstance(parsed, Address):
                raise Tampered(f"{address.field} of dossier {order.dossier_id!r} is not routable")
            address = parsed
        if is_sealed(name):
            name = str(unseal(key, order.dossier_id, "applicant.name", name))
        if phone is not None and is_sealed(phone):
            opened = unseal(key, order.dossier_id, "applicant.phone", phone)
            phone = opened if isinstance(opened, str) else None
        return replace(order, address=address, contact_name=name, contact_phone=phone)
