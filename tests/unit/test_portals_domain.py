"""The portals core (services/portals/domain.py, subscriptions.py, messages.py): pure rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.portals import messages
from services.portals.domain import (
    Attempt,
    DossierState,
    Incoming,
    Result,
    Retirement,
    Status,
    decode_state,
    due_deliveries,
    encode_state,
    initial_state,
    next_due,
    on_attempt,
    on_event,
    on_redeliver,
    retire,
)
from services.portals.subscriptions import (
    Subscription,
    decode,
    matches,
    parse_request,
    type_problems,
)

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
SCHEDULE = (60.0, 300.0, 3600.0, 86400.0, 172800.0)
RULES = Retirement(timedelta(days=14), timedelta(days=90))
D = "000.00.12.H34-190304-0001"
SUB = Subscription("portal/a", "https://a.example/cb", ("payment.*", "sms.failed"), "s" * 32, T0)
BOOK = {"portal/a": SUB}


def event(kind: str, n: int = 1, *, source: str = "motcua/x", **data: Any) -> Incoming:
    body = {"specversion": "1.0", "id": f"{kind}-{n}", "type": kind, "subject": D, "data": data}
    return Incoming(
        kind, f"{kind}-{n}", source, D, T0 + timedelta(minutes=n), data, orjson.dumps(body)
    )


def submitted(source: str = "portal/a") -> Incoming:
    return event("dossier.submitted", 0, source=source)


def owned(now: datetime = T0) -> DossierState:
    return on_event(initial_state(D, now), submitted(), BOOK, now)


# --- subscriptions -------------------------------------------------------------------------------


def test_types_match_exactly_or_by_prefix() -> None:
    assert matches(("payment.*",), "payment.succeeded")
    assert matches(("sms.failed",), "sms.failed")
    assert not matches(("sms.failed",), "sms.sent")
    assert matches(("dossier.*",), "dossier.overdue")
    assert not matches(("dossier.*",), "dossier.received")  # portals hear only overdue of these
    assert not matches(("payment.*",), "postal.delivered")


@pytest.mark.parametrize(
    ("types", "pointer"),
    [
        ("payment.*", "/types"),
        ([], "/types"),
        (["payment.*", 3], "/types/1"),
        (["dossier.received"], "/types/0"),
        (["audit.*"], "/types/0"),
        (["Payment.Succeeded"], "/types/0"),
    ],
)
def test_bad_types_are_named_by_pointer(types: object, pointer: str) -> None:
    assert next(p for p, _ in type_problems(types)) == pointer


def test_a_request_names_every_bad_field() -> None:
    problems = parse_request({"types": ["payment.*"], "extra": 1})
    assert isinstance(problems, list)
    assert [p for p, _ in problems] == ["/url", "/extra"]
    assert parse_request([]) == [
        ("", 'the body must be a JSON object {"url": ..., "types": [...]}')
    ]
    ok = parse_request({"url": "https://a.example/cb", "types": ["sms.*", "sms.*"]})
    assert not isinstance(ok, list) and ok.types == ("sms.*",)


def test_a_subscription_record_round_trips() -> None:
    assert decode(b"portal/a", SUB.encode()) == SUB
    with pytest.raises(ValueError):
        decode(b"portal/b", SUB.encode())
    assert "secret" not in SUB.shown(with_secret=False)


# --- deliveries ----------------------------------------------------------------------------------


def test_an_owned_dossier_gets_a_delivery_due_at_once_for_a_wanted_type() -> None:
    state = on_event(owned(), event("payment.succeeded", amount_vnd=5), BOOK, T0)
    [delivery] = state.deliveries
    assert delivery.status is Status.PENDING and delivery.attempts == 0
    assert delivery.next_attempt_at == T0 and delivery.portal == "portal/a"
    assert orjson.loads(delivery.body)["id"] == "payment.succeeded-1"
    assert due_deliveries(state, T0) == [delivery]
    # a type the subscription does not want, a dossier event: no delivery
    state = on_event(state, event("sms.sent", 2), BOOK, T0)
    state = on_event(state, event("dossier.received", 3), BOOK, T0)
    assert len(state.deliveries) == 1


def test_no_subscription_or_a_stranger_portal_gets_nothing() -> None:
    other = on_event(initial_state(D, T0), submitted("portal/b"), BOOK, T0)
    assert on_event(other, event("payment.succeeded"), BOOK, T0).deliveries == ()


def test_an_outcome_before_the_submission_waits_for_the_owner() -> None:
    early = on_event(initial_state(D, T0), event("payment.succeeded"), BOOK, T0)
    assert early.owner is None and len(early.held) == 1 and early.deliveries == ()
    state = on_event(early, submitted(), BOOK, T0)
    assert state.held == () and [d.id for d in state.deliveries] == ["payment.succeeded-1"]


def test_the_same_event_twice_is_one_delivery() -> None:
    once = on_event(owned(), event("payment.succeeded"), BOOK, T0)
    assert on_event(once, event("payment.succeeded"), BOOK, T0) == once


def test_fail_twice_then_succeed() -> None:
    state = on_event(owned(), event("payment.succeeded"), BOOK, T0)
    delivery_id = state.deliveries[0].id
    at = T0
    for n in (1, 2):
        out = on_attempt(state, Attempt(D, delivery_id, n, False, 500, None, at), SCHEDULE)
        assert out.result is Result.RETRIED
        state = out.state
        assert state.deliveries[0].next_attempt_at == at + timedelta(seconds=SCHEDULE[n - 1])
        at = state.deliveries[0].next_attempt_at or at
    out = on_attempt(state, Attempt(D, delivery_id, 3, True, 204, None, at), SCHEDULE)
    assert out.result is Result.DELIVERED
    assert out.state.deliveries[0].listed(D) == {
        "id": delivery_id,
        "type": "payment.succeeded",
        "dossier_id": D,
        "status": "delivered",
        "attempts": 3,
        "last_status_code": 204,
        "next_attempt_at": None,
    }


@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=6), st.integers(0, 3))
def test_always_failing_is_given_up_after_the_last_wait(
    schedule: list[float], replays: int
) -> None:
    state = on_event(owned(), event("payment.succeeded"), BOOK, T0)
    delivery_id = state.deliveries[0].id
    results = []
    for n in range(1, len(schedule) + 2):
        attempt = Attempt(D, delivery_id, n, False, None, "refused", T0)
        for _ in range(replays + 1):  # an outcome applied again changes nothing
            out = on_attempt(state, attempt, schedule)
            state = out.state
            results.append(out.result)
    meaningful = [r for r in results if r is not Result.STALE]
    assert meaningful == [Result.RETRIED] * len(schedule) + [Result.GIVEN_UP]
    delivery = state.deliveries[0]
    assert delivery.status is Status.FAILED and delivery.attempts == len(schedule) + 1
    assert delivery.reason is not None and "given up" in delivery.reason


def test_redeliver_starts_a_new_series() -> None:
    state = on_event(owned(), event("payment.succeeded"), BOOK, T0)
    delivery_id = state.deliveries[0].id
    state = on_attempt(state, Attempt(D, delivery_id, 1, True, 200, None, T0), SCHEDULE).state
    later = T0 + timedelta(hours=1)
    again = on_redeliver(state, delivery_id, later)
    assert again.deliveries[0].status is Status.PENDING and again.deliveries[0].attempts == 0
    assert due_deliveries(again, later) == [again.deliveries[0]]
    assert on_redeliver(again, delivery_id, later) == again  # pending: left as it is
    assert on_redeliver(again, "nope", later) == again


def test_retirement_waits_for_pending_deliveries_and_the_grace() -> None:
    state = on_event(owned(), event("payment.succeeded"), BOOK, T0)
    closed = on_event(state, event("dossier.withdrawn", 5), BOOK, T0)
    assert next_due(closed, RULES) == T0  # the attempt first
    assert not retire(closed, RULES, T0 + timedelta(days=30))
    done = on_attempt(closed, Attempt(D, "payment.succeeded-1", 1, True, 200, None, T0), SCHEDULE)
    assert next_due(done.state, RULES) == T0 + RULES.after
    assert retire(done.state, RULES, T0 + RULES.after)
    assert not retire(done.state, RULES, T0 + RULES.after - timedelta(seconds=1))


# --- the summary ---------------------------------------------------------------------------


def test_the_summary_follows_the_latest_events() -> None:
    state = owned()
    for e in [
        event("payment.requested", 1, amount_vnd=150000),
        event("payment.succeeded", 2),
        event("postal.pickup_requested", 3, leg="pickup"),
        event("postal.out_for_delivery", 4),
        event("sms.sent", 5, template="received"),
        event("dossier.overdue", 6),
        event("payment.requested", 0),  # older than what is known: no change
    ]:
        state = on_event(state, e, BOOK, T0)
    summary = state.summary()
    assert summary["status"] == "overdue"
    assert summary["overdue"] is True
    assert summary["payment"] == {
        "state": "succeeded",
        "amount_vnd": 150000,
        "updated_at": (T0 + timedelta(minutes=2)).isoformat(),
    }
    assert [leg["leg"] for leg in summary["postal"]] == ["pickup", "return"]
    assert summary["postal"][1]["state"] == "out_for_delivery"
    assert summary["sms"] == [
        {"template": "received", "state": "sent", "at": (T0 + timedelta(minutes=5)).isoformat()}
    ]
    assert summary["updated_at"] == (T0 + timedelta(minutes=6)).isoformat()


kinds = st.sampled_from(
    [
        "payment.succeeded",
        "payment.failed",
        "postal.delivered",
        "sms.sent",
        "sms.failed",
        "dossier.overdue",
        "dossier.received",
        "dossier.submitted",
    ]
)


@given(st.lists(st.tuples(kinds, st.integers(0, 20)), max_size=25))
def test_states_round_trip_and_replays_change_nothing(inputs: list[tuple[str, int]]) -> None:
    state = initial_state(D, T0)
    for kind, n in inputs:
        state = on_event(state, event(kind, n, source="portal/a"), BOOK, T0)
    assert decode_state(D, encode_state(state)) == state
    replayed = state
    for kind, n in inputs:
        replayed = on_event(replayed, event(kind, n, source="portal/a"), BOOK, T0)
    assert replace(replayed, touched_at=T0) == replace(state, touched_at=T0)
    ids = [d.id for d in state.deliveries]
    assert len(ids) == len(set(ids))


def test_callback_messages_round_trip() -> None:
    sent: list[Attempt | messages.Redeliver | messages.Tick] = [
        Attempt(D, "ev-1", 2, False, 503, None, T0),
        Attempt(D, "ev-1", 1, False, None, "timeout", T0),
        messages.Redeliver(D, "ev-1", T0),
        messages.Tick(D, T0),
    ]
    for message in sent:
        assert messages.decode(messages.encode(message), now=T0) == message
    replayed = orjson.dumps({"specversion": "1.0", "id": "ev-9", "subject": D, "type": "sms.sent"})
    assert messages.decode(replayed, now=T0) == messages.Redeliver(D, "ev-9", T0)
    for bad in [b"nope", b"[]", b'{"kind": "attempt"}', b'{"kind": "other"}']:
        with pytest.raises(messages.BadMessage):
            messages.decode(bad, now=T0)
