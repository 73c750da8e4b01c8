"""`members.MemberFile`: each process of a group on one disk keeps its member id in a slot of its
own; a process started after one died finds the dead one's id (to drop it from the group)."""

from __future__ import annotations

from pathlib import Path

from services.common.members import MemberFile


def test_a_process_started_again_finds_the_dead_ones_member_id(tmp_path: Path) -> None:
    first = MemberFile(tmp_path, "motcua-postal")
    second = MemberFile(tmp_path, "motcua-postal")  # a second replica on the same disk
    assert first.path != second.path
    assert first.previous() is None
    first.write("member-1")
    second.write("member-2")
    first.close()  # the process died: the kernel released its lock
    again = MemberFile(tmp_path, "motcua-postal")
    assert again.path == first.path and again.previous() == "member-1"
    assert MemberFile(tmp_path, "motcua-sms").previous() is None  # another group's slots
    second.close()
    again.close()


def test_a_group_id_is_a_safe_file_name(tmp_path: Path) -> None:
    member = MemberFile(tmp_path, "../motcua/metrics")
    assert member.path.parent == tmp_path / "members"
    member.close()
