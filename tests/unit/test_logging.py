"""Logs never carry a full phone number, a name, an address or a secret."""

from __future__ import annotations

import logging

import pytest
import structlog

from services.common.logging import configure_logging, get_logger, mask_phone


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("0905123456", "090*****56"),
        ("+84905123456", "+8490*****56"),
        ("84905123456", "8490*****56"),
        ("01651234567", "016*****67"),
        ("sent to 0905123456 ok", "sent to 090*****56 ok"),
        ("receipt 000.00.12.H34-190304-0001", "receipt 000.00.12.H34-190304-0001"),
    ],
)
def test_mask_phone(text: str, masked: str) -> None:
    assert mask_phone(text) == masked


def test_log_lines_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    get_logger("t").info(
        "sms_sent",
        to="+84905123456",
        name="Nguyễn Văn A",
        address="1 Trần Phú",
        secret="s3cr3t",
        dossier_id="D-1",
    )
    out = capsys.readouterr().err
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
    for leaked in ("905123456", "Nguyễn", "Trần Phú", "s3cr3t"):
        assert leaked not in out
    assert "D-1" in out
