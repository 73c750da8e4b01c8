"""The satisfaction survey's page and its answers, as values. Pure.

The page works on a cheap phone: one small HTML document (no script, no image, system fonts,
inline style), one question with five large choices and an optional comment, a plain form POST.
Vietnamese first, an English line below. Nothing a citizen typed is ever shown back: the thank-you
page names the dossier and the score, never the comment.

An answer is kept in Redis for the link's lifetime as `<score>|<answered at>|<nonce>`
(`Recorded`): the next answer of the dossier replaces it and names it in its event
(`previous_score`, `previous_answered_at`), so the figures move the dossier's vote.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import parse_qs

from services.common.events import SURVEY_COMMENT_MAX

SURVEY_SOURCE = "motcua/survey"
FORM_MAX_BYTES = 8 * 1024  # a score and a comment of 500 characters, URL-encoded, fit in it
SCORES = (
    (5, "Rất hài lòng", "Very satisfied"),
    (4, "Hài lòng", "Satisfied"),
    (3, "Bình thường", "Neutral"),
    (2, "Không hài lòng", "Dissatisfied"),
    (1, "Rất không hài lòng", "Very dissatisfied"),
)
# Kept out of a comment: control characters but tab and line breaks.
_CONTROLS = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\\u2028\\u2029]")


@dataclass(frozen=True)
class Answer:
    score: int
    comment: str | None


@dataclass(frozen=True)
class AnswerRefused:
    """Why a form is no answer (said on the page, in both languages)."""

    vi: str
    en: str


def parse_answer(body: bytes) -> Answer | AnswerRefused:
    """The answer in a URL-encoded form body: `score` 1-5, optional `comment` (trimmed, control
    characters dropped, at most `SURVEY_COMMENT_MAX` characters)."""
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return AnswerRefused("Nội dung gửi lên không hợp lệ.", "The form could not be read.")
    score_text = (fields.get("score") or [""])[0].strip()
    if score_text not in {"1", "2", "3", "4", "5"}:
        return AnswerRefused(
            "Vui lòng chọn một mức độ hài lòng (từ 1 đến 5).",
            "Please choose how satisfied you are (1 to 5).",
        )
    comment = _CONTROLS.sub("", (fields.get("comment") or [""])[0]).strip()
    if len(comment) > SURVEY_COMMENT_MAX:
        return AnswerRefused(
            f"Ý kiến tối đa {SURVEY_COMMENT_MAX} ký tự.",
            f"A comment has at most {SURVEY_COMMENT_MAX} characters.",
        )
    return Answer(int(score_text), comment or None)


@dataclass(frozen=True)
class Recorded:
    """The answer of a dossier kept in Redis: its score and when it was given."""

    score: int
    answered_at: datetime
    nonce: str

    def encode(self) -> str:
        return f"{self.score}|{self.answered_at.isoformat()}|{self.nonce}"


def new_record(score: int, answered_at: datetime) -> Recorded:
    return Recorded(score, answered_at, uuid.uuid4().hex)


def decode_record(raw: bytes | str | None) -> Recorded | None:
    """A kept answer; None for none, or for a value that is no record (it is then replaced as
    if there had been none)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        score, answered_at, nonce = text.split("|")
        moment = datetime.fromisoformat(answered_at)
        if int(score) not in range(1, 6) or moment.utcoffset() is None or not nonce:
            return None
        return Recorded(int(score), moment, nonce)
    except ValueError:
        return None


def answered_data(
    dossier_id: str,
    agency_code: str,
    answer: Recorded,
    previous: Recorded | None,
    sealed_comment: str | None,
) -> dict[str, Any]:
    """`data` of the `survey.answered` event of an answer (and the one it replaces)."""
    data: dict[str, Any] = {
        "dossier_id": dossier_id,
        "agency_code": agency_code,
        "score": answer.score,
        "answered_at": answer.answered_at.isoformat(),
        "previous_score": previous.score if previous else None,
        "previous_answered_at": previous.answered_at.isoformat() if previous else None,
    }
    if sealed_comment is not None:
        data["comment"] = sealed_comment
    return data


def event_id(dossier_id: str, answer: Recorded) -> str:
    return f"{dossier_id}:{answer.nonce}"


# --- HTML ----------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;
padding:16px;max-width:560px;margin:auto;line-height:1.45;color:#1a1a1a;background:#fff}
h1{font-size:1.3rem;margin:.2em 0}
.en{color:#555;font-size:.9rem;margin:.1em 0 .8em}
fieldset{border:0;padding:0;margin:0 0 1em}
legend{font-weight:600;margin-bottom:.5em}
label.choice{display:block;border:2px solid #bbb;border-radius:8px;padding:12px;margin:8px 0;
min-height:48px;box-sizing:border-box;font-size:1.05rem}
label.choice input{width:22px;height:22px;vertical-align:middle;margin-right:10px}
textarea{width:100%;box-sizing:border-box;font:inherit;padding:8px;min-height:6em}
button{width:100%;min-height:52px;font-size:1.1rem;border:0;border-radius:8px;
background:#0b5cad;color:#fff;margin-top:12px}
.error{border-left:4px solid #b00020;padding:8px 12px;background:#fdecee}
.small{font-size:.85rem;color:#555}
"""


def _page(title_vi: str, title_en: str, body: str) -> str:
    return (
        '<!doctype html><html lang="vi"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{escape(title_vi)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{escape(title_vi)}</h1><p class="en" lang="en">{escape(title_en)}</p>'
        f"{body}</body></html>"
    )


def form_page(dossier_id: str, last_day: str, refused: AnswerRefused | None = None) -> str:
    """The question: five choices, a comment, one button."""
    error = (
        f'<p class="error" role="alert">{escape(refused.vi)}<br>'
        f'<span lang="en">{escape(refused.en)}</span></p>'
        if refused
        else ""
    )
    choices = "".join(
        f'<label class="choice"><input type="radio" name="score" value="{score}" required>'
        f'{score}. {escape(vi)} <span class="small" lang="en">({escape(en)})</span></label>'
        for score, vi, en in SCORES
    )
    body = (
        f"{error}"
        f"<p>Hồ sơ <strong>{escape(dossier_id)}</strong></p>"
        '<form method="post">'
        "<fieldset><legend>Ông/Bà có hài lòng với việc giải quyết hồ sơ này không?"
        '<br><span class="small" lang="en">How satisfied are you with how this dossier was '
        "handled?</span></legend>"
        f"{choices}</fieldset>"
        '<label for="comment">Ý kiến khác (không bắt buộc; không ghi họ tên, số điện thoại, '
        'địa chỉ)<br><span class="small" lang="en">Comment (optional; please do not write '
        "names, phone numbers or addresses)</span></label>"
        f'<textarea id="comment" name="comment" maxlength="{SURVEY_COMMENT_MAX}"></textarea>'
        '<button type="submit">Gửi đánh giá · Send</button></form>'
        f'<p class="small">Có thể đổi câu trả lời đến hết ngày {escape(last_day)}. '
        f'<span lang="en">You may change your answer until {escape(last_day)}.</span></p>'
    )
    return _page("Khảo sát mức độ hài lòng", "Satisfaction survey of the one-stop center", body)


def thanks_page(dossier_id: str, score: int, last_day: str) -> str:
    body = (
        f"<p>Hồ sơ <strong>{escape(dossier_id)}</strong>: {score}/5.</p>"
        f"<p>Ông/Bà có thể đổi câu trả lời bằng đường dẫn này đến hết ngày {escape(last_day)}."
        f'<br><span class="small" lang="en">You may change your answer with this link until '
        f"{escape(last_day)}.</span></p>"
    )
    return _page("Cảm ơn Ông/Bà đã đánh giá", "Thank you for your answer", body)


def refusal_page(title_vi: str, title_en: str, detail_vi: str, detail_en: str) -> str:
    body = f'<p>{escape(detail_vi)}<br><span class="small" lang="en">{escape(detail_en)}</span></p>'
    return _page(title_vi, title_en, body)
