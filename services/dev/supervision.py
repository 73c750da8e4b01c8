"""What `motcua dev` does when one of its children exits: the decision, as values, and the lines
it tells the terminal. Pure: given a child's exits and when they happened, restart it after a
backoff or give up; `devstack.Supervisor` carries the decisions out.

A child that crashes is restarted after `first_delay` seconds, then twice as long after each
further crash in a row, up to `max_delay`. A run that lasted `stable_after` seconds or more
counts as healthy: its crash starts the series again. After `give_up_after` crashes in a row,
each within `stable_after` of its start, the child is left stopped (something a restart cannot
cure, such as a port taken or a syntax error) and the rest of the stack keeps running.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    give_up_after: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError("0 < first_delay <= max_delay")
        if self.factor < 1 or self.stable_after <= 0 or self.give_up_after < 1:
            raise ValueError("factor >= 1, stable_after > 0, give_up_after >= 1")

    def delay(self, crashes: int) -> float:
        """The wait before restart number `crashes` (1-based) of a series."""
        exponent = min(crashes - 1, 64)  # past the cap long before; keeps the power finite
        return float(min(self.max_delay, self.first_delay * self.factor**exponent))


@dataclass(frozen=True)
class Crashes:
    """A child's series of crashes in a row (each within `stable_after` of its start)."""

    in_a_row: int = 0


@dataclass(frozen=True)
class Restart:
    after: float  # seconds
    attempt: int  # 1 for the first restart of a series


@dataclass(frozen=True)
class GiveUp:
    crashes: int


Decision = Restart | GiveUp


def after_exit(
    policy: RestartPolicy, crashes: Crashes, *, started_at: float, exited_at: float
) -> tuple[Decision, Crashes]:
    """What to do about a child that started at `started_at` and exited at `exited_at` (seconds
    on one clock), after the series `crashes`; and the series from now on."""
    healthy_run = exited_at - started_at >= policy.stable_after
    in_a_row = 1 if healthy_run else crashes.in_a_row + 1
    series = Crashes(in_a_row)
    if in_a_row > policy.give_up_after:
        return GiveUp(in_a_row - 1), series
    return Restart(policy.delay(in_a_row), in_a_row), series


def describe_exit(returncode: int) -> str:
    """`exited with status 1`, `was killed by SIGKILL`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def exit_line(name: str, returncode: int, decision: Decision, log_path: str) -> str:
    """The one line the terminal gets about a child's exit."""
    what = f"{name} {describe_exit(returncode)}"
    if isinstance(decision, GiveUp):
        return (
            f"{what}; it crashed {decision.crashes} times in a row, so it stays stopped "
            f"(the rest keeps running; see {log_path})"
        )
    ordinal = "" if decision.attempt == 1 else f", attempt {decision.attempt}"
    return f"{what}; restarting it in {_seconds(decision.after)}{ordinal} (log: {log_path})"


# --- what of a child's log the terminal shows ---------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT|\{|--- motcua dev:)")
_LOUD = re.compile(
    r"^\S+ \[(warning|error|critical|exception) *\]"
    r"|\"level\": ?\"(warning|error|critical|exception)\""
)


def worth_showing(line: str) -> bool:
    """Whether a line of a child's log goes to the terminal too: warnings and errors, and what
    is no log line at all (a traceback, a crash message); never an info or debug line."""
    if not line.strip():
        return False
    return bool(_LOUD.search(line)) or not _LOG_LINE.match(line)
