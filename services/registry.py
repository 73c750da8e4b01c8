"""The services and partner sandboxes motcua can run, by name.

A service's `bootstrap` module exposes `run(settings)`; a new service plugs in with one line here,
and `motcua run` and `motcua dev` pick it up. The sandboxes and the dev tools (the development
OpenID Connect issuer) are named here too, but their modules (`services.sandboxes`,
`services.dev`) are in the dev install only, never in the production wheel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from services.common.settings import Settings


@dataclass(frozen=True)
class Runnable:
    name: str
    target: str  # "module:function" taking Settings
    port_setting: str  # the Settings field holding its HTTP port
    description: str

    def port(self, settings: Settings) -> int:
        port: int = getattr(settings, self.port_setting)
        return port

    def load(self) -> Callable[[Settings], None]:
        module, _, function = self.target.partition(":")
        runner: Callable[[Settings], None] = getattr(importlib.import_module(module), function)
        return runner


SERVICES: dict[str, Runnable] = {
    r.name: r
    for r in [
        Runnable(
            "metrics", "services.metrics.bootstrap:run", "metrics_port", "metrics and dashboard"
        ),
        Runnable("intake", "services.intake.bootstrap:run", "intake_port", "portals post events"),
        Runnable(
            "payments", "services.payments.bootstrap:run", "payments_port", "online fees, IPN"
        ),
        Runnable("postal", "services.postal.bootstrap:run", "postal_port", "pickup and return"),
        Runnable("sms", "services.sms.bootstrap:run", "sms_port", "SMS to applicants"),
        Runnable(
            "portals", "services.portals.bootstrap:run", "portals_port", "callbacks to portals"
        ),
    ]
}

SANDBOXES: dict[str, Runnable] = {
    r.name: r
    for r in [
        Runnable(
            "vnpay-sandbox",
            "services.sandboxes.bank:run",
            "vnpay_sandbox_port",
            "fake VNPAY-style gateway",
        ),
        Runnable(
            "vnpost-sandbox",
            "services.sandboxes.post_office:run",
            "vnpost_sandbox_port",
            "fake VNPost carrier",
        ),
        Runnable(
            "sms-primary-sandbox",
            "services.sandboxes.sms_gateway:run_primary",
            "sms_primary_sandbox_port",
            "fake SMS gateway `primary`",
        ),
        Runnable(
            "sms-secondary-sandbox",
            "services.sandboxes.sms_gateway:run_secondary",
            "sms_secondary_sandbox_port",
            "fake SMS gateway `secondary`",
        ),
        Runnable(
            "portal-sandbox",
            "services.sandboxes.portal:run",
            "portal_sandbox_port",
            "fake portal receiving callbacks",
        ),
    ]
}

# What `motcua dev` runs besides the services and the sandboxes; never deployed.
DEV_TOOLS: dict[str, Runnable] = {
    r.name: r
    for r in [
        Runnable(
            "oidc-issuer",
            "services.dev.issuer:run",
            "oidc_issuer_port",
            "development OpenID Connect issuer",
        ),
    ]
}
