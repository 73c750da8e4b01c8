"""Quiet hours (22:00-07:00 local by default): when a non-urgent message may go. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Final

from services.common.tz import VIETNAM_TZ
from services.sms.text import to_local


@dataclass(frozen=True)
class QuietHours:
    """Local wall-clock window [start, end) in Asia/Ho_Chi_Minh; may wrap past midnight."""

    start: time = time(22, 0)
    end: time = time(7, 0)

    def contains(self, moment: datetime) -> bool:
        local = to_local(moment).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


DEFAULT_QUIET_HOURS: Final = QuietHours()


def earliest_send_time(
    now: datetime, *, urgent: bool, quiet: QuietHours = DEFAULT_QUIET_HOURS
) -> datetime:
    """`now` if a message may go now, else the end of the quiet window (07:00 local)."""
    if urgent or not quiet.contains(now):
        return now
    local = to_local(now)
    release = datetime.combine(local.date(), quiet.end, tzinfo=VIETNAM_TZ)
    if release <= local:
        release = datetime.combine(local.date() + timedelta(days=1), quiet.end, tzinfo=VIETNAM_TZ)
    return release
