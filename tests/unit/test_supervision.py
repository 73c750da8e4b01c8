"""`motcua dev`'s supervisor decisions: restart a crashed child after 1 s, 2 s, 4 s ... up to 30 s,
start the series again after a healthy minute, give up after ten quick crashes in a row; and what
of a child's log reaches the terminal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.dev.supervision import (
    Crashes,
    GiveUp,
    Restart,
    RestartPolicy,
    after_exit,
    describe_exit,
    exit_line,
    worth_showing,
)

POLICY = RestartPolicy()


def crash_series(policy: RestartPolicy, runs: list[float]) -> list[Restart | GiveUp]:
    """The decisions for a child whose successive runs lasted `runs` seconds."""
    crashes, decisions = Crashes(), []
    for ran in runs:
        decision, crashes = after_exit(policy, crashes, started_at=1000.0, exited_at=1000.0 + ran)
        decisions.append(decision)
    return decisions


def test_quick_crashes_back_off_1_2_4_8_16_then_30_seconds() -> None:
    decisions = crash_series(POLICY, [0.5] * 8)
    assert [d.after for d in decisions if isinstance(d, Restart)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert [d.attempt for d in decisions if isinstance(d, Restart)] == list(range(1, 9))


def test_a_healthy_minute_starts_the_series_again() -> None:
    decisions = crash_series(POLICY, [1, 1, 1, 60, 1])
    assert [d.after for d in decisions if isinstance(d, Restart)] == [1, 2, 4, 1, 2]


def test_ten_quick_crashes_in_a_row_and_it_stays_stopped() -> None:
    decisions = crash_series(POLICY, [2.0] * 11)
    assert all(isinstance(d, Restart) for d in decisions[:10])
    assert decisions[10] == GiveUp(crashes=10)


policies = st.builds(
    RestartPolicy,
    first_delay=st.floats(0.01, 10),
    factor=st.floats(1, 4),
    max_delay=st.floats(10, 120),
    stable_after=st.floats(1, 600),
    give_up_after=st.integers(1, 20),
)


@given(policies, st.lists(st.floats(0, 1000), min_size=1, max_size=40))
def test_every_restart_waits_between_the_first_and_the_longest_delay(
    policy: RestartPolicy, runs: list[float]
) -> None:
    for decision in crash_series(policy, runs):
        if isinstance(decision, Restart):
            assert 0 < policy.first_delay <= decision.after <= policy.max_delay


@given(policies, st.lists(st.floats(0, 1000), min_size=1, max_size=40))
def test_quick_crashes_never_shorten_the_wait_and_a_healthy_run_resets_it(
    policy: RestartPolicy, runs: list[float]
) -> None:
    previous: Restart | None = None
    for ran, decision in zip(runs, crash_series(policy, runs), strict=True):
        healthy = (1000.0 + ran) - 1000.0 >= policy.stable_after
        if isinstance(decision, GiveUp):
            assert not healthy and decision.crashes == policy.give_up_after
            return  # the supervisor starts it no more
        if healthy:
            assert decision == Restart(policy.first_delay, 1)
        elif previous is not None:
            assert decision.after >= previous.after
            assert decision.attempt == previous.attempt + 1
        previous = decision


def test_a_policy_that_would_restart_at_once_is_refused() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(first_delay=0)
    with pytest.raises(ValueError):
        RestartPolicy(first_delay=60, max_delay=30)


def test_what_the_terminal_is_told() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"
    assert (
        exit_line("sms", -9, Restart(1, 1), ".motcua/logs/sms.log")
        == "sms was killed by SIGKILL; restarting it in 1 s (log: .motcua/logs/sms.log)"
    )
    assert (
        exit_line("sms", 1, Restart(4, 3), "sms.log")
        == "sms exited with status 1; restarting it in 4 s, attempt 3 (log: sms.log)"
    )
    assert exit_line("sms", 1, GiveUp(10), "sms.log") == (
        "sms exited with status 1; it crashed 10 times in a row, so it stays stopped "
        "(the rest keeps running; see sms.log)"
    )


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("2026-11-26T15:09:31.53Z [info     ] sms_restored     dossiers=0", False),
        ("2026-11-26T15:09:31.53Z [debug    ] HTTP Request: POST http://x 200", False),
        ("2026-11-26T15:09:34.42Z [warning  ] webhook_redis_unavailable partner=primary", True),
        ("2026-11-26T15:09:34.42Z [error    ] webhook_failed error_type=KeyError", True),
        ('{"event": "sms_sent", "level": "info", "timestamp": "2026-11-26T15:09:34Z"}', False),
        ('{"event": "timer_failed", "level": "warning", "timestamp": "2026-11-26"}', True),
        ("2026-11-26T15:09:31.53Z [info     ] text mentions [warning  ] inside", False),
        ("Traceback (most recent call last):", True),
        ("ModuleNotFoundError: No module named 'x'", True),
        ("--- motcua dev: starting sms ---", False),
        ("   ", False),
    ],
)
def test_the_terminal_shows_warnings_errors_and_crashes_only(line: str, shown: bool) -> None:
    assert worth_showing(line) is shown
