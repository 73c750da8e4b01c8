"""A worker started again after a crash takes its consumer group's partitions at once.

A member that dies without leaving its group (SIGKILL, out of memory) stays in it until its
session times out (`MOTCUA_CONSUMER_SESSION_TIMEOUT_SECONDS`), and a rebalance waits for every
member the group knows: a worker started again meanwhile gets no partition before then (18 s on
the embedded broker with 10 s sessions, against 5 s for a join). So each member keeps its member
id in a file of its own slot under `MOTCUA_DATA_DIR` (`slots.claim_slot`: a container restarted in
its pod keeps that directory), and a worker, before it joins, asks the group to drop the member
its slot last held (a LeaveGroup on that member's behalf). A slot no process holds was a stopped
or dead process's: a member that left already is unknown to the group, which says so, and
nothing happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.group import LeaveGroupRequest

from services.common.logging import get_logger
from services.common.slots import claim_slot

log = get_logger("motcua.members")

LEAVE_TIMEOUT_SECONDS = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class MemberFile:
    """The member id this process's slot last held in `group_id`."""

    def __init__(self, directory: Path, group_id: str) -> None:
        stem, self._lock = claim_slot(directory / "members", _UNSAFE.sub("_", group_id))
        self.path = Path(f"{stem}.member")

    def previous(self) -> str | None:
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or None
        return None

    def write(self, member_id: str) -> None:
        with contextlib.suppress(OSError):
            self.path.write_text(member_id)

    def close(self) -> None:
        self._lock.close()


async def leave_for(bootstrap: str, group_id: str, member_id: str) -> bool:
    """Ask `group_id` to drop `member_id` (a dead process's); True when the group did. Never
    raises: the broker away or the member unknown, the join waits as it would have."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    try:
        async with asyncio.timeout(LEAVE_TIMEOUT_SECONDS):
            await client.bootstrap()
            node = await client.coordinator_lookup(0, group_id)  # 0: a consumer group
            answer = await client.send(node, LeaveGroupRequest(group_id, member_id))
        left = getattr(answer, "error_code", -1) == 0
        log.info("left_for_previous_member", group_id=group_id, left=left)
        return left
    except Exception as exc:  # best effort: the session ends it anyway
        log.info("leave_for_previous_member_failed", group_id=group_id, error=type(exc).__name__)
        return False
    finally:
        with contextlib.suppress(Exception):
            await client.close()
