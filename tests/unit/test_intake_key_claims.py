"""The pure part of intake's claims of making data keys: the claim round trip's answers sorted
by dossier, when an uncertain key write can be settled, and the answers once it is."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.intake import personal
from services.intake.ledger import uncertain_since
from services.intake.personal import (
    LOST,
    SETTLE_MARGIN_MS,
    WON,
    claimed_key,
    key_claims,
    settle_at_ms,
    settled_answers,
)

TOKEN = "9f" * 16
WRAPPED = b'{"kek":"k1","key":"bm9uY2UrY2lwaGVydGV4dA=="}'  # a wrapped key's record value


def uncertain_claim(token: str, since_ms: int, wrapped: bytes = WRAPPED) -> str:
    return personal.uncertain_claim(token, since_ms, wrapped)


def test_an_uncertain_claim_tells_when_its_write_was_given_up_and_which_key_it_wrote() -> None:
    held = uncertain_claim(TOKEN, 1795705946725)
    assert held.startswith("u:")
    assert "\n" not in held  # the claim scripts take values newline-joined
    assert uncertain_since(held) == 1795705946725
    assert claimed_key(held) == WRAPPED


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=0, max_value=2**45))
def test_any_wrapped_key_comes_back_from_its_claim(wrapped: bytes, since_ms: int) -> None:
    held = uncertain_claim(TOKEN, since_ms, wrapped)
    assert claimed_key(held) == wrapped
    assert uncertain_since(held) == since_ms


def test_a_claim_without_a_readable_key_holds_none() -> None:
    assert claimed_key(WON) is None
    assert claimed_key(f"u:{TOKEN}:1795705946725") is None  # the event ledger's kind of claim
    assert claimed_key(f"u:{TOKEN}:1795705946725:") is None
    assert claimed_key(f"u:{TOKEN}:1795705946725:not*base64") is None


def test_answers_are_sorted_into_won_lost_and_uncertain() -> None:
    held = uncertain_claim(TOKEN, 1000)
    claims = key_claims(["D-1", "D-2", "D-3", "D-4"], [WON, LOST, held, WON])
    assert claims.won == ["D-1", "D-4"]
    assert claims.lost == ["D-2"]
    assert claims.uncertain == {"D-3": held}


def test_a_settling_read_waits_for_the_latest_uncertain_write_plus_the_margin() -> None:
    held = [uncertain_claim(TOKEN, 5_000), uncertain_claim("other", 7_000)]
    assert settle_at_ms(held) == 7_000 + SETTLE_MARGIN_MS
    assert settle_at_ms(["u:malformed"]) == SETTLE_MARGIN_MS  # no time: at once


def test_a_claim_taken_over_is_ours_and_one_whose_key_landed_is_not() -> None:
    ids = ["D-1", "D-2", "D-3", "D-4"]
    answers = [WON, uncertain_claim(TOKEN, 1), uncertain_claim(TOKEN, 1), LOST]
    assert settled_answers(ids, answers, taken_over=["D-2"]) == [WON, WON, LOST, LOST]


@given(st.lists(st.sampled_from([WON, LOST, uncertain_claim(TOKEN, 42)]), max_size=8))
def test_without_a_take_over_only_the_claims_won_stay_ours(answers: list[str]) -> None:
    ids = [f"D-{i}" for i in range(len(answers))]
    settled = settled_answers(ids, answers, taken_over=[])
    assert settled == [WON if a == WON else LOST for a in answers]
    claims = key_claims(ids, answers)
    assert sorted(claims.won + claims.lost + list(claims.uncertain)) == sorted(ids)
