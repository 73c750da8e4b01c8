"""Structured logs that never carry a phone number, a name, an address or a secret, and that
input cannot forge: one format for our lines and the libraries' (uvicorn, faust, httpx).

Every line goes through the same processors (`processors`): personal or secret keys are dropped,
phone numbers in any common written form are masked (`mask_phone`), and control characters are
escaped (`escape_control`) so that an id carrying a newline or a terminal escape cannot start a
fake line or repaint the terminal. Both are pure functions of one string.
"""

from __future__ import annotations

import logging
import re
import sys
import unicodedata
from collections.abc import MutableMapping
from typing import Any

import structlog

from services.common.tracing import add_trace_id

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

# --- phone numbers -----------------------------------------------------------------------------
# A Vietnamese number as people write it: a prefix (`0`, `84`, `+84`, `(+84)`, `0084`, optionally
# with the trunk `0` or `(0)` after the country code), then digit groups of at least two digits
# separated by at most one space, dot or hyphen (`0905 333 444`, `0905.333.444`, `+84 905-333-444`,
# `024 3825 1234`). It must stand alone: not glued to a word, and not one part of a dotted or
# hyphenated token (`000.00.05.H34-261126-0001`, `2026-11-26`, `127.0.0.1`).
_SEP = r"[ .\-]"
_PHONE = re.compile(
    r"(?<![\w+])(?<!\w[.\-])"
    r"(?P<prefix>"
    rf"(?:\(\+?84\)|\+84|0084){_SEP}?(?:\(0\){_SEP}?|0)?"  # international, maybe with trunk 0
    r"|84(?:\(0\)|0)?"  # bare country code: only glued to the number (84905333444)
    r"|0"  # national trunk prefix: glued to the first group (0905 ..., 024 ...)
    r")"
    rf"(?P<number>\d{{2,}}(?:{_SEP}\d{{2,}})*)"
    r"(?!\w)(?![.\-]\d)"
)
_GROUP = re.compile(rf"{_SEP}?\d+")
_SEPARATORS = re.compile(_SEP)


def is_national_number(digits: str) -> bool:
    """A Vietnamese national significant number (after `0` or `84`): a mobile (9 digits, first
    3, 5, 7, 8 or 9), a landline (10 digits, first 2: area code then subscriber) or a mobile of
    the pre-2018 11-digit plan (10 digits, first 1)."""
    if len(digits) == 9:
        return digits[0] in "35789"
    return len(digits) == 10 and digits[0] in "12"


def _mask_match(match: re.Match[str]) -> str:
    # The longest run of leading groups that is a number, written with one separator and ending
    # at a space or at the end: `0905 333 444 12 times` masks the phone and keeps the count, and
    # `0299-01-01 000.00.05` is left alone.
    groups = _GROUP.findall(match.group("number"))
    for end in range(len(groups), 0, -1):
        if end < len(groups) and not groups[end].startswith(" "):
            continue
        if len({group[0] for group in groups[1:end]}) > 1:
            continue
        digits = "".join(group.lstrip(" .-") for group in groups[:end])
        if is_national_number(digits):
            prefix = _SEPARATORS.sub("", match.group("prefix")).removesuffix("(0)")
            if prefix != "0" and prefix.endswith("0"):
                prefix = prefix[:-1]  # the trunk 0 after a country code
            return f"{prefix}{digits[:2]}*****{digits[-2:]}" + "".join(groups[end:])
    return match.group(0)


def mask_phone(text: str) -> str:
    """Mask every phone number in `text`, keeping its prefix, the first two and the last two
    digits: enough to tell two apart, not to call. Anything else stays as it was."""
    if not any(c.isdigit() for c in text):
        return text
    return _PHONE.sub(_mask_match, text)


# --- control characters ------------------------------------------------------------------------
# C0 and C1 controls and DEL (Cc), the format characters (Cf: bidirectional overrides and
# isolates, which reorder what a reader sees, zero-width characters, tags), the line and
# paragraph separators (Zl, Zp) and lone surrogates (Cs).
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_ASCII_CONTROL = re.compile("[\x00-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_control(text: str) -> str:
    """`text` with every control or invisible formatting character written as an escape
    (`\\n`, `\\x1b`, `\\u202e`): one log line stays one line and shows what was sent."""
    if text.isascii():
        return _ASCII_CONTROL.sub(lambda m: _escaped(m.group(0)), text)
    return "".join(_escaped(c) if unicodedata.category(c) in _INVISIBLE else c for c in text)


def clean(text: str) -> str:
    """What a log line may carry of a string from outside: phones masked, controls escaped."""
    return escape_control(mask_phone(text))


# --- the processors ----------------------------------------------------------------------------


def _scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        value = event_dict[key]
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
        elif key == "exception" and isinstance(value, str):
            event_dict[key] = mask_phone(value)  # a traceback keeps its lines (JSON escapes them)
        elif isinstance(value, str):
            event_dict[key] = clean(value)
        elif isinstance(value, (bytes, bytearray)):
            event_dict[key] = clean(value.decode("utf-8", "backslashreplace"))
        elif isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(v, str) for v in value
        ):
            event_dict[key] = [clean(v) for v in value]
    return event_dict


# Libraries that log every request, every rebalance step or every start-up stage at INFO: their
# lines are for debugging, so they show only when the level is DEBUG.
CHATTY_LIBRARIES = ("httpx", "httpcore", "aiokafka", "faust", "mode", "uvicorn.access")


def processors(json: bool) -> list[Any]:
    """What every line goes through, ours (structlog) and the libraries' (the standard library's
    records, through `ProcessorFormatter`), before it is rendered. A traceback is plain text
    (never the frames' local variables, which may hold personal data); in JSON it is the
    `exception` member of its line."""
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        chain.append(structlog.processors.format_exc_info)
    chain.append(_scrub)
    return chain


def _renderer(json: bool) -> Any:
    if json:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback
    )


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """One format on stderr for everything the process logs: our structlog lines and the
    standard library's (uvicorn, faust, aiokafka, httpx); the chatty libraries at DEBUG only."""
    level = level.upper()
    renderer = _renderer(json)
    chain = processors(json)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *chain],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    chatty_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatty_level)
    structlog.configure(
        processors=[*chain, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
