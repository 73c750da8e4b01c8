"""The satisfaction survey's pure parts: the page's answers and records, and how the metrics
count a dossier's one vote (an update moves it, a retired dossier's vote too)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.sealing import new_data_key, seal
from services.common.survey_links import verify
from services.intake.survey import client_address
from services.intake.survey_page import (
    Answer,
    AnswerRefused,
    answered_data,
    decode_record,
    form_page,
    new_record,
    parse_answer,
    thanks_page,
)
from services.metrics.codec import decode_state, encode_state
from services.metrics.domain import Event, apply_all, new_state
from services.metrics.store import ColumnarStore
from services.simulator.shell import survey_takers
from services.sms.decisions import Contact, SendSms, SmsPolicy, SurveyInvites, render_intent
from services.sms.decisions import DossierState as SmsState
from services.sms.decisions import Event as SmsEvent
from services.sms.decisions import apply as sms_apply
from services.sms.phones import normalise_phone
from services.sms.templates import load_templates

DOSSIER = "000.00.12.H34-260302-0001"
AGENCY = "000.00.12.H34"
T0 = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)


def test_a_form_answer_is_a_score_and_a_trimmed_bounded_comment() -> None:
    assert parse_answer(b"score=4&comment=++T%E1%BB%91t+l%E1%BA%AFm+") == Answer(4, "Tốt lắm")
    assert parse_answer(b"score=5&comment=") == Answer(5, None)
    assert parse_answer(b"score=1&comment=a%00b") == Answer(1, "ab")
    for body in (b"", b"score=0", b"score=6", b"score=x", b"comment=hi", b"\xff"):
        assert isinstance(parse_answer(body), AnswerRefused), body
    assert isinstance(parse_answer(b"score=3&comment=" + b"a" * 501), AnswerRefused)


def test_records_round_trip_and_garbage_is_no_record() -> None:
    record = new_record(3, T0)
    assert decode_record(record.encode()) == record
    assert decode_record(record.encode().encode()) == record
    for raw in (None, "", "9|2026-03-05T09:00:00+00:00|n", "3|2026-03-05T09:00:00|n", "x|y"):
        assert decode_record(raw) is None


def test_the_event_names_the_answer_it_replaces_and_carries_the_comment_only_sealed() -> None:
    first, second = new_record(2, T0), new_record(5, T0 + timedelta(days=1))
    sealed = seal(new_data_key(), DOSSIER, "survey.comment", "my phone is 0901234567")
    data = answered_data(DOSSIER, AGENCY, second, first, sealed)
    assert (data["score"], data["previous_score"]) == (5, 2)
    assert data["previous_answered_at"] == T0.isoformat()
    assert "0901234567" not in str(data)
    assert answered_data(DOSSIER, AGENCY, first, None, None)["previous_score"] is None


def test_pages_are_small_have_no_script_and_never_show_a_comment() -> None:
    form = form_page(DOSSIER, "04/04/2026")
    assert len(form.encode()) < 6000
    assert "<script" not in form and 'lang="vi"' in form and 'name="score"' in form
    thanks = thanks_page(DOSSIER, 4, "04/04/2026")
    assert "Cảm ơn" in thanks and "4/5" in thanks
    assert "<b>" not in form_page("<b>", "x")  # escaped


def test_the_client_address_is_the_peer_unless_a_private_proxy_forwarded_it() -> None:
    assert client_address("8.8.4.4", None) == "8.8.4.4"
    assert client_address("8.8.4.4", "198.51.100.1") == "8.8.4.4"  # not our proxy
    assert client_address("10.0.0.5", "1.2.3.4, 198.51.100.1") == "198.51.100.1"
    assert client_address(None, None) == "unknown"


def answered(n: int, score: int, at: datetime, previous: tuple[int, datetime] | None) -> Event:
    data: dict[str, Any] = {
        "dossier_id": DOSSIER,
        "agency_code": AGENCY,
        "score": score,
        "answered_at": at.isoformat(),
        "previous_score": previous[0] if previous else None,
        "previous_answered_at": previous[1].isoformat() if previous else None,
    }
    return Event("motcua/survey", f"{DOSSIER}:{n}", "survey.answered", DOSSIER, at, data)


def satisfaction(store: ColumnarStore, start: datetime, end: datetime) -> dict[str, Any]:
    return store.summary(start, end)["satisfaction"]  # type: ignore[no-any-return]


def test_an_update_moves_the_dossiers_one_vote_to_the_new_answers_day() -> None:
    first_at, second_at = T0, T0 + timedelta(days=2)
    first, second = answered(1, 2, first_at, None), answered(2, 5, second_at, (2, first_at))
    state, deltas = apply_all(new_state(DOSSIER), [first])
    store = ColumnarStore()
    store.apply(deltas)
    whole = (T0 - timedelta(days=1), T0 + timedelta(days=5))
    assert satisfaction(store, *whole) == {"answers": 1, "satisfied": 0, "rate": 0.0}
    state, deltas = apply_all(state, [second, first])  # a redelivery changes nothing
    store.apply(deltas)
    assert satisfaction(store, *whole) == {"answers": 1, "satisfied": 1, "rate": 1.0}
    first_day = (T0 - timedelta(hours=1), T0 + timedelta(days=1))
    assert satisfaction(store, *first_day) == {"answers": 0, "satisfied": 0, "rate": None}
    assert decode_state(DOSSIER, encode_state(state)).facts == state.facts
    groups = store.breakdown_counters("agency_code", *whole)
    assert groups[AGENCY]["satisfaction.answers"] == 1


def test_an_update_after_the_dossier_retired_still_counts_one_vote() -> None:
    first_at, second_at = T0, T0 + timedelta(days=20)
    store = ColumnarStore()
    _, deltas = apply_all(new_state(DOSSIER), [answered(1, 5, first_at, None)])
    store.apply(deltas)  # then the dossier leaves the state: its counts stay, folded
    _, deltas = apply_all(new_state(DOSSIER), [answered(2, 1, second_at, (5, first_at))])
    store.apply(deltas)
    whole = (T0 - timedelta(days=1), T0 + timedelta(days=30))
    assert satisfaction(store, *whole) == {"answers": 1, "satisfied": 0, "rate": 0.0}
    by_agency = store.breakdown_counters("agency_code", *whole)[AGENCY]
    assert (by_agency["satisfaction.answers"], by_agency["satisfaction.satisfied"]) == (1, 0)


def test_the_sms_invites_to_the_survey_once_the_result_is_returned() -> None:
    invites = SurveyInvites(("s1",), 30, "https://api.motcua.example.gov.vn")
    returned = SmsEvent(
        "dossier.result_returned",
        "portal/dev",
        "e-9",
        T0,
        {
            "dossier_id": DOSSIER,
            "agency_code": AGENCY,
            "returned_at": T0.isoformat(),
            "via": "counter",
        },
    )
    contact = SmsState(DOSSIER, contact=Contact(normalise_phone("0905123456")))
    decision = sms_apply(contact, returned, SmsPolicy(survey=invites))
    (message,) = decision.outgoing
    assert isinstance(message, SendSms) and message.intent.template == "survey_invite"
    url = message.intent.field_map()["survey_url"]
    token = url.removeprefix("https://api.motcua.example.gov.vn/s/")
    assert verify(token, ["s1"], T0 + timedelta(days=30)).dossier_id == DOSSIER
    rendered = render_intent(load_templates(), message.intent)
    assert url in rendered.text and rendered.segments <= 2
    assert sms_apply(contact, returned, SmsPolicy()).outgoing == ()  # no survey configured


def test_the_simulator_answers_for_a_share_of_the_returned_results() -> None:
    returned = [
        {
            "type": "dossier.result_returned",
            "subject": f"D-{i}",
            "time": T0.isoformat(),
            "data": {"dossier_id": f"D-{i}", "agency_code": AGENCY, "returned_at": T0.isoformat()},
        }
        for i in range(2000)
    ]
    others = [{"type": "dossier.resolved", "subject": "X", "time": T0.isoformat(), "data": {}}]
    takers = survey_takers([*returned, *others], random.Random(7), 0.5)
    assert 900 < len(takers) < 1100
    assert {agency for _, agency, _, _ in takers} == {AGENCY}
    satisfied = sum(score >= 4 for *_, score in takers) / len(takers)
    assert 0.75 < satisfied < 0.85  # about the Center's target
    assert survey_takers(returned, random.Random(7), 0.0) == []
