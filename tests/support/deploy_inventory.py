"""What the code says a deployment needs, found by looking at the code (never a hand-kept list).

Run as `python -m tests.support.deploy_inventory [PARTITIONS]`: prints JSON with

- `topics`: every topic the code needs, with partitions, compaction and retention. That is
  `declared_topics(partitions)` (each topic and its `.dlq`, and the changelogs services write
  themselves), plus any topic faust would make for a service: a compacted
  `<app id>-<table>-changelog` per faust table and `<app id>-__assignor-__leader` (one
  partition) for an app whose worker runs faust's own consumer (not a producer-only app, nor an
  HTTP-only service, which runs no worker). They are found by building each registered service
  with its `bootstrap(settings)`, the way `motcua run` does, with topic creation, the worker and
  the HTTP server replaced by stubs, so nothing connects anywhere.
- `consumed`: the topics each service's batch consumer reads (each must be declared).
- `settings`: the environment variables read by every `pydantic_settings.BaseSettings` subclass
  in any module under `services`, grouped `service` or `sandbox` (a class defined in a module a
  sandbox in `services.registry.SANDBOXES` runs from).
- `routes`: each service's HTTP routes, from its own FastAPI app (`path`, `methods`,
  `operator`: the route declares the operators' bearer scheme, CONTRACT section 8, and `role`:
  the role its `OperatorAuth.requires(role)` dependency asks for, the highest when several, or
  null when it has none).
- `openapi`: each service's OpenAPI document.
- `missing_services`: registered services whose module does not import yet.

It runs in a subprocess of the test (`load(partitions)`, once per test process), so that
building the apps (faust, structlog, Prometheus registries) leaves the test session untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

import services


def import_everything() -> list[str]:
    """Import every module under `services`; return those that failed (with the reason)."""
    failed = []
    for info in pkgutil.walk_packages(services.__path__, prefix="services."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # a module being written right now must not hide the others
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
    return failed


def settings_classes() -> list[type[BaseSettings]]:
    found: dict[str, type[BaseSettings]] = {}
    for name, module in list(sys.modules.items()):
        if not (name == "services" or name.startswith("services.")) or module is None:
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, BaseSettings)
                and obj is not BaseSettings
                and obj.__module__.startswith("services.")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def env_names(cls: type[BaseSettings]) -> list[str]:
    """The variable each field is read from: its alias, or env_prefix + field name."""
    prefix = str(cls.model_config.get("env_prefix", "") or "")
    names = []
    for field_name, info in cls.model_fields.items():
        alias: Any = info.validation_alias or info.alias
        if isinstance(alias, str):
            names.append(alias.upper())
        elif isinstance(alias, AliasChoices):
            first = alias.choices[0]
            names.append(first.upper() if isinstance(first, str) else str(first.path[0]).upper())
        elif isinstance(alias, AliasPath):
            names.append(str(alias.path[0]).upper())
        else:
            names.append(f"{prefix}{field_name}".upper())
    return names


@contextlib.contextmanager
def stubbed_runtime() -> Iterator[None]:
    """Building a service must not connect anywhere: no topic creation, worker or server."""
    import faust
    import faust.contrib.asgi
    import uvicorn

    class Worker:
        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            return None

        def execute_from_commandline(self) -> None:
            return None

    async def no_topics(*args: Any, **kwargs: Any) -> None:
        return None

    patches: list[Any] = [
        mock.patch.object(faust, "Worker", Worker),
        mock.patch.object(faust.contrib.asgi, "serve_asgi", lambda *a, **k: None),
        mock.patch.object(uvicorn, "run", lambda *a, **k: None),
        mock.patch("services.common.kafka.ensure_topics", no_topics),
    ]
    for name, module in list(sys.modules.items()):
        if name.startswith("services.") and hasattr(module, "ensure_topics"):
            patches.append(mock.patch.object(module, "ensure_topics", no_topics))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def required_role(route: Any) -> str | None:
    """The role a route's `OperatorAuth.requires(role)` dependencies ask for (the highest of
    them), found in the closure of each dependency of the route, however deeply nested."""
    from services.common.auth import OperatorAuth
    from services.common.operators import Role

    rank = list(Role)  # viewer < finance < admin
    found: list[Role] = []
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        pending.extend(dependant.dependencies)
        call = dependant.call
        if not inspect.isfunction(call):
            continue
        captured = inspect.getclosurevars(call).nonlocals
        if isinstance(captured.get("self"), OperatorAuth) and isinstance(
            captured.get("role"), Role
        ):
            found.append(captured["role"])
    return max(found, key=rank.index).value if found else None


def service_routes(service: Any) -> list[dict[str, Any]]:
    """The routes of a built service's app, which of them need an operator's token, and the
    role they need."""
    from services.common.auth import OPERATOR_BEARER

    paths = service.api.openapi().get("paths", {})
    routes = []
    for route in service.api.routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        methods = sorted(getattr(route, "methods", None) or [])
        # the document names a path without its convertors (`{source}` for `{source:path}`)
        declared = paths.get(getattr(route, "path_format", path), {})
        operator = any(
            OPERATOR_BEARER.scheme_name in requirement
            for method in methods
            for requirement in declared.get(method.lower(), {}).get("security", [])
        )
        routes.append(
            {"path": path, "methods": methods, "operator": operator, "role": required_role(route)}
        )
    return routes


def inventory(partitions: int) -> dict[str, Any]:
    from services.common.service import Service
    from services.common.settings import Settings
    from services.common.topics import declared_topics
    from services.registry import SANDBOXES, SERVICES

    failed_imports = import_everything()
    sandbox_modules = {r.target.partition(":")[0] for r in SANDBOXES.values()}
    settings: dict[str, list[str]] = {"service": [], "sandbox": []}
    classes: dict[str, list[str]] = {}
    for cls in settings_classes():
        group = "sandbox" if cls.__module__ in sandbox_modules else "service"
        names = env_names(cls)
        classes[f"{cls.__module__}.{cls.__qualname__}"] = names
        settings[group].extend(n for n in names if n not in settings[group])

    topics: dict[str, dict[str, Any]] = {}
    for spec in declared_topics(partitions):
        topics[spec.name] = {
            "partitions": spec.partitions,
            "compacted": spec.compacted,
            "retention_ms": spec.retention_ms,
            "origin": "declared_topics",
        }

    settings_obj = Settings.model_validate(
        {"MOTCUA_TOPIC_PARTITIONS": partitions, "KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    )
    consumed: dict[str, list[str]] = {}
    routes: dict[str, list[dict[str, Any]]] = {}
    documents: dict[str, Any] = {}
    missing: list[str] = []
    for name, runnable in SERVICES.items():
        module_name = runnable.target.partition(":")[0]
        try:
            module = importlib.import_module(module_name)
            bootstrap = module.bootstrap
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
            continue
        with stubbed_runtime():
            service: Service = bootstrap(settings_obj)
            with contextlib.suppress(RuntimeError):
                asyncio.get_event_loop().run_until_complete(asyncio.sleep(0))
        if service.consumer is not None:
            consumed[name] = list(service.consumer.topic_names)
        routes[name] = service_routes(service)
        documents[name] = service.api.openapi()
        app = service.app
        app_id = str(app.conf.id)
        if service.needs_worker and not app.producer_only:  # faust's consumer has a leader
            topics[f"{app_id}-__assignor-__leader"] = {
                "partitions": 1,
                "compacted": False,
                "retention_ms": None,
                "origin": f"faust leader topic of {name}",
            }
        for table in app.tables.values():
            changelog = table.changelog_topic
            topics[changelog.get_topic_name()] = {
                "partitions": int(changelog.partitions or partitions),
                "compacted": bool(changelog.compacting),
                "retention_ms": int(changelog.retention * 1000) if changelog.retention else None,
                "origin": f"faust table {table.name!r} of {name}",
            }
    return {
        "topics": topics,
        "consumed": consumed,
        "routes": routes,
        "openapi": documents,
        "settings": settings,
        "settings_classes": classes,
        "missing_services": missing,
        "failed_imports": failed_imports,
    }


ROOT = Path(__file__).resolve().parents[2]


@cache
def load(partitions: int) -> dict[str, Any]:
    """The inventory, built in a subprocess (once per test process and partition count)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.deploy_inventory", str(partitions)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def main() -> None:
    partitions = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    with contextlib.redirect_stdout(sys.stderr):  # services may log while they are built
        result = inventory(partitions)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
