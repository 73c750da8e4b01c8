"""A data subject's requests (CONTRACT sections 8 and 10, role `admin`).

- `DELETE /v1/dossiers/{dossier_id}/personal-data` erases the dossier's personal data: the
  tombstone of its data key on `dossier.keys` (acks=all; and intake's claim of making the key
  deleted from Redis, which may hold a wrapped copy), after which no service can open its
  sealed fields anywhere (topics, changelogs, dead letters): an SMS not yet sent is suppressed
  (`erased`), a postal order not yet booked fails (`erased`); the figures, which never used
  them, are unchanged. Answers 202 (again for a dossier erased before: nothing changes but the
  audit trail). One `audit.personal_data_erased`, target the dossier id.
- `GET /v1/dossiers/{dossier_id}/personal-data` answers what motcua holds about the dossier's
  applicant, opened (the sealed fields of its `dossier.submitted`, read from `dossier.events`),
  and which services use which field for what (a field that cannot be opened, its key wrapped
  by a KEK no longer listed in `MOTCUA_KEK`, is null). 404 for a dossier motcua never heard of.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse

from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, request_id
from services.common.changelog import read_to_end
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.data_keys import DataKeys, KeyErased
from services.common.events import CODE_MAX, ID_PATTERN, AuditAction, InvalidEvent, decode_event
from services.common.kafka import DurablePublisher, dossier_partition
from services.common.logging import get_logger
from services.common.operators import Operator, Role
from services.common.problems import problem
from services.common.sealing import (
    SealingError,
    field_name,
    is_sealed,
    personal_values,
    unseal,
)
from services.common.topics import DOSSIER_EVENTS, DOSSIER_KEYS

log = get_logger("motcua.intake.personal_data")

PATH = "/v1/dossiers/{dossier_id}/personal-data"

# Which service uses which personal field, and for what (the access request's answer).
USES: Final = (
    {
        "service": "intake",
        "fields": [
            "applicant.name",
            "applicant.phone",
            "applicant.email",
            "applicant.address",
            "postal.address",
        ],
        "purpose": "receives them from the portal and seals them with the dossier's key",
    },
    {
        "service": "sms",
        "fields": ["applicant.phone"],
        "purpose": "sends the applicant SMS about the dossier (opened for each send)",
    },
    {
        "service": "postal",
        "fields": ["applicant.name", "applicant.phone", "applicant.address", "postal.address"],
        "purpose": "books pickup and return with the post office (opened for each booking)",
    },
)


_DOSSIER_ID = re.compile(ID_PATTERN)
# The path parameter as the document states it (a dossier id as the events carry it); checked
# by `dossier_problem`, which answers a problem document naming it.
DossierId = Annotated[
    str,
    Path(json_schema_extra={"minLength": 1, "maxLength": CODE_MAX, "pattern": ID_PATTERN}),
]


def dossier_problem(dossier_id: str) -> JSONResponse | None:
    if len(dossier_id) > CODE_MAX or not _DOSSIER_ID.match(dossier_id):
        return problem(
            422,
            "Invalid dossier id",
            f"a dossier id has 1 to {CODE_MAX} characters, not blank, no control character",
            errors=[{"pointer": "/dossier_id", "detail": "not a dossier id"}],
        )
    return None


def keys_not_read() -> JSONResponse:
    return problem(
        503, "Not Ready", "the dossiers' keys are still being read from the broker", retry_after=1
    )


async def submitted_data(bootstrap: str, partitions: int, dossier_id: str) -> dict[str, Any] | None:
    """The `data` of the dossier's latest `dossier.submitted` on `dossier.events` (its
    partition read to the end); None when there is none."""
    key = dossier_id.encode()
    found: dict[str, Any] | None = None
    partition = dossier_partition(key, partitions)
    async for batch in read_to_end(bootstrap, DOSSIER_EVENTS, [partition]):
        for records in batch.values():
            for record in records:
                value = record.value
                if record.key != key or not value or b"dossier.submitted" not in value:
                    continue
                with contextlib.suppress(InvalidEvent):
                    event = decode_event(value)
                    if event.type == "dossier.submitted":
                        found = event.to_dict()["data"]
    return found


def register(
    api: FastAPI,
    auth: OperatorAuth,
    keys: DataKeys,
    publisher: DurablePublisher,
    audit: AuditRecorder,
    *,
    forget_key_claim: Callable[[str], Awaitable[None]],
    bootstrap: str,
    partitions: int,
) -> None:
    admin = Depends(auth.requires(Role.ADMIN))

    @api.delete(
        PATH,
        status_code=202,
        responses={
            202: {"description": "erased: no service can read the dossier's personal data"},
            422: {"description": "not a dossier id"},
            503: {"description": "the broker did not acknowledge; retry (it is idempotent)"},
        },
    )
    async def erase(dossier_id: DossierId, request: Request, operator: Operator = admin) -> Any:
        """Erase the dossier's personal data everywhere at once: its data key is destroyed."""
        if (bad := dossier_problem(dossier_id)) is not None:
            return bad
        rid = request_id(request)
        action = AuditAction.PERSONAL_DATA_ERASED
        try:
            await audit.audited(
                operator,
                action,
                dossier_id,
                lambda: publisher.publish([(DOSSIER_KEYS, dossier_id.encode(), None)]),
                request_id=rid,
                errors=INFRASTRUCTURE_ERRORS,
            )
        except INFRASTRUCTURE_ERRORS as exc:
            return problem(
                503,
                "Broker Unavailable",
                f"the erasure was not acknowledged ({type(exc).__name__}); retry",
                retry_after=2,
            )
        keys.apply_written(dossier_id, None)
        await forget_key_claim(dossier_id)  # a claim may hold a copy of the key, wrapped
        log.info("personal_data_erased", dossier_id=dossier_id)
        return JSONResponse({"dossier_id": dossier_id, "erased": True}, status_code=202)

    @api.get(
        PATH,
        responses={
            404: {"description": "motcua holds nothing about this dossier"},
            422: {"description": "not a dossier id"},
            503: {"description": "the keys or the events cannot be read now; retry"},
        },
    )
    async def access(dossier_id: DossierId, operator: Operator = admin) -> Any:
        """What motcua holds about the dossier's applicant (in clear), and who uses it."""
        if (bad := dossier_problem(dossier_id)) is not None:
            return bad
        if not keys.caught_up:
            return keys_not_read()
        data = await submitted_data(bootstrap, partitions, dossier_id)
        erased = keys.erased(dossier_id)
        if data is None and not erased and dossier_id not in keys:
            return problem(404, "Not Found", f"motcua holds nothing about dossier {dossier_id!r}")
        held: dict[str, Any] = {}
        if data is not None and not erased:
            try:
                data_key = await keys.data_key(dossier_id)
            except KeyErased:
                erased = True
            except SealingError:  # wrapped by a KEK no longer listed, or altered
                held = {field_name(s, n): None for s, n, _ in personal_values(data)}
            else:
                for section, name, value in personal_values(data):
                    field = field_name(section, name)
                    try:
                        held[field] = (
                            unseal(data_key, dossier_id, field, value)
                            if is_sealed(value)
                            else value
                        )
                    except SealingError:
                        held[field] = None  # altered on the topic: nothing readable is held
        return JSONResponse(
            {
                "dossier_id": dossier_id,
                "erased": erased,
                "personal_data": held,
                "used_by": list(USES),
            }
        )
