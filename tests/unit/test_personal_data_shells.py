"""The services' side of sealed personal data, without a broker: SMS opens the phone of a
`dossier.submitted` and the number of a message, postal checks a sealed address and opens a
booking, both with the keys a `DataKeys` holds (records applied by hand here)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.common.data_keys import DataKeys, KeyErased
from services.common.sealing import Keks, KeyBook, Tampered, is_sealed
from services.common.settings import DEV_KEK
from services.postal.commands import BookOrder
from services.postal.domain import PostalConfig, apply
from services.postal.inputs import DossierSubmitted
from services.postal.personal import UNROUTABLE, PersonalData
from services.postal.plans import Address, SealedAddress
from services.postal.shipments import initial_state
from services.sms.contacts import Contacts
from services.sms.decisions import Event
from services.sms.inbox import Input
from services.sms.phones import MobileNumber, SuppressionReason, Unreachable

KEKS = Keks.parse(DEV_KEK)
T = datetime(2024, 3, 4, 8, 15, tzinfo=UTC)
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Lộc Thọ", "street": "1"}


class FollowedToTheEnd(DataKeys):
    """The keys as a follower that has read `dossier.keys` to its end holds them."""

    async def read_to_now(self) -> None:
        return None


def keys_with(book: KeyBook) -> DataKeys:
    keys = FollowedToTheEnd("127.0.0.1:1", KEKS, partitions=1)
    for dossier_id, value in book.take_records():
        keys.apply(dossier_id, value)
    return keys


def submitted_data(dossier_id: str, **applicant: Any) -> dict[str, Any]:
    return {
        "dossier_id": dossier_id,
        "agency_code": "A",
        "applicant": {"name": "Nguyễn Thị B", **applicant},
        "fee": {"amount_vnd": 0, "method": "none"},
        "postal": {"mode": "pickup"},
        "submitted_at": T.isoformat(),
    }


def sms_input(data: dict[str, Any]) -> Input:
    event = Event("dossier.submitted", "portal/test", "e1", T, data)
    return Input("dossier.events", event, data["dossier_id"].encode(), b"{}")


async def test_sms_keeps_the_normalised_number_sealed_and_opens_it_for_the_send() -> None:
    book = KeyBook(KEKS)
    sealed = book.seal_event(
        {"type": "dossier.submitted", "data": submitted_data("D1", phone="0905 123 456")}
    )
    contacts = Contacts(keys_with(book), opted_out=frozenset())
    [item] = await contacts.open_phones([sms_input(sealed["data"])])
    assert isinstance(item, Input) and isinstance(item.event.phone, MobileNumber)
    to = item.event.phone.e164
    assert is_sealed(to) and "905" not in to
    assert await contacts.number("D1", to) == "+84905123456"


async def test_sms_opted_out_erased_landline_and_clear_phones() -> None:
    book = KeyBook(KEKS)

    def seal(dossier_id: str, phone: str) -> dict[str, Any]:
        value = {"type": "dossier.submitted", "data": submitted_data(dossier_id, phone=phone)}
        return book.seal_event(value)["data"]

    opted, landline, erased = (
        seal("OPT", "0905123456"),
        seal("FIX", "0258 3822 222"),
        seal("ER", "0905000111"),
    )
    keys = keys_with(book)
    keys.apply_written("ER", None)  # erased before the event was read
    contacts = Contacts(keys, opted_out=frozenset({"+84905123456"}))
    clear = sms_input(submitted_data("CLEAR", phone="0905123456"))
    items = await contacts.open_phones(
        [sms_input(opted), sms_input(landline), sms_input(erased), clear]
    )
    phones = [item.event.phone for item in items if isinstance(item, Input)]
    assert phones == [
        Unreachable(SuppressionReason.OPTED_OUT),
        Unreachable(SuppressionReason.LANDLINE),
        Unreachable(SuppressionReason.ERASED),
        None,  # never sealed: the core reads it as it is
    ]
    with pytest.raises(KeyErased):
        await contacts.number("ER", opted["applicant"]["phone"])


async def test_sms_a_tampered_phone_raises_for_the_dead_letter() -> None:
    book = KeyBook(KEKS)
    data = book.seal_event(
        {"type": "dossier.submitted", "data": submitted_data("T1", phone="0905123456")}
    )["data"]
    phone = data["applicant"]["phone"]
    data["applicant"]["phone"] = phone[:-2] + ("AA" if phone[-2:] != "AA" else "BB")
    with pytest.raises(Tampered):
        await Contacts(keys_with(book), frozenset()).open_phones([sms_input(data)])


def postal_submitted(data: dict[str, Any]) -> DossierSubmitted:
    return DossierSubmitted.from_data(data)


async def test_postal_keeps_a_routable_address_sealed_and_opens_it_for_the_booking() -> None:
    book = KeyBook(KEKS)
    data = book.seal_event(
        {
            "type": "dossier.submitted",
            "data": submitted_data("P1", phone="0905123456", address=ADDRESS),
        }
    )["data"]
    personal = PersonalData(keys_with(book))
    [event] = await personal.opened_inputs([postal_submitted(data)])
    assert isinstance(event.applicant_address, SealedAddress)
    decision = apply(initial_state("P1"), event, PostalConfig())
    [booking] = [c for c in decision.commands if isinstance(c, BookOrder)]
    assert isinstance(booking.address, SealedAddress) and is_sealed(booking.contact_name)
    clear = await personal.clear_order(booking)
    assert clear.address == Address("Khánh Hòa", "Nha Trang", "Lộc Thọ", "1")
    assert (clear.contact_name, clear.contact_phone) == ("Nguyễn Thị B", "0905123456")
    personal.keys.apply_written("P1", None)  # erased before the booking call
    with pytest.raises(KeyErased):
        await personal.clear_order(booking)


async def test_postal_an_unroutable_sealed_address_fails_as_invalid_address() -> None:
    book = KeyBook(KEKS)
    data = book.seal_event(
        {"type": "dossier.submitted", "data": submitted_data("P2", address="somewhere, no commune")}
    )["data"]
    [event] = await PersonalData(keys_with(book)).opened_inputs([postal_submitted(data)])
    assert event.applicant_address == UNROUTABLE
    decision = apply(initial_state("P2"), event, PostalConfig())
    reasons = [getattr(c, "reason", None) for c in decision.commands]
    assert "invalid_address" in reasons
    assert not any(isinstance(c, BookOrder) for c in decision.commands)


def test_the_latest_erasures_are_remembered_and_no_more() -> None:
    """Retention erases every closed dossier: the record of erasures keeps the latest only
    (as compaction keeps only the latest tombstones), while keys are there for every dossier
    that has one."""
    keys = DataKeys("127.0.0.1:1", KEKS, partitions=1, erased_kept=3, flush_seconds=0)
    book = KeyBook(KEKS)
    book.key_of("kept")
    for dossier_id, value in book.take_records():
        keys.apply(dossier_id, value)
    for n in range(5):
        keys.apply(f"E{n}".encode(), None)
    keys.applied({0: (6, 0)})  # the batch read: into the key file
    assert [d for d in ("E0", "E1", "E2", "E3", "E4") if keys.erased(d)] == ["E2", "E3", "E4"]
    keys.apply_written("E2", None)  # erased again: the latest now
    keys.apply(b"E5", None)
    keys.applied({0: (7, 0)})
    assert [d for d in ("E2", "E3", "E4", "E5") if keys.erased(d)] == ["E2", "E4", "E5"]
    assert "kept" in keys and not keys.erased("kept")
