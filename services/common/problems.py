"""RFC 9457 problem details: the one shape every motcua HTTP error takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

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


class Located(Protocol):
    """A complaint about one field of a request body: where (a JSON pointer) and what."""

    @property
    def pointer(self) -> str: ...

    @property
    def detail(self) -> str: ...


def invalid_body(title: str, errors: Sequence[Located]) -> JSONResponse:
    """422 naming every refused field of a request body by its JSON pointer ("" the body)."""
    return problem(
        422,
        title,
        "; ".join(f"{e.pointer or 'body'}: {e.detail}" for e in errors),
        errors=[{"pointer": e.pointer, "detail": e.detail} for e in errors],
    )
