"""The province's clock: Vietnam keeps UTC+7 all year (no daylight saving)."""

from __future__ import annotations

from datetime import timedelta, timezone

VIETNAM_TZ = timezone(timedelta(hours=7), "Asia/Ho_Chi_Minh")
