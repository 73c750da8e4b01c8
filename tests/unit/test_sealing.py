"""Personal data sealed per dossier (services/common/sealing.py): round trips, tampering,
moving a sealed value, and KEK rotation."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.sealing import (
    SEALED_MAX,
    SEALED_PREFIX,
    InvalidKekList,
    Keks,
    KeyBook,
    Tampered,
    UnknownKek,
    WrappedKey,
    has_personal_data,
    is_sealed,
    new_data_key,
    seal,
    seal_data,
    unseal,
    unseal_data,
)
from services.common.settings import Settings


def kek_text(*ids: str) -> str:
    return ",".join(
        f"{i}:{base64.b64encode(bytes([n + 1]) * 32).decode()}" for n, i in enumerate(ids)
    )


values = st.one_of(
    st.text(max_size=300),
    st.dictionaries(st.sampled_from(["province", "district", "commune", "street"]), st.text()),
)
fields = st.sampled_from(
    ["applicant.name", "applicant.phone", "applicant.address", "postal.address"]
)
dossier_ids = st.text(min_size=1, max_size=128)


@given(value=values, dossier_id=dossier_ids, field=fields)
def test_a_sealed_value_opens_to_itself_and_shows_nothing_of_it(
    value: Any, dossier_id: str, field: str
) -> None:
    key = new_data_key()
    sealed = seal(key, dossier_id, field, value)
    assert is_sealed(sealed)
    assert len(sealed) <= SEALED_MAX
    assert unseal(key, dossier_id, field, sealed) == value
    if isinstance(value, str) and len(value) >= 4:
        assert value not in sealed


@given(value=values, dossier_id=dossier_ids, field=fields)
def test_sealing_is_deterministic_per_dossier_field_and_value(
    value: Any, dossier_id: str, field: str
) -> None:
    key = new_data_key()
    assert seal(key, dossier_id, field, value) == seal(key, dossier_id, field, value)


@given(
    value=values, dossier_id=dossier_ids, position=st.integers(min_value=0), bit=st.integers(0, 5)
)
def test_any_altered_character_is_tampering(
    value: Any, dossier_id: str, position: int, bit: int
) -> None:
    key = new_data_key()
    sealed = seal(key, dossier_id, "applicant.phone", value)
    body = sealed[len(SEALED_PREFIX) :]
    i = position % len(body)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    swapped = alphabet[(alphabet.index(body[i]) + (1 << bit)) % 64]
    altered = SEALED_PREFIX + body[:i] + swapped + body[i + 1 :]
    with pytest.raises(Tampered):
        unseal(key, dossier_id, "applicant.phone", altered)


def test_a_value_moved_to_another_dossier_or_field_or_key_does_not_open() -> None:
    key = new_data_key()
    sealed = seal(key, "D-1", "applicant.phone", "0905333444")
    with pytest.raises(Tampered):
        unseal(key, "D-2", "applicant.phone", sealed)
    with pytest.raises(Tampered):
        unseal(key, "D-1", "applicant.email", sealed)
    with pytest.raises(Tampered):
        unseal(new_data_key(), "D-1", "applicant.phone", sealed)


@pytest.mark.parametrize("text", ["0905333444", "sealed:v1:", "sealed:v1:!!!", "sealed:v1:AAAA"])
def test_what_is_not_a_sealed_value_is_tampering(text: str) -> None:
    with pytest.raises(Tampered):
        unseal(new_data_key(), "D-1", "applicant.phone", text)


@given(dossier_id=dossier_ids)
def test_a_wrapped_key_unwraps_for_its_dossier_only(dossier_id: str) -> None:
    keks = Keks.parse(kek_text("k1"))
    key = new_data_key()
    wrapped = WrappedKey.decode(keks.wrap(dossier_id, key).encode())
    assert keks.unwrap(dossier_id, wrapped) == key
    with pytest.raises(Tampered):
        keks.unwrap(dossier_id + "x", wrapped)


def test_a_tampered_wrapped_key_is_refused() -> None:
    keks = Keks.parse(kek_text("k1"))
    wrapped = keks.wrap("D-1", new_data_key())
    flipped = WrappedKey(wrapped.kek_id, wrapped.blob[:-1] + bytes([wrapped.blob[-1] ^ 1]))
    with pytest.raises(Tampered):
        keks.unwrap("D-1", flipped)
    with pytest.raises(Tampered):
        WrappedKey.decode(b'{"kek": 1}')


@given(dossier_id=dossier_ids)
def test_rotation_keys_wrapped_by_an_old_kek_unwrap_while_it_is_listed(dossier_id: str) -> None:
    old = Keks.parse(kek_text("2025"))
    key = new_data_key()
    wrapped = old.wrap(dossier_id, key)
    # the new KEK (listed first) wraps from now on, the old one still unwraps
    rotated = Keks.parse(f"2026:{base64.b64encode(b'n' * 32).decode()},{kek_text('2025')}")
    assert rotated.wrapping_id == "2026"
    assert rotated.unwrap(dossier_id, wrapped) == key
    assert rotated.wrap(dossier_id, key).kek_id == "2026"
    # once the old KEK is retired, its keys are unreadable: said so, not a crash
    retired = Keks.parse(f"2026:{base64.b64encode(b'n' * 32).decode()}")
    with pytest.raises(UnknownKek):
        retired.unwrap(dossier_id, wrapped)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "k1",
        ":QUFB",
        "k1:not base64!",
        "k1:" + base64.b64encode(b"short").decode(),
        kek_text("a") + "," + kek_text("a"),
    ],
)
def test_a_malformed_kek_list_is_refused(text: str) -> None:
    with pytest.raises(InvalidKekList):
        Keks.parse(text)


def test_the_dev_kek_of_the_settings_parses() -> None:
    assert Keks.parse(Settings().kek).ids == ["dev"]


def submitted_data() -> dict[str, Any]:
    return {
        "dossier_id": "D-9",
        "agency_code": "A",
        "applicant": {
            "name": "Nguyễn Văn A",
            "phone": "0905333444",
            "email": None,
            "address": {"province": "Khánh Hòa", "street": "1 Trần Phú"},
        },
        "fee": {"amount_vnd": 0, "method": "none"},
        "postal": {"mode": "return", "address": "12 Lê Lợi, Nha Trang"},
    }


def test_seal_data_seals_every_personal_field_and_nothing_else() -> None:
    key = new_data_key()
    data = submitted_data()
    sealed = seal_data(data, key)
    assert sealed["fee"] == data["fee"] and sealed["dossier_id"] == "D-9"
    assert sealed["applicant"]["email"] is None
    for section, name in [
        ("applicant", "name"),
        ("applicant", "phone"),
        ("applicant", "address"),
        ("postal", "address"),
    ]:
        assert is_sealed(sealed[section][name])
    assert "Nguyễn" not in str(sealed) and "0905333444" not in str(sealed)
    assert unseal_data(sealed, key) == data
    assert has_personal_data(data) and not has_personal_data({"dossier_id": "D"})


def test_a_key_book_seals_like_intake_and_hands_out_each_key_once() -> None:
    keks = Keks.parse(kek_text("k1"))
    book = KeyBook(keks)
    event = {"type": "dossier.submitted", "data": submitted_data()}
    sealed = book.seal_event(event)
    assert book.seal_event(event) == sealed  # the same key again: the same bytes
    other = book.seal_event({"type": "dossier.received", "data": {"dossier_id": "D-9"}})
    assert other == {"type": "dossier.received", "data": {"dossier_id": "D-9"}}
    [(dossier_id, value)] = book.take_records()
    assert book.take_records() == []
    key = keks.unwrap(dossier_id.decode(), WrappedKey.decode(value))
    assert unseal_data(sealed["data"], key) == event["data"]
