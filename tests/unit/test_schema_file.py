"""The committed JSON Schema in docs/ must match the models; `motcua schema` rewrites it."""

from __future__ import annotations

from pathlib import Path

import orjson

from services.common.events import DATA_MODELS, json_schemas

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "events.schema.json"


def test_committed_schema_is_up_to_date() -> None:
    expected = orjson.dumps(json_schemas(), option=orjson.OPT_INDENT_2) + b"\n"
    assert SCHEMA.read_bytes() == expected, "docs/events.schema.json is stale: run `motcua schema`"


def test_schema_covers_every_event_type() -> None:
    schema = json_schemas()
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in schema["oneOf"]} == set(DATA_MODELS)
    submitted = schema["$defs"]["dossier.submitted"]
    assert submitted["properties"]["type"]["const"] == "dossier.submitted"
