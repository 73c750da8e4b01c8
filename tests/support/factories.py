"""Valid events for tests, with any field overridden."""

from __future__ import annotations

import itertools
from typing import Any

_counter = itertools.count(1)


def submitted(
    dossier_id: str | None = None,
    *,
    source: str = "portal/test",
    event_id: str | None = None,
    time: str = "2019-03-04T08:15:00+07:00",
    **data: Any,
) -> dict[str, Any]:
    n = next(_counter)
    dossier_id = dossier_id or f"000.00.12.H34-190304-{n:04d}"
    body: dict[str, Any] = {
        "dossier_id": dossier_id,
        "agency_code": "000.00.12.H34",
        "procedure_code": "1.004227",
        "tier": "province",
        "sector": "construction",
        "channel": "online",
        "online_level": 4,
        "applicant": {
            "name": "Nguyễn Thị B",
            "phone": "0905123456",
            "address": {
                "province": "Khánh Hòa",
                "district": "Nha Trang",
                "commune": "Lộc Thọ",
                "street": "1 Trần Phú",
            },
        },
        "fee": {"amount_vnd": 150000, "method": "online"},
        "postal": {"mode": "none"},
        "submitted_at": "2019-03-04T08:15:00+07:00",
    }
    body.update(data)
    return envelope(
        "dossier.submitted",
        dossier_id,
        body,
        source=source,
        event_id=event_id or f"ev-{n}",
        time=time,
    )


def envelope(
    type_: str,
    dossier_id: str,
    data: dict[str, Any],
    *,
    source: str = "portal/test",
    event_id: str | None = None,
    time: str = "2019-03-04T08:15:00+07:00",
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or f"ev-{next(_counter)}",
        "source": source,
        "type": type_,
        "subject": dossier_id,
        "time": time,
        "datacontenttype": "application/json",
        "data": {"dossier_id": dossier_id, "agency_code": "000.00.12.H34", **data}
        if type_.startswith("dossier.")
        else {"dossier_id": dossier_id, **data},
    }
