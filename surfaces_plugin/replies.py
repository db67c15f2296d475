"""Message contents the bot sends: notices, answers and their streamed edits (Markdown → HTML)."""

from __future__ import annotations

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
