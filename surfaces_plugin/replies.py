"""Message contents the bot sends: notices, answers and their streamed edits (Markdown → HTML),
and their size: every send is measured against the homeserver's event limit here."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mautrix.util import markdown


def rendered(text: str, msgtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Content with the Markdown source as `body` and its HTML as `formatted_body`."""
    content: dict[str, Any] = {
        "msgtype": msgtype,
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": markdown.render(text),
    }
    if extra:
        content.update(extra)
    return content


def notice(text: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return rendered(text, "m.notice", extra)


def edit(original_event_id: str, new: dict[str, Any]) -> dict[str, Any]:
    """An `m.replace` edit: clients show `m.new_content`; `body` is the fallback with a star."""
    fallback = dict(new)
    fallback["body"] = f"* {new['body']}"
    if "formatted_body" in new:
        fallback["formatted_body"] = f"* {new['formatted_body']}"
    fallback["m.new_content"] = new
    fallback["m.relates_to"] = {"rel_type": "m.replace", "event_id": original_event_id}
    return fallback


# Sizes. Synapse refuses an event whose whole serialized form passes 65,536 bytes (413
# M_TOO_LARGE); what it adds around our content (ids, hashes, signatures, prev_events) stays
# well under the margin kept here.
MAX_EVENT_BYTES = 65_536
ENVELOPE_MARGIN_BYTES = 4_096
MAX_CONTENT_BYTES = MAX_EVENT_BYTES - ENVELOPE_MARGIN_BYTES
# Where a long text is best cut, most preferred first: a paragraph, a line, a sentence, a word.
_BREAKS = ("\n\n", "\n", ". ", "! ", "? ", "。", " ")


def content_bytes(content: dict[str, Any]) -> int:
    """The content's size as the homeserver counts it (UTF-8 JSON)."""
    return len(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def fits(content: dict[str, Any]) -> bool:
    return content_bytes(content) <= MAX_CONTENT_BYTES


def split_to_fit(text: str, fits_text: Callable[[str], bool]) -> list[str]:
    """`text` in consecutive parts for which `fits_text` holds, cut at natural breaks.

    Joined, the parts give back `text` exactly. A part is as long as fits, then shortened to
    its last break in its second half (so cuts are never much shorter than they must be).
    """
    parts: list[str] = []
    rest = text
    while rest and not fits_text(rest):
        low, high = 1, len(rest)  # the longest prefix that fits (at least one character)
        while low < high:
            mid = (low + high + 1) // 2
            if fits_text(rest[:mid]):
                low = mid
            else:
                high = mid - 1
        cut = low
        for mark in _BREAKS:
            at = rest.rfind(mark, low // 2, low)
            if at > 0:
                cut = at + len(mark)
                break
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest or not parts:
        parts.append(rest)
    return parts


# No character takes more than this many bytes in any one copy of a text (UTF-8, then HTML
# and JSON escaping, e.g. `"` → `&quot;`): short texts fit without rendering them to measure.
_MAX_BYTES_PER_CHAR = 6
_SURELY_FITS_COPIES = MAX_CONTENT_BYTES // (4 * _MAX_BYTES_PER_CHAR) - 512


def notice_fits(text: str) -> bool:
    return len(text) <= _SURELY_FITS_COPIES or fits(notice(text))


def answer_fits(text: str, marker: dict[str, Any]) -> bool:
    """Whether an answer with this text can be posted and later edited: an edit carries the
    text twice (the fallback and `m.new_content`), each as Markdown and as HTML."""
    if len(text) <= _SURELY_FITS_COPIES:
        return True
    return fits(edit("$" + "x" * 43, rendered(text, "m.text", marker)))
