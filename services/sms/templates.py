"""SMS templates as data (`templates.toml`) and rendering them into checked text. Pure."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Final

from services.sms.text import Encoding, check_length, fold_diacritics

_PLACEHOLDER = re.compile(r"\(\(([a-z][a-z0-9_]*)\)\)")

# The fields the decision core supplies for each template. Loading checks the data file against
# it, so a template asking for a field the core never fills fails at start-up, not at 3 a.m.
TEMPLATE_FIELDS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "dossier_received": frozenset({"receipt_no", "due_date"}),
        "supplement_requested": frozenset({"ref", "reason"}),
        "result_ready_at_desk": frozenset({"ref"}),
        "result_ready_by_post": frozenset({"ref"}),
        "dossier_rejected": frozenset({"ref", "reason"}),
        "dossier_withdrawn": frozenset({"ref"}),
        "apology_issued": frozenset({"ref", "new_due_date"}),
        "overdue_apology": frozenset({"ref", "due_date"}),
        "payment_requested": frozenset({"ref", "amount", "payment_url"}),
        "payment_received": frozenset({"ref", "amount"}),
        "postal_pickup_booked": frozenset({"ref"}),
        "postal_picked_up": frozenset({"ref"}),
        "postal_out_for_delivery": frozenset({"ref"}),
        "postal_delivered": frozenset({"ref"}),
        "survey_invite": frozenset({"ref", "survey_url"}),
    }
)


class TemplateError(ValueError):
    """The template data is malformed or does not match what the core supplies."""


class MissingFieldError(KeyError):
    """A placeholder has no (or an empty) value: the message must not go out with a hole."""

    def __init__(self, template: str, missing: Sequence[str]) -> None:
        super().__init__(f"template {template!r} is missing field(s): {', '.join(missing)}")
        self.template = template
        self.missing = tuple(missing)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Template:
    name: str
    body: str
    fold: bool = True
    urgent: bool = False

    @property
    def fields(self) -> frozenset[str]:
        return placeholders(self.body)


@dataclass(frozen=True)
class RenderedSms:
    template: str
    text: str
    encoding: Encoding
    units: int
    segments: int
    urgent: bool


def placeholders(body: str) -> frozenset[str]:
    return frozenset(_PLACEHOLDER.findall(body))


def _check_template(template: Template, expected: Mapping[str, frozenset[str]] | None) -> None:
    if not template.body.strip():
        raise TemplateError(f"template {template.name!r} has an empty body")
    leftover = _PLACEHOLDER.sub("", template.body)
    if "((" in leftover or "))" in leftover:
        raise TemplateError(f"template {template.name!r} has a malformed ((placeholder))")
    if expected is not None:
        supplied = expected.get(template.name)
        if supplied is None:
            raise TemplateError(f"template {template.name!r} is not used by the core")
        unknown = template.fields - supplied
        if unknown:
            raise TemplateError(
                f"template {template.name!r} asks for field(s) the core never supplies: "
                f"{', '.join(sorted(unknown))}"
            )


def parse_templates(
    toml_text: str, expected: Mapping[str, frozenset[str]] | None = TEMPLATE_FIELDS
) -> Mapping[str, Template]:
    """Templates from the TOML data; with `expected`, every expected template must be there."""
    try:
        document = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"templates are not valid TOML: {exc}") from exc
    entries = document.get("template")
    if not isinstance(entries, list):
        raise TemplateError("templates must be a [[template]] array")
    templates: dict[str, Template] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise TemplateError("each [[template]] must be a table")
        unknown_keys = set(entry) - {"name", "body", "fold", "urgent"}
        name, body = entry.get("name"), entry.get("body")
        fold, urgent = entry.get("fold", True), entry.get("urgent", False)
        if unknown_keys:
            raise TemplateError(f"template {name!r} has unknown key(s) {sorted(unknown_keys)}")
        if not isinstance(name, str) or not name or not isinstance(body, str):
            raise TemplateError(f"template {name!r} needs a string name and body")
        if not isinstance(fold, bool) or not isinstance(urgent, bool):
            raise TemplateError(f"template {name!r}: fold and urgent must be true or false")
        if name in templates:
            raise TemplateError(f"template {name!r} is defined twice")
        template = Template(name=name, body=body, fold=fold, urgent=urgent)
        _check_template(template, expected)
        templates[name] = template
    if expected is not None:
        absent = set(expected) - set(templates)
        if absent:
            raise TemplateError(f"template(s) missing from the data: {', '.join(sorted(absent))}")
    return MappingProxyType(templates)


def load_templates() -> Mapping[str, Template]:
    """The templates shipped with the service (reads package data once, at start-up)."""
    text = resources.files("services.sms").joinpath("templates.toml").read_text("utf-8")
    return parse_templates(text)


def render(template: Template, fields: Mapping[str, str]) -> RenderedSms:
    """Fill the placeholders; raise MissingFieldError or text.MessageTooLongError, never guess."""
    filled = {k: " ".join(v.split()) for k, v in fields.items()}  # no stray newlines or tabs
    missing = sorted(name for name in template.fields if not filled.get(name))
    if missing:
        raise MissingFieldError(template.name, missing)
    # One pass, so a value that happens to contain ((x)) is not expanded again.
    text = _PLACEHOLDER.sub(lambda m: filled[m.group(1)], template.body)
    if template.fold:
        text = fold_diacritics(text)
    described = check_length(text)
    return RenderedSms(
        template=template.name,
        text=described.text,
        encoding=described.encoding,
        units=described.units,
        segments=described.segments,
        urgent=template.urgent,
    )
