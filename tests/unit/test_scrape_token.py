"""`/metrics` behind Prometheus' scrape token (MOTCUA_METRICS_SCRAPE_TOKEN): the route every
service gets from `add_operational_routes`, through FastAPI's ASGI app (no server)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from services.common.scrape import scrape_refusal
from services.common.service import add_operational_routes, always_ready
from services.common.settings import Settings

TOKEN = "s3cret-scrape-token"


async def scrape(scrape_token: str, headers: dict[str, str] | None = None) -> httpx.Response:
    api = FastAPI()
    add_operational_routes(api, always_ready, scrape_token=scrape_token)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
        return await client.get("/metrics", headers=headers)


async def test_without_a_token_set_metrics_is_open() -> None:
    answer = await scrape("")
    assert answer.status_code == 200
    assert "motcua_ready" in answer.text


async def test_with_the_token_set_only_a_scrape_sending_it_reads_the_metrics() -> None:
    allowed = await scrape(TOKEN, {"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code == 200 and "motcua_ready" in allowed.text
    assert (await scrape(TOKEN, {"Authorization": f"bearer {TOKEN}"})).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer another-token",
    ],
)
async def test_with_the_token_set_any_other_scrape_is_401_with_a_problem(
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else None
    answer = await scrape(TOKEN, headers)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["status"] == 401
    assert TOKEN not in answer.text and "motcua_ready" not in answer.text


def test_the_refusal_is_none_only_for_the_token_or_when_none_is_set() -> None:
    assert scrape_refusal(None, "") is None
    assert scrape_refusal("Bearer anything", "") is None
    assert scrape_refusal(f"Bearer {TOKEN}", TOKEN) is None
    wrong = scrape_refusal("Bearer nope", TOKEN)
    assert wrong is not None and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert scrape_refusal("Bearer ấ-not-ascii", TOKEN) is not None  # compared as bytes: no error
    missing = scrape_refusal(None, TOKEN)
    assert missing is not None and "invalid_token" not in missing.headers["www-authenticate"]


def test_the_document_declares_the_scheme_only_when_the_token_is_set() -> None:
    open_api, guarded = FastAPI(), FastAPI()
    add_operational_routes(open_api, always_ready)
    add_operational_routes(guarded, always_ready, scrape_token=TOKEN)
    opened = open_api.openapi()["paths"]["/metrics"]["get"]
    assert "security" not in opened and "401" not in opened["responses"]
    document = guarded.openapi()
    operation = document["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"scrapeToken": []}]
    assert "401" in operation["responses"]
    scheme = document["components"]["securitySchemes"]["scrapeToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    # /healthz and /readyz stay open
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_the_setting_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_scrape_token == ""
    monkeypatch.setenv("MOTCUA_METRICS_SCRAPE_TOKEN", TOKEN)
    assert Settings().metrics_scrape_token == TOKEN
