"""RFC 9457 problem details: the one shape every motcua HTTP error takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from services.common.params import ParamError

PROBLEM = "application/problem+json"


def problem(
    status: int, title: str, detail: str, *, retry_after: int | None = None, **extra: Any
) -> JSONResponse:
    """A problem details response; `extra` members (such as `errors`) are added as they are."""
    slug = title.lower().replace(" ", "-")
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {
        "type": f"https://motcua.example/problems/{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def invalid_query(errors: Sequence[ParamError]) -> JSONResponse:
    """422 naming every refused query parameter."""
    return problem(
        422,
        "Invalid query parameters",
        "; ".join(f"{e.parameter}: {e.detail}" for e in errors),
        errors=[{"parameter": e.parameter, "detail": e.detail} for e in errors],
    )
