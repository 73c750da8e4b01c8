"""The SMS decision core: templates, what each event says to whom, overdue apologies, quiet
hours, the token bucket, delivery reports and provider weighting."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sms.decisions import (
    NO_CONTACT,
    OPTED_OUT,
    Decision,
    DossierState,
    Event,
    InvalidEventError,
    SendSms,
    SmsPolicy,
    SuppressSms,
    apply,
    apply_opt_outs,
    event_from_envelope,
    idempotency_key,
    next_wakeup,
    render_intent,
    tick,
)
from services.sms.delivery import (
    DeliveryStatus,
    UnknownProviderStatusError,
    map_provider_status,
    next_delivery_state,
    sms_event_type,
)
from services.sms.providers import (
    ProviderWeights,
    failover_order,
    pick_provider,
    shift_weight_away,
)
from services.sms.quiet import (
    DEFAULT_QUIET_HOURS,
    QuietHours,
    earliest_send_time,
)
from services.sms.templates import (
    TEMPLATE_FIELDS,
    MissingFieldError,
    Template,
    TemplateError,
    load_templates,
    parse_templates,
    render,
)
from services.sms.text import Encoding, MessageTooLongError, encoding_of, fold_diacritics

ICT = timezone(timedelta(hours=7))
DOSSIER = "000.00.12.H34-190304-0001"
RECEIPT = "H34.19-0304-0001"
PHONE = "+84912345678"
T0 = datetime(2019, 3, 4, 8, 15, tzinfo=ICT)
TEMPLATES = load_templates()

# Realistic, long-ish Vietnamese values for every field a template may ask for.
SAMPLE_FIELDS = {
    "ref": DOSSIER,
    "receipt_no": RECEIPT,
    "due_date": "15/03/2019",
    "new_due_date": "22/03/2019",
    "reason": "Thiếu bản sao có chứng thực Giấy chứng nhận quyền sử dụng đất, đề nghị bổ sung",
    "amount": "1.250.000 đ",
    "payment_url": "https://dichvucong.khanhhoa.gov.vn/tt/Ab12Cd34",
    # a survey link of a 26-character dossier id: services.common.survey_links
    "survey_url": "https://api.motcua.example.gov.vn/s/" + "A" * 76,
}

_ids = itertools.count(1)


def event(
    kind: str,
    data: Mapping[str, object] | None = None,
    *,
    at: datetime = T0,
    source: str = "portal/dev",
    event_id: str | None = None,
) -> Event:
    return Event(
        type=kind,
        source=source,
        id=event_id or f"ev-{next(_ids)}",
        time=at,
        data={"dossier_id": DOSSIER, "agency_code": "000.00.12.H34", **(data or {})},
        subject=DOSSIER,
    )


def submitted(phone: str | None = "0912 345 678", mode: str = "none") -> Event:
    applicant: dict[str, object] = {"name": "Nguyễn Văn A"}
    if phone is not None:
        applicant["phone"] = phone
    return event("dossier.submitted", {"applicant": applicant, "postal": {"mode": mode}})


def received(receipt_no: str = RECEIPT, due_at: str = "2019-03-15T17:00:00+07:00") -> Event:
    return event(
        "dossier.received",
        {"receipt_no": receipt_no, "due_at": due_at, "received_at": "2019-03-04T08:20:00+07:00"},
    )


def run(*events: Event, state: DossierState | None = None) -> Decision:
    """Apply events in order; the outgoing messages of all of them."""
    outgoing: list[SendSms | SuppressSms] = []
    for e in events:
        state, out = apply(state, e)
        outgoing.extend(out)
    assert state is not None
    return Decision(state, tuple(outgoing))


def only_sms(decision: Decision) -> SendSms:
    assert len(decision.outgoing) == 1, decision.outgoing
    message = decision.outgoing[0]
    assert isinstance(message, SendSms)
    return message


# --- templates -------------------------------------------------------------------------------


def test_the_data_file_has_every_template_the_core_uses() -> None:
    assert set(TEMPLATES) == set(TEMPLATE_FIELDS)


@pytest.mark.parametrize("name", sorted(TEMPLATE_FIELDS))
def test_every_template_renders_folded_to_gsm7(name: str) -> None:
    template = TEMPLATES[name]
    assert template.fold
    assert encoding_of(template.body) is Encoding.UCS2  # written with diacritics
    rendered = render(template, {f: SAMPLE_FIELDS[f] for f in template.fields})
    assert rendered.encoding is Encoding.GSM7
    assert rendered.segments <= 2
    assert "((" not in rendered.text and "))" not in rendered.text
    for field in template.fields:
        assert fold_diacritics(SAMPLE_FIELDS[field]) in rendered.text


@pytest.mark.parametrize(
    ("name", "field"),
    [
        (name, field)
        for name, fields in sorted(TEMPLATE_FIELDS.items())
        for field in sorted(fields)
        if field in TEMPLATES[name].fields
    ],
)
@pytest.mark.parametrize("hole", [None, "", "   "])
def test_a_missing_or_blank_field_is_an_error_never_a_hole(
    name: str, field: str, hole: str | None
) -> None:
    template = TEMPLATES[name]
    fields = {f: SAMPLE_FIELDS[f] for f in template.fields}
    if hole is None:
        del fields[field]
    else:
        fields[field] = hole
    with pytest.raises(MissingFieldError) as caught:
        render(template, fields)
    assert caught.value.missing == (field,)
    assert caught.value.template == name


def test_urgent_templates_are_the_payment_ones() -> None:
    urgent = {name for name, template in TEMPLATES.items() if template.urgent}
    assert urgent == {"payment_requested", "payment_received"}


def test_templates_never_ask_for_personal_data() -> None:
    asked = set().union(*(t.fields for t in TEMPLATES.values()))
    assert not asked & {"name", "applicant_name", "address", "phone", "email"}


def test_rendering_examples() -> None:
    rendered = render(
        TEMPLATES["dossier_received"], {"receipt_no": RECEIPT, "due_date": "15/03/2019"}
    )
    assert rendered.text == (
        f"Ho so cua Ong/Ba da duoc tiep nhan, so bien nhan {RECEIPT}. "
        "Ngay hen tra ket qua: 15/03/2019."
    )
    assert (rendered.segments, rendered.urgent) == (1, False)
    paid = render(TEMPLATES["payment_received"], {"ref": DOSSIER, "amount": "150.000 đ"})
    assert "150.000 d " in paid.text


def test_unfolded_template_stays_vietnamese() -> None:
    template = Template("t", "Kết quả hồ sơ ((ref)) đã có.", fold=False)
    rendered = render(template, {"ref": "A1"})
    assert rendered.text == "Kết quả hồ sơ A1 đã có."
    assert rendered.encoding is Encoding.UCS2


def test_values_are_not_expanded_again_and_whitespace_is_flattened() -> None:
    template = Template("t", "((a)) / ((b))")
    rendered = render(template, {"a": "((b))", "b": "x\n\ty"})
    assert rendered.text == "((b)) / x y"


def test_over_the_cap_is_an_error() -> None:
    with pytest.raises(MessageTooLongError):
        render(Template("t", "x ((a))"), {"a": "y" * 1000})


TOML_OK = '[[template]]\nname = "t"\nbody = "Hồ sơ ((ref))"\n'


@pytest.mark.parametrize(
    ("toml_text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ('template = "x"', "array"),
        (TOML_OK * 2, "defined twice"),
        ('[[template]]\nname = "t"\nbody = "Hồ sơ ((Ref))"\n', "malformed"),
        ('[[template]]\nname = "t"\nbody = "Hồ sơ ((ref)"\n', "malformed"),
        ('[[template]]\nname = "t"\nbody = "  "\n', "empty body"),
        ('[[template]]\nname = "t"\nbody = "x"\nurgent = "yes"\n', "true or false"),
        ('[[template]]\nname = "t"\nbody = "x"\ncolour = 1\n', "unknown key"),
        ('[[template]]\nname = "t"\nbody = "Hồ sơ ((ref)) ((name))"\n', "never supplies"),
        ('[[template]]\nname = "other"\nbody = "x"\n', "not used"),
        ("template = []", "missing from the data"),
    ],
)
def test_bad_template_data_is_refused(toml_text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_templates(toml_text, expected={"t": frozenset({"ref"})})


def test_defaults_for_fold_and_urgent() -> None:
    template = parse_templates(TOML_OK, expected={"t": frozenset({"ref"})})["t"]
    assert (template.fold, template.urgent) == (True, False)


def test_the_shipped_file_parses_the_same_as_the_loader() -> None:
    path = Path(__file__).parents[2] / "services" / "sms" / "templates.toml"
    assert parse_templates(path.read_text("utf-8")) == TEMPLATES


# --- events and decisions --------------------------------------------------------------------


def test_envelope_from_the_contract() -> None:
    parsed = event_from_envelope(
        {
            "specversion": "1.0",
            "id": "01J9Z3K6Q4M0X8YV5T2R7B1C9D",
            "source": "portal/dvc-khanhhoa",
            "type": "dossier.received",
            "subject": DOSSIER,
            "time": "2019-03-04T08:15:00+07:00",
            "data": {"dossier_id": DOSSIER, "receipt_no": RECEIPT},
        }
    )
    assert (parsed.type, parsed.source, parsed.dossier_id, parsed.time) == (
        "dossier.received",
        "portal/dvc-khanhhoa",
        DOSSIER,
        T0,
    )


@pytest.mark.parametrize(
    "envelope",
    [
        {"id": "1", "source": "s", "type": "t", "time": "2019-03-04T08:15:00", "data": {}},
        {"id": "1", "source": "s", "type": "t", "time": "yesterday", "data": {}},
        {"id": "", "source": "s", "type": "t", "time": "2019-03-04T08:15:00Z", "data": {}},
        {"id": "1", "source": "s", "type": "t", "time": "2019-03-04T08:15:00Z", "data": []},
        {"id": "1", "source": "s", "type": "t", "time": "2019-03-04T08:15:00Z", "data": {}},
    ],
)
def test_unusable_envelopes_are_invalid(envelope: dict[str, object]) -> None:
    with pytest.raises(InvalidEventError):
        apply(None, event_from_envelope(envelope))


def test_received_after_submitted_sends_receipt_and_appointment() -> None:
    message = only_sms(run(submitted(), received()))
    assert message.to == PHONE
    assert message.intent.template == "dossier_received"
    assert message.intent.field_map() == {"receipt_no": RECEIPT, "due_date": "15/03/2019"}


def test_appointment_date_is_the_vietnamese_day() -> None:
    message = only_sms(run(submitted(), received(due_at="2019-03-14T17:30:00Z")))
    assert message.intent.field_map()["due_date"] == "15/03/2019"


def test_a_message_before_the_phone_is_known_waits_for_it() -> None:
    early = run(received())
    assert early.outgoing == ()
    assert len(early.state.awaiting_contact) == 1
    later = run(submitted(), state=early.state)
    message = only_sms(later)
    assert (message.to, message.intent.template) == (PHONE, "dossier_received")
    assert later.state.awaiting_contact == ()


def test_a_message_that_never_gets_a_phone_is_suppressed_after_the_wait() -> None:
    policy = SmsPolicy(contact_wait=timedelta(hours=2))
    state = run(received()).state
    assert next_wakeup(state, policy) == T0 + timedelta(hours=2)
    assert tick(state, T0 + timedelta(hours=2) - timedelta(seconds=1), policy).outgoing == ()
    after = tick(state, T0 + timedelta(hours=2), policy)
    assert [(type(o), o.reason) for o in after.outgoing if isinstance(o, SuppressSms)] == [
        (SuppressSms, NO_CONTACT)
    ]
    assert after.state.awaiting_contact == ()


@pytest.mark.parametrize(
    ("phone", "reason"),
    [
        (None, "missing_number"),
        ("0258 3822 123", "landline"),
        ("+44 20 7946 0958", "foreign_number"),
        ("12345", "invalid_number"),
    ],
)
def test_unreachable_numbers_are_suppressed_with_the_reason(phone: str | None, reason: str) -> None:
    decision = run(submitted(phone=phone), received())
    assert len(decision.outgoing) == 1
    suppressed = decision.outgoing[0]
    assert isinstance(suppressed, SuppressSms)
    assert suppressed.reason == reason
    assert suppressed.intent.template == "dossier_received"


def test_an_old_eleven_digit_number_gets_its_new_number() -> None:
    assert only_sms(run(submitted(phone="0166 234 5678"), received())).to == "+84362345678"


@pytest.mark.parametrize(
    ("mode", "template"),
    [
        ("none", "result_ready_at_desk"),
        ("pickup", "result_ready_at_desk"),
        ("return", "result_ready_by_post"),
        ("pickup_and_return", "result_ready_by_post"),
    ],
)
def test_result_ready_says_post_or_desk(mode: str, template: str) -> None:
    resolved = event("dossier.resolved", {"resolved_at": "2019-03-10T10:00:00+07:00"})
    message = run(submitted(mode=mode), received(), resolved).outgoing[-1]
    assert message.intent.template == template
    assert message.intent.field_map() == {"ref": RECEIPT}


def test_result_ready_decided_before_submitted_still_uses_the_postal_mode() -> None:
    resolved = event("dossier.resolved", {"resolved_at": "2019-03-10T10:00:00+07:00"})
    message = only_sms(run(resolved, submitted(mode="return")))
    assert message.intent.template == "result_ready_by_post"


def test_ref_is_the_dossier_id_until_a_receipt_number_exists() -> None:
    pickup = event("postal.pickup_requested")
    before = only_sms(run(submitted(), pickup))
    assert before.intent.field_map() == {"ref": DOSSIER}
    after = run(submitted(), received(), event("postal.picked_up")).outgoing[-1]
    assert after.intent.field_map() == {"ref": RECEIPT}


@pytest.mark.parametrize(
    ("kind", "data", "template", "fields"),
    [
        (
            "dossier.supplement_requested",
            {"reason": "Thiếu  bản sao\nCCCD"},
            "supplement_requested",
            {"ref": RECEIPT, "reason": "Thiếu bản sao CCCD"},
        ),
        (
            "dossier.rejected",
            {"reason": "Không thuộc thẩm quyền"},
            "dossier_rejected",
            {"ref": RECEIPT, "reason": "Không thuộc thẩm quyền"},
        ),
        (
            "dossier.withdrawn",
            {"withdrawn_at": "2019-03-05T09:00:00+07:00"},
            "dossier_withdrawn",
            {"ref": RECEIPT},
        ),
        (
            "dossier.apology_issued",
            {"reason": "x", "new_due_at": "2019-03-22T17:00:00+07:00"},
            "apology_issued",
            {"ref": RECEIPT, "new_due_date": "22/03/2019"},
        ),
        (
            "payment.requested",
            {"amount_vnd": 150000, "payment_url": "https://p.example/x"},
            "payment_requested",
            {"ref": RECEIPT, "amount": "150.000 đ", "payment_url": "https://p.example/x"},
        ),
        (
            "payment.requested",
            {
                "amount_vnd": 1000,
                "payment_url": "https://p.example/long",
                "short_url": "https://s/1",
            },
            "payment_requested",
            {"ref": RECEIPT, "amount": "1.000 đ", "payment_url": "https://s/1"},
        ),
        (
            "payment.succeeded",
            {"amount_vnd": 150000},
            "payment_received",
            {"ref": RECEIPT, "amount": "150.000 đ"},
        ),
        ("postal.pickup_requested", {}, "postal_pickup_booked", {"ref": RECEIPT}),
        ("postal.picked_up", {}, "postal_picked_up", {"ref": RECEIPT}),
        ("postal.out_for_delivery", {}, "postal_out_for_delivery", {"ref": RECEIPT}),
        ("postal.delivered", {}, "postal_delivered", {"ref": RECEIPT}),
    ],
)
def test_each_event_says_its_message(
    kind: str, data: dict[str, object], template: str, fields: dict[str, str]
) -> None:
    state = run(submitted(), received()).state
    message = only_sms(run(event(kind, data), state=state))
    assert message.intent.template == template
    assert message.intent.field_map() == fields
    rendered = render_intent(TEMPLATES, message.intent)  # renders without a hole
    assert rendered.encoding is Encoding.GSM7


@pytest.mark.parametrize(
    "kind",
    [
        "dossier.transferred",
        "dossier.supplement_received",
        "dossier.result_returned",
        "payment.failed",
        "payment.expired",
        "postal.failed",
        "postal.delivered_to_agency",
        "sms.delivered",
        "something.new",
    ],
)
def test_other_events_say_nothing(kind: str) -> None:
    state = run(submitted(), received()).state
    decision = run(event(kind, {"reason": "x"}), state=state)
    assert decision.outgoing == ()
    assert decision.state == state


def test_a_missing_payment_link_fails_at_render_time() -> None:
    state = run(submitted(), received()).state
    message = only_sms(run(event("payment.requested", {"amount_vnd": 150000}), state=state))
    with pytest.raises(MissingFieldError, match="payment_url"):
        render_intent(TEMPLATES, message.intent)


def test_a_long_reason_is_cut_not_dropped() -> None:
    reason = "Thiếu giấy tờ " * 40
    message = only_sms(run(submitted(), event("dossier.supplement_requested", {"reason": reason})))
    cut = message.intent.field_map()["reason"]
    assert len(cut) == SmsPolicy().max_reason_chars
    assert cut.endswith("...") and cut.startswith("Thiếu giấy tờ Thiếu")
    assert render_intent(TEMPLATES, message.intent).segments <= 2


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("dossier.received", {"receipt_no": 17}),
        ("dossier.received", {"receipt_no": RECEIPT, "due_at": "2019-03-15 17:00"}),
        ("payment.requested", {"amount_vnd": "150000"}),
        ("payment.requested", {"amount_vnd": -5}),
        ("dossier.overdue", {"detected_at": "2019-03-15T17:00:00+07:00"}),
        ("dossier.submitted", {"applicant": "Nguyễn Văn A"}),
    ],
)
def test_badly_typed_data_is_invalid(kind: str, data: dict[str, object]) -> None:
    with pytest.raises(InvalidEventError):
        apply(None, event(kind, data))


def test_an_event_for_another_dossier_is_refused() -> None:
    other = Event("dossier.withdrawn", "portal/dev", "x", T0, {"dossier_id": "other"})
    with pytest.raises(InvalidEventError):
        apply(DossierState(DOSSIER), other)


def test_naive_event_time_is_refused() -> None:
    with pytest.raises(InvalidEventError):
        Event("dossier.withdrawn", "portal/dev", "x", datetime(2019, 3, 4), {"dossier_id": "d"})


def test_opted_out_numbers_are_suppressed() -> None:
    decision = run(submitted(), received())
    assert apply_opt_outs(decision.outgoing, {"+84999999999"}) == decision.outgoing
    (suppressed,) = apply_opt_outs(decision.outgoing, {PHONE})
    assert isinstance(suppressed, SuppressSms) and suppressed.reason == OPTED_OUT


# --- idempotency -----------------------------------------------------------------------------


def test_a_redelivered_event_gives_the_same_key() -> None:
    state = run(submitted()).state
    again = received()
    first, second = only_sms(apply(state, again)), only_sms(apply(state, again))
    assert first.intent.key == second.intent.key
    assert only_sms(apply(state, received())).intent.key != first.intent.key  # new event id


parts = st.tuples(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8))


@given(parts, parts)
def test_idempotency_keys_differ_when_any_part_differs(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    assert (idempotency_key(*a) == idempotency_key(*b)) == (a == b)


def test_idempotency_keys_are_not_fooled_by_separators() -> None:
    assert idempotency_key("a:b", "c", "t") != idempotency_key("a", "b:c", "t")
    assert idempotency_key("portal/dev", "1", "dossier_received").startswith("sms:")


# --- overdue apology -------------------------------------------------------------------------

DUE = "2019-03-15T17:00:00+07:00"
DETECTED = datetime(2019, 3, 15, 17, 1, tzinfo=ICT)
GRACE = SmsPolicy(overdue_grace=timedelta(hours=4))


def overdue(at: datetime = DETECTED, event_id: str = "overdue-1") -> Event:
    return event(
        "dossier.overdue",
        {"due_at": DUE, "detected_at": at.isoformat()},
        at=at,
        source="motcua/metrics",
        event_id=event_id,
    )


def apology(new_due_at: str = "2019-03-22T17:00:00+07:00", at: datetime = DETECTED) -> Event:
    return event("dossier.apology_issued", {"reason": "x", "new_due_at": new_due_at}, at=at)


def received_and_overdue() -> DossierState:
    state = run(submitted(), received()).state
    state, out = apply(state, overdue(), GRACE)
    assert out == ()  # never at once: an apology may still come
    return state


def test_overdue_without_apology_sends_ours_after_the_grace() -> None:
    state = received_and_overdue()
    release = DETECTED + timedelta(hours=4)
    assert next_wakeup(state, GRACE) == release
    assert tick(state, release - timedelta(microseconds=1), GRACE).outgoing == ()
    state, out = tick(state, release, GRACE)
    (message,) = out
    assert isinstance(message, SendSms)
    assert message.intent.template == "overdue_apology"
    assert message.intent.field_map() == {"ref": RECEIPT, "due_date": "15/03/2019"}
    assert message.intent.key == idempotency_key("motcua/metrics", "overdue-1", "overdue_apology")
    assert tick(state, release + timedelta(days=1), GRACE).outgoing == ()  # only once
    assert next_wakeup(state, GRACE) is None


def test_an_apology_within_the_grace_replaces_ours() -> None:
    state = received_and_overdue()
    state, out = apply(state, apology(at=DETECTED + timedelta(hours=1)), GRACE)
    assert [o.intent.template for o in out] == ["apology_issued"]
    assert tick(state, DETECTED + timedelta(days=2), GRACE).outgoing == ()


def test_an_apology_before_the_overdue_covers_it() -> None:
    state = run(submitted(), received(), apology(at=DETECTED - timedelta(days=2))).state
    state, out = apply(state, overdue(), GRACE)
    assert out == () and state.pending_overdue is None


def test_an_apology_whose_new_date_is_the_one_missed_does_not_cover() -> None:
    state = run(submitted(), received(), apology(new_due_at=DUE, at=DETECTED)).state
    state, _ = apply(state, overdue(), GRACE)
    (message,) = tick(state, DETECTED + timedelta(hours=4), GRACE).outgoing
    assert isinstance(message, SendSms) and message.intent.template == "overdue_apology"


@pytest.mark.parametrize("kind", ["dossier.resolved", "dossier.withdrawn", "dossier.rejected"])
def test_a_settled_dossier_gets_no_overdue_apology(kind: str) -> None:
    state = received_and_overdue()
    state, _ = apply(state, event(kind, {"reason": "x"}), GRACE)
    assert tick(state, DETECTED + timedelta(days=1), GRACE).outgoing == ()
    state, out = apply(state, overdue(event_id="overdue-2"), GRACE)
    assert out == () and state.pending_overdue is None


def test_no_overdue_apology_while_the_applicant_owes_documents() -> None:
    requested = event(
        "dossier.supplement_requested",
        {"reason": "scan", "requested_at": (DETECTED - timedelta(hours=1)).isoformat()},
        at=DETECTED - timedelta(hours=1),
    )
    state = run(submitted(), received(), requested).state
    state, out = apply(state, overdue(), GRACE)
    assert out == () and state.pending_overdue is None
    assert tick(state, DETECTED + timedelta(days=2), GRACE).outgoing == ()
    # a pending apology is dropped when the request comes within its grace
    state = received_and_overdue()
    state, _ = apply(state, requested, GRACE)
    assert state.pending_overdue is None
    assert tick(state, DETECTED + timedelta(days=2), GRACE).outgoing == ()
    # documents back: a later overdue (of the new due date) is apologised for again
    back = event("dossier.supplement_received", {"received_at": DETECTED.isoformat()}, at=DETECTED)
    state, out = apply(state, back, GRACE)
    assert out == () and not state.awaiting_documents
    state, _ = apply(state, overdue(at=DETECTED + timedelta(days=3), event_id="overdue-2"), GRACE)
    (message,) = tick(state, DETECTED + timedelta(days=4), GRACE).outgoing
    assert isinstance(message, SendSms) and message.intent.template == "overdue_apology"


def test_a_redelivered_overdue_keeps_the_first_deadline() -> None:
    state = received_and_overdue()
    later, _ = apply(state, overdue(at=DETECTED + timedelta(hours=3)), GRACE)
    assert later.pending_overdue == state.pending_overdue


def test_tick_refuses_a_naive_clock() -> None:
    with pytest.raises(ValueError):
        tick(received_and_overdue(), datetime(2019, 3, 16, 9, 0))


# --- quiet hours -----------------------------------------------------------------------------


def local(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2019, 3, day, hour, minute, second, tzinfo=ICT)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (local(4, 21, 59, 59), local(4, 21, 59, 59)),
        (local(4, 22, 0), local(5, 7, 0)),
        (local(4, 23, 30), local(5, 7, 0)),
        (local(5, 0, 0), local(5, 7, 0)),
        (local(5, 6, 59, 59), local(5, 7, 0)),
        (local(5, 7, 0), local(5, 7, 0)),
        (local(5, 12, 0), local(5, 12, 0)),
        # UTC input: 15:00Z is 22:00 in Vietnam, 23:59Z is 06:59, 14:59Z is 21:59
        (datetime(2019, 3, 4, 15, 0, tzinfo=UTC), local(5, 7, 0)),
        (datetime(2019, 3, 4, 23, 59, tzinfo=UTC), local(5, 7, 0)),
        (datetime(2019, 3, 4, 14, 59, tzinfo=UTC), datetime(2019, 3, 4, 14, 59, tzinfo=UTC)),
        # across the year
        (local(31, 23, 0).replace(month=12), datetime(2020, 1, 1, 7, 0, tzinfo=ICT)),
    ],
)
def test_quiet_hours_defer_non_urgent_messages_to_seven(now: datetime, expected: datetime) -> None:
    assert earliest_send_time(now, urgent=False) == expected


def test_urgent_messages_ignore_quiet_hours() -> None:
    assert earliest_send_time(local(4, 23, 30), urgent=True) == local(4, 23, 30)


def test_quiet_hours_refuse_naive_times() -> None:
    with pytest.raises(ValueError):
        earliest_send_time(datetime(2019, 3, 4, 23, 0), urgent=False)


def test_a_daytime_quiet_window() -> None:
    lunch = QuietHours(start=time(12, 0), end=time(13, 30))
    assert earliest_send_time(local(4, 12, 10), urgent=False, quiet=lunch) == local(4, 13, 30)
    assert earliest_send_time(local(4, 13, 30), urgent=False, quiet=lunch) == local(4, 13, 30)
    assert earliest_send_time(local(4, 23, 0), urgent=False, quiet=lunch) == local(4, 23, 0)


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from([UTC, ICT, timezone(timedelta(hours=-8))]),
    )
)
def test_the_send_time_is_the_first_allowed_moment(now: datetime) -> None:
    at = earliest_send_time(now, urgent=False)
    assert at >= now
    assert not DEFAULT_QUIET_HOURS.contains(at)
    assert (at == now) == (not DEFAULT_QUIET_HOURS.contains(now))
    assert at - now <= timedelta(hours=9)


# --- delivery reports ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("DELIVRD", DeliveryStatus.DELIVERED),
        ("delivered", DeliveryStatus.DELIVERED),
        ("ENROUTE", DeliveryStatus.SENT),
        ("ACCEPTD", DeliveryStatus.SENT),
        ("EXPIRED", DeliveryStatus.TEMPORARY_FAILURE),
        ("UNKNOWN", DeliveryStatus.TEMPORARY_FAILURE),
        ("UNDELIV", DeliveryStatus.PERMANENT_FAILURE),
        (" rejectd ", DeliveryStatus.PERMANENT_FAILURE),
        ("DELETED", DeliveryStatus.PERMANENT_FAILURE),
    ],
)
def test_provider_statuses(raw: str, status: DeliveryStatus) -> None:
    assert map_provider_status(raw) is status


def test_an_unknown_provider_status_is_an_error() -> None:
    with pytest.raises(UnknownProviderStatusError):
        map_provider_status("LOST_IN_SPACE")


@pytest.mark.parametrize(
    ("status", "event_type"),
    [
        (DeliveryStatus.SENT, "sms.sent"),
        (DeliveryStatus.DELIVERED, "sms.delivered"),
        (DeliveryStatus.TEMPORARY_FAILURE, "sms.failed"),
        (DeliveryStatus.PERMANENT_FAILURE, "sms.failed"),
    ],
)
def test_statuses_announce_contract_event_types(status: DeliveryStatus, event_type: str) -> None:
    assert sms_event_type(status) == event_type


S = DeliveryStatus


@pytest.mark.parametrize(
    ("current", "report", "expected"),
    [
        (S.QUEUED, S.SENT, S.SENT),
        (S.SENT, S.DELIVERED, S.DELIVERED),
        (S.SENT, S.TEMPORARY_FAILURE, S.TEMPORARY_FAILURE),
        (S.TEMPORARY_FAILURE, S.DELIVERED, S.DELIVERED),
        (S.TEMPORARY_FAILURE, S.PERMANENT_FAILURE, S.PERMANENT_FAILURE),
        (S.TEMPORARY_FAILURE, S.SENT, S.TEMPORARY_FAILURE),  # a late "en route"
        (S.DELIVERED, S.SENT, S.DELIVERED),
        (S.DELIVERED, S.TEMPORARY_FAILURE, S.DELIVERED),
        (S.DELIVERED, S.PERMANENT_FAILURE, S.DELIVERED),
        (S.PERMANENT_FAILURE, S.DELIVERED, S.PERMANENT_FAILURE),
        (S.SENT, S.QUEUED, S.SENT),
    ],
)
def test_delivery_state_transitions(current: S, report: S, expected: S) -> None:
    assert next_delivery_state(current, report) is expected


@given(st.lists(st.sampled_from(list(DeliveryStatus)), max_size=30))
def test_delivered_never_goes_back_whatever_the_order_of_reports(reports: list[S]) -> None:
    state = S.QUEUED
    seen_final = None
    for report in reports:
        state = next_delivery_state(state, report)
        if seen_final is not None:
            assert state is seen_final
        if state in (S.DELIVERED, S.PERMANENT_FAILURE):
            seen_final = state
    if S.DELIVERED in reports and seen_final is None:
        pytest.fail("a delivered report was lost")


# --- provider weighting ----------------------------------------------------------------------


def test_pick_gives_each_provider_its_share() -> None:
    weights = ProviderWeights.of({"primary": 70, "secondary": 30})
    picks = [pick_provider(weights, i / 1000) for i in range(1000)]
    assert picks.count("primary") == 700 and picks.count("secondary") == 300


def test_a_zero_weight_provider_is_never_picked_but_still_a_fallback() -> None:
    weights = ProviderWeights.of({"primary": 100, "secondary": 0})
    assert {pick_provider(weights, r / 100) for r in range(100)} == {"primary"}
    assert failover_order(weights, 0.99) == ("primary", "secondary")


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5])
def test_pick_needs_r_in_unit_interval(r: float) -> None:
    with pytest.raises(ValueError):
        pick_provider(ProviderWeights.of({"primary": 1}), r)


def test_weights_must_make_sense() -> None:
    with pytest.raises(ValueError):
        ProviderWeights.of({"primary": 0, "secondary": 0})
    with pytest.raises(ValueError):
        ProviderWeights.of({"primary": -1, "secondary": 5})


@given(st.floats(min_value=0, max_value=1, exclude_max=True))
def test_failover_tries_every_provider_once_starting_with_the_pick(r: float) -> None:
    weights = ProviderWeights.of({"a": 50, "b": 30, "c": 20})
    order = failover_order(weights, r)
    assert order[0] == pick_provider(weights, r)
    assert sorted(order) == ["a", "b", "c"]


NOON = datetime(2019, 3, 4, 12, 0, tzinfo=ICT)


def test_weight_moves_away_from_a_failing_provider_with_cooldown_and_floor() -> None:
    weights = ProviderWeights.of({"primary": 50, "secondary": 50})
    moved = shift_weight_away(weights, "secondary", NOON)
    assert moved.as_dict() == {"primary": 60, "secondary": 40}
    assert moved.changed_at == NOON
    # within the cool-down nothing moves
    assert shift_weight_away(moved, "secondary", NOON + timedelta(minutes=9)) == moved
    later = moved
    for step in range(1, 10):
        later = shift_weight_away(later, "secondary", NOON + timedelta(minutes=10 * step))
    assert later.as_dict() == {"primary": 90, "secondary": 10}  # the floor keeps it probed
    # and it can win weight back when the other one falters
    back = shift_weight_away(later, "primary", NOON + timedelta(hours=3))
    assert back.as_dict() == {"primary": 80, "secondary": 20}


def test_shifting_from_an_unknown_or_only_provider_changes_nothing() -> None:
    weights = ProviderWeights.of({"primary": 50, "secondary": 50})
    assert shift_weight_away(weights, "tertiary", NOON) == weights
    alone = ProviderWeights.of({"primary": 100})
    assert shift_weight_away(alone, "primary", NOON) == alone


@given(
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 100), min_size=2).filter(
        lambda w: sum(w.values()) > 0
    ),
    st.lists(st.sampled_from("abcd"), max_size=20),
    st.integers(1, 30),
    st.integers(0, 30),
)
def test_shifting_keeps_the_total_and_the_floor(
    start: dict[str, int], failing: list[str], step: int, floor: int
) -> None:
    weights = ProviderWeights.of(start)
    total = sum(start.values())
    for i, name in enumerate(failing):
        before = weights.as_dict()
        weights = shift_weight_away(
            weights, name, NOON + timedelta(hours=i), step=step, floor=floor
        )
        after = weights.as_dict()
        assert sum(after.values()) == total
        if name in before:
            assert after[name] >= min(before[name], floor)
            assert after[name] >= before[name] - step


def test_state_round_trips_through_json_for_the_faust_table() -> None:
    from pydantic import TypeAdapter

    adapter = TypeAdapter(DossierState)
    landline = run(submitted(phone="0258 3822 123"), received()).state
    settled = run(submitted(), received(), apology(), event("dossier.resolved")).state
    waiting = run(received(), event("payment.requested", {"amount_vnd": 1})).state
    for value in (landline, settled, received_and_overdue(), waiting):
        assert adapter.validate_json(adapter.dump_json(value)) == value
