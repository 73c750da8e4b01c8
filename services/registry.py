"""The services and partner sandboxes motcua can run, by name.

A service module exposes `run(settings)`; a new service plugs in with one line here, and
`motcua run` and `motcua dev` pick it up.
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

    def load(self) -> Callable[[Settings], None]:
        module, _, function = self.target.partition(":")
        runner: Callable[[Settings], None] = getattr(importlib.import_module(module), function)
        return runner


SERVICES: dict[str, Runnable] = {
    r.name: r
    for r in [
        Runnable("intake", "services.intake.app:run", "intake_port", "portals post events"),
    ]
}

SANDBOXES: dict[str, Runnable] = {}
