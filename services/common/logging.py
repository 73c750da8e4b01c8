"""Structured logs that never carry a phone number, a name, an address or a secret."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values are personal or secret: dropped from every log line, whatever their value.
_REDACTED_KEYS = frozenset(
    {
        "name",
        "address",
        "applicant",
        "email",
        "key",
        "api_key",
        "secret",
        "secrets",
        "password",
        "token",
        "authorization",
        "body",
    }
)
_PHONE = re.compile(r"(?<!\d)(\+?84|0)(\d{2})\d{4,7}(\d{2})(?!\d)")


def mask_phone(text: str) -> str:
    """Keep a number's prefix and last two digits: enough to tell two apart, not to call."""
    return _PHONE.sub(lambda m: f"{m.group(1)}{m.group(2)}*****{m.group(3)}", text)


def _scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
        elif isinstance(event_dict[key], str):
            event_dict[key] = mask_phone(event_dict[key])
    return event_dict


# Libraries that log every request, every rebalance step or every start-up stage at INFO: their
# lines are for debugging, so they show only when the level is DEBUG.
CHATTY_LIBRARIES = ("httpx", "httpcore", "aiokafka", "faust", "mode", "uvicorn.access")


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    chatty_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatty_level)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
