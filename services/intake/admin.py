"""Portal keys without a restart (CONTRACT section 8, role `admin`): list, add or rotate, revoke.

`GET /v1/admin/portal-keys` lists every key (source, key id, state, when, where it comes from;
never a hash). `POST /v1/admin/portal-keys` `{"source", "rotate"}` makes a key
(`secrets.token_urlsafe(32)`), writes its hash to `portal.keys` (acks=all) and answers 201
`{source, key_id, key}`: the only time the key is shown. `add` refuses a source with an active key
(409); `rotate` adds one more to a source that has one, the earlier ones stay valid until they
are revoked. `DELETE /v1/admin/portal-keys/{key_id}` writes its revocation (204; 404 for an id
never issued). Every replica follows the topic (`portal_keys_view.PortalKeys`); this one folds
its own write in before answering.

Each change is one `audit.portal_key_add`, `audit.portal_key_rotate` or
`audit.portal_key_revoke` on `audit.events`, target `<source>/<key id>`, never the key.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, request_id
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.events import AuditAction
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.operators import Operator, Role
from services.common.portal_keys import (
    RESERVED_PREFIX,
    SOURCE_PATTERN,
    KeyEntry,
    KeyRecord,
    Refusal,
    decide_add,
    decide_revoke,
)
from services.common.portal_keys_view import PortalKeys
from services.common.problems import problem
from services.common.settings import hash_key
from services.common.topics import PORTAL_KEYS

log = get_logger("motcua.intake.admin")

KEY_BYTES = 32
BROKER_RETRY_AFTER_SECONDS = 2
NOT_READY_RETRY_AFTER_SECONDS = 1
PATH = "/v1/admin/portal-keys"


class NewKey(BaseModel):
    """A key to make: for `source`; `rotate` true adds it beside the source's active key."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `rotate: 0` is not a boolean

    source: str
    rotate: bool = False


def new_key_schema() -> dict[str, Any]:
    """`NewKey`'s JSON Schema with what `source_problem` asks of a source, for the document."""
    schema = NewKey.model_json_schema()
    schema["properties"]["source"].update(
        {
            "pattern": f"^{SOURCE_PATTERN.pattern}$",
            "maxLength": 200,
            "not": {"pattern": f"^{re.escape(RESERVED_PREFIX)}"},
        }
    )
    return schema


class IssuedKey(BaseModel):
    source: str
    key_id: str
    key: str


class ListedKey(BaseModel):
    source: str
    key_id: str
    state: str
    at: str | None
    origin: str


class KeyList(BaseModel):
    keys: list[ListedKey]


def refused(refusal: Refusal) -> JSONResponse:
    return problem(refusal.status, refusal.title, refusal.detail)


def broker_away(exc: BaseException) -> JSONResponse:
    return problem(
        503,
        "Broker Unavailable",
        f"the broker did not acknowledge ({type(exc).__name__}): the change may or may not be "
        "written; list the keys before trying again",
        retry_after=BROKER_RETRY_AFTER_SECONDS,
    )


def not_caught_up() -> JSONResponse:
    return problem(
        503,
        "Not Ready",
        "the portal keys are still being read from the broker",
        retry_after=NOT_READY_RETRY_AFTER_SECONDS,
    )


def body_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"pointer": "/" + "/".join(str(part) for part in error["loc"]), "detail": error["msg"]}
        for error in exc.errors()
    ]


def target(source: str, key_id: str) -> str:
    return f"{source}/{key_id}"


def register(
    api: FastAPI,
    auth: OperatorAuth,
    keyring: PortalKeys,
    publisher: DurablePublisher,
    audit: AuditRecorder,
) -> None:
    """The three portal-key endpoints on `api` (refusals answered by `install_refusals`)."""
    admin = Depends(auth.requires(Role.ADMIN))

    async def write(record: KeyRecord) -> None:
        await publisher.publish([(PORTAL_KEYS, record.key_id.encode(), record.encode())])
        keyring.apply_record(record)

    async def write_audited(
        record: KeyRecord, action: AuditAction, operator: Operator, request: Request
    ) -> JSONResponse | None:
        """Write `record` and its audit event; the 503 to answer if the write failed. A change
        written stands even if its audit event cannot be (an added key answered 503 would be
        active with nobody holding it): that is logged instead."""
        what = target(record.source, record.key_id)
        rid = request_id(request)
        try:
            await audit.audited(
                operator,
                action,
                what,
                lambda: write(record),
                request_id=rid,
                errors=INFRASTRUCTURE_ERRORS,
            )
        except INFRASTRUCTURE_ERRORS as exc:
            return broker_away(exc)
        return None

    @api.get(PATH, response_model=KeyList)
    async def list_keys(operator: Operator = admin) -> Any:
        """Every portal key known (from `MOTCUA_PORTALS` or `portal.keys`); no hash, no key."""
        if not keyring.caught_up:
            return not_caught_up()
        return JSONResponse({"keys": keyring.table.listing()})

    @api.post(
        PATH,
        status_code=201,
        response_model=IssuedKey,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": new_key_schema()}},
            }
        },
        responses={
            404: {"description": "rotate: the source has no active key"},
            409: {"description": "add: the source has an active key already"},
            422: {"description": "not a valid body, or not a portal's source"},
            503: {"description": "the broker did not acknowledge; list the keys, retry"},
        },
    )
    async def add_key(request: Request, operator: Operator = admin) -> Any:
        """Make a key for a portal (`rotate`: one more beside its active key); the answer is
        the only time the key is shown."""
        try:
            wanted = NewKey.model_validate_json(await request.body())
        except ValidationError as exc:
            return problem(
                422,
                "Invalid request",
                "the body is not a valid key request",
                errors=body_errors(exc),
            )
        if not keyring.caught_up:
            return not_caught_up()
        key = secrets.token_urlsafe(KEY_BYTES)
        decided = decide_add(
            keyring.table,
            wanted.source,
            rotate=wanted.rotate,
            key_sha256=hash_key(key),
            at=datetime.now(UTC),
        )
        if isinstance(decided, Refusal):
            return refused(decided)
        action = AuditAction.PORTAL_KEY_ROTATE if wanted.rotate else AuditAction.PORTAL_KEY_ADD
        if (away := await write_audited(decided, action, operator, request)) is not None:
            return away
        log.info("portal_key_added", source=decided.source, key_id=decided.key_id)
        return JSONResponse(
            {"source": decided.source, "key_id": decided.key_id, "key": key}, status_code=201
        )

    @api.delete(
        PATH + "/{key_id}",
        status_code=204,
        responses={
            404: {"description": "no key has this id"},
            503: {"description": "the broker did not acknowledge; list the keys, retry"},
        },
    )
    async def revoke_key(key_id: str, request: Request, operator: Operator = admin) -> Response:
        """Revoke a key: every intake replica refuses it (401) within seconds."""
        if not keyring.caught_up:
            return not_caught_up()
        decided = decide_revoke(keyring.table, key_id, at=datetime.now(UTC))
        if isinstance(decided, Refusal):
            return refused(decided)
        if isinstance(decided, KeyEntry):
            return Response(status_code=204)  # revoked already: nothing changes
        away = await write_audited(decided, AuditAction.PORTAL_KEY_REVOKE, operator, request)
        if away is not None:
            return away
        log.info("portal_key_revoked", source=decided.source, key_id=decided.key_id)
        return Response(status_code=204)
