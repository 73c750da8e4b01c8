"""Operators' tokens for tests: the dev issuer (`motcua run oidc-issuer`) as a real OIDC server,
one per test process, and access tokens it signs (CONTRACT section 8)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from services.dev.embedded import free_port
from tests.support.processes import process, wait_http


@dataclass(frozen=True)
class Issuer:
    url: str  # also the issuer identifier (`iss`) and MOTCUA_OIDC_ISSUER

    def token(
        self,
        role: str = "viewer",
        *,
        agencies: Sequence[str] | None = None,
        sub: str = "operator-test",
        **extra: object,
    ) -> str:
        """An access token for `role` (and only `agencies`, when given), valid one hour."""
        body: dict[str, object] = {"sub": sub, "roles": [role], **extra}
        if agencies is not None:
            body["agencies"] = list(agencies)
        response = httpx.post(f"{self.url}/dev/token", json=body, timeout=10)
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def headers(self, role: str = "viewer", **kwargs: object) -> dict[str, str]:
        """`Authorization: Bearer <token>` for `role`."""
        return {"Authorization": f"Bearer {self.token(role, **kwargs)}"}  # type: ignore[arg-type]


@contextmanager
def running_issuer() -> Iterator[Issuer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"OIDC_ISSUER_PORT": str(port), "MOTCUA_OIDC_ISSUER": url}
    with process(["services.cli", "run", "oidc-issuer"], env, f"oidc-issuer-{port}") as issuer:
        wait_http(f"{url}/.well-known/openid-configuration", proc=issuer)
        yield Issuer(url)
